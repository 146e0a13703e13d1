"""Helpers for the backend process tests: spawning clients, checking that no process is left."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

PYTHON = sys.executable


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a reaped child has no /proc entry at all)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (the backend and anything it spawned)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def wait_gone(pids, timeout: float = 5.0) -> list[int]:
    """Wait until none of ``pids`` (nor their process groups) is alive; return the survivors."""
    end = time.monotonic() + timeout
    while True:
        left = [p for p in pids if pid_alive(p) or group_members(p)]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.02)


def types(msgs) -> list[str]:
    return [m["type"] for m in msgs]


def fake_backend_script(staged_extension: Path, log_path: Path, cache_dir: Path, then: str) -> str:
    """Source of a stand-alone Python script playing Blender: it imports the staged add-on's client,
    starts a backend with the fake runner, waits for its first ``status``, then runs ``then``
    (dedented; the client is ``c``, and ``sys`` and ``time`` are imported)."""
    return textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(staged_extension.parent)!r})
        import trellis2.backend_client as bc
        c = bc.BackendClient({PYTHON!r}, {str(staged_extension)!r}, log_path={str(log_path)!r},
                             cache_dir={str(cache_dir)!r}, extra_args=["--runner", "fake"])
        c.start()
        c.wait_for(lambda m: m["type"] == "status", 30)
    """) + textwrap.dedent(then)
