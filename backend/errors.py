"""Typed errors shared by the pipelines, the CLI and the server.

Every error a user can cause or fix carries a human-readable message (``str(err)``) and a stable
``code`` the server puts into the protocol so the add-on can react (e.g. offer low-VRAM mode on
:class:`OutOfMemory`). This module is torch-free.
"""

from __future__ import annotations

import os

__all__ = ["Trellis2Error", "BadInput", "MissingWeights", "OutOfMemory", "NumericalError", "Cancelled", "HINTS",
           "read_log_tail"]

#: The one table of what to do about each error kind (the protocol's ``kind``), used for the typed
#: errors' default advice here and by the add-on (``jobs.ERROR_HINTS``) when a frame brings none or
#: the error is the add-on's own (``not_configured``, ``start_failed``, ``crashed``).
HINTS: dict[str, str] = {
    "oom": "Try a lower resolution pipeline (512 or 1024_cascade instead of 1536_cascade), enable low-VRAM "
           "mode, lower Max Tokens, close other GPU applications, or lower the texture size.",
    "numerical": "Set Precision to fp32 (or bf16 on an NVIDIA RTX 30xx / A100 or newer) and run again.",
    "numerical_fp32": "Computed in fp32 already, so not a precision problem: check guidance/steps, or "
                      "re-download the model files.",
    "missing_dependency": "The backend environment lacks a package: run Check Backend in Preferences.",
    "missing_weights": "Model weights not found: check the model folders in Preferences.",
    "bad_input": "Check the input image / mesh.",
    "crashed": "The backend process stopped: open the log, then restart it.",
    "not_configured": "Finish the setup in Preferences › Add-ons › TRELLIS.2 (backend Python, model folders).",
    "start_failed": "The backend did not start: check the backend Python in Preferences, then Restart.",
    "protocol": "Backend and add-on versions do not match: reinstall the extension.",
    "native_crash": "The backend crashed in native code: check the CUDA / driver versions with Check Backend.",
    "internal": "See the backend log for details.",
}


class Trellis2Error(Exception):
    """Base class of every typed backend error."""

    code: str = "error"

    def __init__(self, message: str, *, advice: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.advice = advice

    def __str__(self) -> str:
        return self.message if not self.advice else f"{self.message} {self.advice}"

    def to_dict(self) -> dict:
        """JSON-serialisable form for the protocol: ``{code, message, advice}``."""
        return {"code": self.code, "message": self.message, "advice": self.advice}


class BadInput(Trellis2Error, ValueError):
    """The user's input (image, mesh, parameters) cannot be used; the message says why."""

    code = "bad_input"

    def __init__(self, message: str, *, advice: str | None = None, field: str | None = None) -> None:
        super().__init__(message, advice=advice)
        #: the request field (or config entry) at fault, e.g. ``"seed"``, ``"stage_params.shape_slat.steps"``
        self.field = field

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["field"] = self.field
        return d


class MissingWeights(Trellis2Error, FileNotFoundError):
    """Model files are missing; ``missing`` lists every expected path that was not found."""

    code = "missing_weights"

    def __init__(self, message: str, *, missing: list[str] | None = None, advice: str | None = None) -> None:
        super().__init__(message, advice=advice)
        self.missing = list(missing or [])

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["missing"] = self.missing
        return d


class OutOfMemory(Trellis2Error, MemoryError):
    """The device ran out of memory; ``advice`` suggests what to change."""

    code = "out_of_memory"

    def __init__(self, message: str = "The GPU ran out of memory.", *, stage: str | None = None,
                 advice: str | None = None) -> None:
        super().__init__(message, advice=advice or HINTS["oom"])
        self.stage = stage


class NumericalError(Trellis2Error):
    """A model produced NaN/Inf: typically fp16 overflow in a network trained in bf16 (``precision_related``),
    or, when it already computed in fp32, bad parameters or damaged weights (more precision won't help)."""

    code = "numerical"

    def __init__(self, message: str, *, stage: str | None = None, advice: str | None = None,
                 precision_related: bool = True) -> None:
        super().__init__(message, advice=advice or HINTS["numerical" if precision_related else "numerical_fp32"])
        self.stage = stage
        self.precision_related = precision_related


class Cancelled(Trellis2Error):
    """The job was cancelled by the user (checked at every sampler step and between stages)."""

    code = "cancelled"

    def __init__(self, message: str = "Cancelled.", *, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


def read_log_tail(path: str | os.PathLike | None, lines: int = 30) -> list[str]:
    """The last ``lines`` lines of a log file (reads at most its last 64 KiB): what error reports carry
    (the server's ``log_tail``, the add-on's crash report and its helper-process boxes)."""
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 65536))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]
