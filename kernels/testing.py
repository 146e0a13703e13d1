"""Test helpers: load a ``kernels.triton_*`` module under the Triton CPU interpreter.

Triton decides between compiler and interpreter when ``@triton.jit`` runs, i.e. when the module is
first imported. :func:`interpreted_module` sets ``TRITON_INTERPRET=1``, imports the module (re-imports
it if an earlier import compiled it for a GPU) and checks that every kernel in it really is
interpreted, so a parity test can never silently run something else.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

__all__ = ["interpreted_module", "jit_functions"]


def jit_functions(module: ModuleType) -> dict[str, object]:
    """The ``@triton.jit`` objects defined in ``module`` (by name)."""
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        InterpretedFunction = ()  # type: ignore[assignment]
    return {k: v for k, v in vars(module).items() if isinstance(v, (JITFunction, InterpretedFunction))}


def _all_interpreted(module: ModuleType) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    fns = jit_functions(module)
    return bool(fns) and all(isinstance(f, InterpretedFunction) for f in fns.values())


def interpreted_module(name: str) -> ModuleType:
    """Import ``kernels.triton_<x>`` (``name``) with its kernels interpreted on CPU; raises if impossible."""
    os.environ["TRITON_INTERPRET"] = "1"
    deps = ["kernels.triton_common"] if name != "kernels.triton_common" else []
    for dep in deps:
        mod = importlib.import_module(dep)
        if not _all_interpreted(mod):
            importlib.reload(mod)
    mod = sys.modules.get(name) or importlib.import_module(name)
    if not _all_interpreted(mod):
        mod = importlib.reload(mod)
    if not _all_interpreted(mod):
        raise RuntimeError(f"{name}: TRITON_INTERPRET=1 was not honoured (kernels are not InterpretedFunction)")
    return mod
