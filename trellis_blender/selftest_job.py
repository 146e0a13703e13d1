"""``trellis2 selftest`` as a one-shot child process, polled without blocking (the "Check backend" button).
Stdlib only; no bpy."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .backend_link import sanitized_env

__all__ = ["SelftestJob"]


class SelftestJob:
    """``trellis2 selftest`` as a one-shot child, polled without blocking ("Check backend" button).

    ``start()`` spawns ``[python, "-m", "backend", "selftest", "--compact", (--model-dir D)]`` (cwd and
    PYTHONPATH = the extension folder); ``poll()`` returns None while it runs, then the report dict
    (see ``backend/selftest.py``). Failures come back as a report too: ``{"ok": False, "problems":
    [why], "error": ..., "stderr_tail": [...]}``, so the UI always has something to show.
    """

    def __init__(self, python: str | os.PathLike, ext_dir: str | os.PathLike | None = None, *,
                 model_dir: str | os.PathLike | None = None, timeout: float = 180.0) -> None:
        self.python = str(python)
        self.ext_dir = Path(ext_dir) if ext_dir else Path(__file__).resolve().parent
        self.model_dir = model_dir
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.report: dict[str, Any] | None = None
        self._t0 = 0.0

    def argv(self) -> list[str]:
        argv = [self.python, "-m", "backend", "selftest", "--compact"]
        return argv + (["--model-dir", str(self.model_dir)] if self.model_dir else [])

    def _fail(self, why: str, stderr: str = "") -> dict[str, Any]:
        self.report = {"ok": False, "problems": [why], "error": why, "stderr_tail": stderr.splitlines()[-30:]}
        return self.report

    def start(self) -> None:
        self.report = None
        self._t0 = time.monotonic()
        kwargs: dict[str, Any] = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, cwd=str(self.ext_dir),
                                         env=sanitized_env(self.ext_dir), shell=False, **kwargs)
        except OSError as exc:
            self.proc = None
            self._fail(f"Cannot run {self.python}: {exc}")

    def poll(self) -> dict[str, Any] | None:
        """None while running; then the report (cached)."""
        if self.report is not None or self.proc is None:
            return self.report
        if self.proc.poll() is None:
            if time.monotonic() - self._t0 < self.timeout:
                return None
            self.proc.kill()
        out, err = self.proc.communicate()
        text_err = err.decode("utf-8", "replace")
        if self.proc.returncode not in (0, 1):
            return self._fail(f"The self-test exited with code {self.proc.returncode}.", text_err)
        try:
            report = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
            if not isinstance(report, dict):
                raise ValueError("not an object")
        except (ValueError, IndexError):
            return self._fail("The self-test did not print a JSON report.", text_err)
        self.report = report
        return report

    def run(self) -> dict[str, Any]:
        """Blocking convenience (scripts/tests): start, wait, return the report."""
        self.start()
        while (rep := self.poll()) is None:
            time.sleep(0.05)
        return rep
