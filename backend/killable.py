"""Long single C calls (image decode, decimation, UV unwrap) run in a child process that a cancel can
kill at once: such calls hold the GIL for seconds, so a thread could not even notice the cancel, and
a crash in them (xatlas on odd meshes) must not take the backend down. Stdlib only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["run_killable", "package_root", "call_in_child", "ChildError"]


def package_root() -> tuple[str, str]:
    """``(sys.path entry, package name)`` that make this backend package importable in a child."""
    pkg = __package__ or "backend"
    return str(Path(__file__).resolve().parents[pkg.count(".") + 1]), pkg


def run_killable(argv: Sequence[str], tick: Callable[[], None] | None, log_path: str, poll_s: float = 0.05) -> int:
    """Run ``[python, *argv]`` (stdout and stderr to ``log_path``) and return its exit code.

    ``tick()`` is called every ``poll_s`` seconds while the child runs; when it raises (a cancel),
    the child is killed and reaped before the exception propagates, so no process is ever left behind.
    """
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        while True:
            try:
                return proc.wait(poll_s)
            except subprocess.TimeoutExpired:
                if tick is not None:
                    tick()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class ChildError(Exception):
    """A function run by :func:`call_in_child` raised: ``type_name`` and the message it had."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


_CALL_CHILD = r"""
import importlib, json, os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
spec = json.loads(sys.argv[3])
mod = importlib.import_module(sys.argv[2] + "." + spec["module"])
with np.load(sys.argv[4], allow_pickle=False) as z:
    args = [z["a%d" % i] for i in range(spec["nargs"])]
try:
    res = getattr(mod, spec["func"])(*args, **spec["kwargs"])
except Exception as e:
    with open(sys.argv[5] + ".err", "w", encoding="utf-8") as fh:
        fh.write(type(e).__name__ + "\n" + str(e))
    sys.exit(3)
out = {k: getattr(res, k) for k in spec["fields"]}
with open(sys.argv[5] + ".part", "wb") as fh:
    np.savez(fh, **{k: v for k, v in out.items() if v is not None})
os.replace(sys.argv[5] + ".part", sys.argv[5])
"""


def call_in_child(module: str, func: str, args: Sequence[Any], kwargs: dict[str, Any], fields: Sequence[str],
                  tick: Callable[[], None] | None, poll_s: float = 0.05) -> dict[str, Any]:
    """``func(*args, **kwargs)`` of this package's ``module`` (numpy arrays in, JSON kwargs) in a
    killable child; returns the result's ``fields`` (array attributes; absent when None).

    Raises :class:`ChildError` when the function raised, ``RuntimeError`` when the child died, and
    whatever ``tick()`` raises (the child is killed first)."""
    import numpy as np

    root, pkg = package_root()
    spec = json.dumps({"module": module, "func": func, "nargs": len(args), "kwargs": kwargs, "fields": list(fields)})
    with tempfile.TemporaryDirectory(prefix="trellis2-child-") as tmp:
        inp, out, log = (os.path.join(tmp, n) for n in ("in.npz", "out.npz", "log.txt"))
        np.savez(inp, **{f"a{i}": np.asarray(a) for i, a in enumerate(args)})
        rc = run_killable(["-c", _CALL_CHILD, root, pkg, spec, inp, out], tick, log, poll_s)
        if rc == 3 and os.path.exists(out + ".err"):
            with open(out + ".err", encoding="utf-8") as fh:
                name, _, message = fh.read().partition("\n")
            raise ChildError(name, message)
        if rc != 0 or not os.path.exists(out):
            with open(log, "rb") as fh:
                detail = fh.read()[-300:].decode("utf-8", "replace").strip()
            raise RuntimeError(f"{module}.{func} died in its child process (exit {rc})"
                               f"{': ' + detail if detail else ''}")
        with np.load(out, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
