"""Error classification: any exception a job raised → the protocol's ``(kind, message, advice)``
(advice texts from :data:`backend.errors.HINTS`)."""

from __future__ import annotations

from .. import errors as _errors


def classify_error(exc: BaseException) -> tuple[str, str, str | None]:
    """``(kind, human message, advice)`` for any exception a job raised."""
    if isinstance(exc, _errors.Cancelled):
        return "cancelled", str(exc), None
    name = type(exc).__name__
    text = str(exc)
    if (isinstance(exc, (_errors.OutOfMemory, MemoryError)) or name == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and "out of memory" in text.lower())):
        advice = getattr(exc, "advice", None) or _errors.OutOfMemory().advice
        return "oom", getattr(exc, "message", None) or "The device ran out of memory.", advice
    if isinstance(exc, _errors.MissingWeights):
        return "missing_weights", exc.message, exc.advice or _errors.HINTS["missing_weights"]
    missing_dep = getattr(_errors, "MissingDependency", None)
    if (missing_dep is not None and isinstance(exc, missing_dep)) or isinstance(exc, ImportError):
        mod = getattr(exc, "name", None)
        msg = getattr(exc, "message", None) or (f"Missing Python module {mod!r}." if mod else text)
        return "missing_dependency", msg, _errors.HINTS["missing_dependency"]
    if isinstance(exc, _errors.BadInput):
        return "bad_input", exc.message, exc.advice
    if isinstance(exc, _errors.NumericalError):
        # NaN/Inf in fp32 is not a precision problem: not "numerical" (whose fix is "use fp32")
        return ("numerical" if getattr(exc, "precision_related", True) else "internal"), exc.message, exc.advice
    if isinstance(exc, _errors.Trellis2Error):
        return "internal", exc.message, exc.advice
    return "internal", f"{name}: {text}" if text else name, _errors.HINTS["internal"]
