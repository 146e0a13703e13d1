"""Golden-data harness: run our implementation on ../shared/golden cases and compare.

Each case ``case_<name>`` is dispatched by the ``call`` its JSON describes: handlers register with
:func:`case` (name and, for cases that state one, the call) in one of the modules listed in
``HANDLER_MODULES``, so a differently named case with the same call (numbers and comments aside) runs
the same handler; cases without a ``call`` (or whose call no handler knows) fall back to the name.
A handler receives the case (tensors + JSON) and returns a dict of output
name (``"out.*"``) → tensor; :func:`check_case` compares them with the case's tolerances
(integer/bool outputs exactly). ``python -m backend.golden DIR`` runs every case.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

HANDLER_MODULES: tuple[str, ...] = (
    ".flow_cases",
    ".sampler_cases",
    ".vae_cases",
    ".ovoxel_cases",
)


@dataclass
class GoldenCase:
    """One golden case: its name, folder, tensors and JSON description."""

    name: str
    root: Path
    tensors: dict[str, torch.Tensor]
    meta: dict

    def model_path(self, stem: str | None = None) -> Path:
        """Path stem (without extension) of the case's model pair ``model_<stem>.json/.safetensors``."""
        return self.root / f"model_{stem or self.meta['model']}"


@dataclass
class CaseReport:
    """Outcome of one case: per-output max abs error and pass flag."""

    name: str
    passed: bool
    errors: dict[str, str] = field(default_factory=dict)
    max_abs: dict[str, float] = field(default_factory=dict)
    missing_handler: bool = False


Handler = Callable[[GoldenCase], dict[str, torch.Tensor]]
_HANDLERS: dict[str, Handler] = {}
_BY_CALL: dict[str, Handler] = {}


def call_key(call: str) -> str:
    """A case's ``call`` as a dispatch key: comment dropped, whitespace collapsed, numbers masked
    (``grid_size=64`` and ``grid_size=128`` are the same call on another grid)."""
    text = " ".join(str(call).split("#", 1)[0].split())
    return re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", "N", text)


def case(name: str, call: str | None = None) -> Callable[[Handler], Handler]:
    """Decorator registering the handler for golden case ``name`` (without the ``case_`` prefix) and,
    when given, for every case whose JSON ``call`` is ``call`` (see :func:`call_key`)."""

    def deco(fn: Handler) -> Handler:
        _HANDLERS[name] = fn
        if call is not None:
            _BY_CALL[call_key(call)] = fn
        return fn

    return deco


def handlers() -> dict[str, Handler]:
    """All registered handlers (imports every handler module)."""
    for mod in HANDLER_MODULES:
        importlib.import_module(mod, __package__)
    return dict(_HANDLERS)


def load_case(root: Path, name: str) -> GoldenCase:
    """Read ``case_<name>.safetensors`` and ``case_<name>.json`` from ``root``."""
    from safetensors.torch import load_file

    root = Path(root)
    tensors = load_file(str(root / f"case_{name}.safetensors"))
    meta = json.loads((root / f"case_{name}.json").read_text())
    return GoldenCase(name, root, tensors, meta)


def check_outputs(gc: GoldenCase, outputs: dict[str, torch.Tensor]) -> CaseReport:
    """Compare ``outputs`` with every expected ``out.*`` tensor the handler produced.

    Every ``out.*`` tensor of the case must be produced. Float outputs use the case's
    ``atol + rtol*|ref|`` tolerance; integer and bool outputs must match exactly.
    """
    report = CaseReport(gc.name, True)
    tols = gc.meta.get("tolerances", {})
    for key, ref in gc.tensors.items():
        if not key.startswith("out."):
            continue
        if key not in outputs:
            report.passed = False
            report.errors[key] = "not produced"
            continue
        got = torch.as_tensor(outputs[key]).detach().cpu()
        if tuple(got.shape) != tuple(ref.shape):
            report.passed = False
            report.errors[key] = f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
            continue
        if ref.dtype.is_floating_point or ref.dtype.is_complex:
            tol = tols.get(key, {"atol": 1e-5, "rtol": 1e-4})
            diff = (got.to(ref.dtype) - ref).abs()
            ok = bool((diff <= tol["atol"] + tol["rtol"] * ref.abs()).all()) if diff.numel() else True
            report.max_abs[key] = float(diff.max()) if diff.numel() else 0.0
        else:
            ok = bool(torch.equal(got.to(ref.dtype), ref))
            report.max_abs[key] = 0.0 if ok else float("inf")
        if not ok:
            report.passed = False
            report.errors[key] = f"max abs diff {report.max_abs[key]:.3g}"
    return report


def handler_for(name: str, meta: dict) -> Handler | None:
    """The handler of a case: by its ``call`` when one is registered, else by its name."""
    table = handlers()
    call = meta.get("call")
    if call is not None and call_key(call) in _BY_CALL:
        return _BY_CALL[call_key(call)]
    return table.get(name)


def run_case(root: Path, name: str) -> CaseReport:
    """Run the handler of case ``name`` (dispatched by its ``call``) and compare its outputs."""
    meta = json.loads((Path(root) / f"case_{name}.json").read_text())
    fn = handler_for(name, meta)
    if fn is None:
        return CaseReport(name, False, {"*": f"no handler registered for call {meta.get('call')!r}"},
                          missing_handler=True)
    gc = load_case(root, name)
    with torch.no_grad():
        outputs = fn(gc)
    return check_outputs(gc, outputs)


def case_names(root: Path) -> list[str]:
    """Names of all cases in a golden folder (from ``manifest.json``)."""
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    return sorted(manifest["cases"])
