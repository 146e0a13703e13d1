"""Long single C calls (image decode, decimation, UV unwrap) run in a child process that a cancel can
kill at once: such calls hold the GIL for seconds, so a thread could not even notice the cancel, and
a crash in them (xatlas on odd meshes) must not take the backend down. Stdlib only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["run_killable", "package_root"]


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
