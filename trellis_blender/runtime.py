"""Process-wide runtime state of the add-on (pure Python; nothing here is saved in .blend files).

Holds the preference tasks (environment creation, self-test), the job manager and the results
waiting to be applied to the scene. Everything is reset by :func:`reset` on unregister.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from . import tasks

env_task: Optional[tasks.ProcessTask] = None
selftest_task: Optional[tasks.ProcessTask] = None
download_task: Optional[tasks.ProcessTask] = None
selftest_out: Optional[Path] = None
selftest_lines: list[str] = []
selftest_data: Optional[dict] = None
# The JobManager (see jobs.py); created lazily on first use.
manager: Any = None
# core.RunTimings of the cache folder in use (learned job durations); loaded lazily.
timings: Any = None


def extension_dir() -> Path:
    """The installed extension folder (holds ``backend/`` and ``kernels/`` next to the add-on)."""
    return Path(__file__).resolve().parent


def load_selftest_result() -> None:
    """Parse the finished self-test's JSON into :data:`selftest_lines`."""
    global selftest_data, selftest_lines
    task = selftest_task
    if task is None or task.running or selftest_lines:
        return
    text = ""
    if selftest_out is not None and selftest_out.is_file():
        text = selftest_out.read_text(encoding="utf-8", errors="replace")
    data = tasks.parse_selftest(text)
    selftest_data = data
    if data is not None:
        problems = [f"! {p}" for p in (data.get("problems") or [])]
        rest = tasks.format_selftest({k: v for k, v in data.items() if k not in ("problems",)})
        selftest_lines = problems + rest
    else:
        selftest_lines = ["Self-test gave no JSON; last log lines:"] + task.log_tail(8).splitlines()


def reset() -> None:
    """Stop everything (unregister)."""
    global env_task, selftest_task, download_task, manager, selftest_lines, selftest_data, timings
    for task in (env_task, selftest_task, download_task):
        if task is not None and task.running:
            task.cancel()
    if manager is not None:
        try:
            manager.shutdown()
        except Exception:  # never block unregister
            pass
    env_task = selftest_task = download_task = manager = timings = None
    selftest_lines = []
    selftest_data = None
