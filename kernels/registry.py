"""Pick the Triton kernel or the pure-PyTorch reference of each op, per device.

Every public op in :mod:`kernels` is registered here with two implementations:

* ``reference``: pure PyTorch, runs on any device, is what CI checks against;
* ``triton``: a Triton kernel, loaded lazily (``"module:function"``) so that ``import kernels``
  never imports Triton, and so that ``TRITON_INTERPRET`` is read only when a kernel module is first
  imported (Triton decides between the compiler and the interpreter at ``@triton.jit`` time).

Selection (:func:`select`), per call, from the device of the op's main tensor:

* ``TRELLIS_KERNELS=reference``: always the reference;
* ``TRELLIS_KERNELS=triton``: always the kernel; on a CPU tensor this only works under
  ``TRITON_INTERPRET=1`` (tests), otherwise :class:`KernelUnavailable` is raised;
* ``TRELLIS_KERNELS=auto`` (default): the kernel when the tensor is on a CUDA device of compute
  capability ≥ 8.0 (Ampere and newer, what the kernels' tiles and pipelining target; older GPUs run
  the cuBLAS-backed reference) and Triton imports, the reference otherwise.

The first time a (backend, device type) pair is used, one ``INFO`` line is logged on the
``kernels`` logger, e.g. ``kernels: using Triton kernels on cuda (TRELLIS_KERNELS=auto,
triton 3.7.1)``; a forced or automatic fallback says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = [
    "ENV_VAR",
    "KernelUnavailable",
    "available_ops",
    "call",
    "get",
    "mode",
    "register",
    "select",
    "triton_available",
    "reset",
]

log = logging.getLogger("kernels")

#: Environment switch: ``reference`` | ``triton`` | ``auto`` (default).
ENV_VAR = "TRELLIS_KERNELS"
_MODES = ("auto", "reference", "triton")


class KernelUnavailable(RuntimeError):
    """The Triton kernel was forced but cannot run here."""


@dataclass
class _Op:
    name: str
    reference: Callable[..., Any]
    triton: str | Callable[..., Any] | None
    _loaded: Callable[..., Any] | None = field(default=None, repr=False)

    def load_triton(self) -> Callable[..., Any]:
        if self._loaded is None:
            if self.triton is None:
                raise KernelUnavailable(f"op {self.name!r} has no Triton kernel")
            if callable(self.triton):
                self._loaded = self.triton
            else:
                mod_name, _, fn_name = self.triton.partition(":")
                self._loaded = getattr(importlib.import_module(mod_name), fn_name)
        return self._loaded


_OPS: dict[str, _Op] = {}
_LOGGED: set[tuple[str, str]] = set()


def register(name: str, reference: Callable[..., Any], triton: str | Callable[..., Any] | None) -> None:
    """Register op ``name``: its reference callable and its Triton kernel (``"module:function"``)."""
    _OPS[name] = _Op(name, reference, triton)


def available_ops() -> list[str]:
    """Names of the registered ops."""
    return sorted(_OPS)


def mode() -> str:
    """The value of ``TRELLIS_KERNELS`` (``auto`` when unset); raises on an unknown value."""
    m = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if m not in _MODES:
        raise ValueError(f"{ENV_VAR}={m!r}: expected one of {', '.join(_MODES)}")
    return m


_PROBE: list[str | None] = []  # cached result of the Triton probe (empty = not probed yet)


def _triton_version() -> str | None:
    """Triton's version if it is installed and imports, else None (cached per process)."""
    if not _PROBE:
        version: str | None = None
        try:
            if importlib.util.find_spec("triton") is not None:
                import triton

                version = str(getattr(triton, "__version__", "?"))
        except Exception as exc:  # noqa: BLE001 - a broken install counts as missing
            log.debug("triton import failed: %s", exc)
        _PROBE.append(version)
    return _PROBE[0]


def triton_available() -> bool:
    """True when Triton is installed and imports."""
    return _triton_version() is not None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


#: Lowest CUDA compute capability the automatic choice sends to the Triton kernels.
MIN_CAPABILITY = (8, 0)


_CAPS: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, cached per index (separate function so tests can fake it)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPS:
        major, minor = torch.cuda.get_device_capability(idx)
        _CAPS[idx] = (int(major), int(minor))
    return _CAPS[idx]


def _log_once(backend: str, device: torch.device, why: str) -> None:
    key = (backend, device.type)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    if backend == "triton":
        log.info("kernels: using Triton kernels on %s (%s=%s, triton %s%s)", device.type, ENV_VAR, mode(),
                 _triton_version(), ", interpreter" if interpreting() else "")
    else:
        log.info("kernels: using the PyTorch reference on %s (%s)", device.type, why)


def select(device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (see the module doc)."""
    device = torch.device(device)
    m = mode()
    if m == "reference":
        _log_once("reference", device, f"{ENV_VAR}=reference")
        return "reference"
    if m == "triton":
        if not triton_available():
            raise KernelUnavailable(f"{ENV_VAR}=triton but triton is not installed or does not import")
        if device.type != "cuda" and not interpreting():
            raise KernelUnavailable(
                f"{ENV_VAR}=triton on a {device.type} tensor needs TRITON_INTERPRET=1 (Triton runs on CUDA)")
        _log_once("triton", device, "forced")
        return "triton"
    # auto
    if device.type != "cuda":
        _log_once("reference", device, f"{device.type} device")
        return "reference"
    if not triton_available():
        _log_once("reference", device, "triton not available")
        return "reference"
    cap = _capability(device)
    if cap < MIN_CAPABILITY:
        _log_once("reference", device, f"compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
        return "reference"
    _log_once("triton", device, "auto")
    return "triton"


def get(name: str, device: torch.device | str) -> Callable[..., Any]:
    """The implementation of op ``name`` to use for tensors on ``device``."""
    op = _OPS[name]
    if op.triton is None or select(device) == "reference":
        return op.reference
    return op.load_triton()


def call(name: str, device: torch.device | str, *args: Any, **kwargs: Any) -> Any:
    """Run op ``name`` with the implementation chosen for ``device``."""
    return get(name, device)(*args, **kwargs)


def reset() -> None:
    """Forget logged decisions, loaded kernels and the cached Triton probe (tests)."""
    _LOGGED.clear()
    _PROBE.clear()
    for op in _OPS.values():
        op._loaded = None
