"""Non-blocking helper processes (environment creation, self-test, model downloads).

Pure Python (stdlib only), so it is importable and testable without Blender. A :class:`ProcessTask`
runs a list of argv steps one after another, writes their output to a log file and is advanced by
:meth:`ProcessTask.poll`, called from a Blender timer (or in a loop when Blender runs headless,
where timers never fire).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

from .backend.errors import read_log_tail
from .backend.download import MODEL_REPOS, REMBG_REPO, repos_for  # noqa: F401  (the one repository table)

def clean_env(extra_pythonpath: Optional[str] = None) -> dict[str, str]:
    """Blender's environment without its Python variables (the backend has its own Python)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra_pythonpath:
        env["PYTHONPATH"] = extra_pythonpath
    return env


def _popen_kwargs() -> dict:
    if os.name == "nt":
        flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


class EventListener(Protocol):
    """Receives the JSON events (``{"event": …}`` lines) a task's children print."""

    def apply(self, event: dict) -> None: ...

    def text(self) -> str: ...

    def fraction(self) -> Optional[float]: ...


@dataclass
class ProcessTask:
    """Runs ``steps`` (argv lists, never a shell) in order; output goes to ``log_path``.

    With a ``listener``, every ``{"event": …}`` line the children write is parsed from the log as it
    grows and handed to ``listener.apply`` (status text and fraction then come from the listener).
    """

    title: str
    steps: Sequence[Sequence[str]]
    log_path: Path
    cwd: Optional[str] = None
    env: Optional[dict] = None
    step_titles: Sequence[str] = ()
    index: int = 0
    returncode: Optional[int] = None
    started: float = field(default_factory=time.monotonic)
    finished: Optional[float] = None
    listener: Optional[EventListener] = None
    _proc: Optional[subprocess.Popen] = None
    _log: Optional[object] = None
    _read_at: int = 0
    _partial: bytes = b""

    @property
    def running(self) -> bool:
        return self.returncode is None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def fraction(self) -> float:
        own = self.listener.fraction() if self.listener is not None else None
        if own is not None:
            return own
        n = max(1, len(self.steps))
        return min(1.0, (self.index + (1.0 if not self.running else 0.5)) / n) if self.steps else 1.0

    def status_text(self) -> str:
        n = len(self.steps)
        if self.running and self.listener is not None and self.listener.text():
            return f"{self.title}: {self.listener.text()}"
        if self.running:
            name = self.step_titles[self.index] if self.index < len(self.step_titles) else "working"
            return f"{self.title}: step {self.index + 1}/{n} · {name}"
        return f"{self.title}: {'done' if self.ok else f'failed (code {self.returncode})'}"

    def start(self) -> "ProcessTask":
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")
        self._launch()
        return self

    def _launch(self) -> None:
        argv = [str(a) for a in self.steps[self.index]]
        self._log.write(f"\n$ {' '.join(argv)}\n")  # type: ignore[union-attr]
        self._log.flush()  # type: ignore[union-attr]
        self._read_at, self._partial = self._log.tell(), b""  # type: ignore[union-attr]  # events: the child's only
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                          cwd=self.cwd, env=self.env, **_popen_kwargs())
        except OSError as exc:
            self._log.write(f"cannot start: {exc}\n")  # type: ignore[union-attr]
            self._finish(127)

    def _read_events(self) -> None:
        """Hand the complete ``{"event": …}`` lines written to the log since the last call to the listener."""
        if self.listener is None:
            return
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._read_at)
                data = fh.read()
        except OSError:
            return
        self._read_at += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.strip()
            if line.startswith(b'{"event"'):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                self.listener.apply(event)

    def _finish(self, code: int) -> None:
        self._read_events()
        self.returncode = code
        self.finished = time.monotonic()
        if self._log is not None:
            self._log.write(f"[{self.title}: exit {code}]\n")
            self._log.close()
            self._log = None

    def poll(self) -> bool:
        """Advance; returns True while still running."""
        if not self.running:
            return False
        if self._proc is None:
            return self.running
        self._read_events()
        code = self._proc.poll()
        if code is None:
            return True
        if code != 0:
            self._finish(code)
            return False
        self.index += 1
        if self.index >= len(self.steps):
            self._finish(0)
            return False
        self._launch()
        return self.running

    def wait(self, timeout: float = 3600.0, interval: float = 0.1) -> int:
        """Block (headless use) until done; kills on timeout. Returns the exit code."""
        end = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > end:
                self.cancel()
                break
            time.sleep(interval)
        return int(self.returncode if self.returncode is not None else -1)

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        if self.running:
            self._finish(-9)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log (its last 64 KiB at most)."""
        return "\n".join(read_log_tail(self.log_path, lines))


def selftest_task(python: str, ext_dir: Path, log_path: Path, out_path: Path,
                  model_args: Sequence[str] = ()) -> ProcessTask:
    """``python -m backend selftest`` in the extension folder, JSON written to ``out_path``."""
    code = ("import subprocess,sys;r=subprocess.run([sys.executable,'-m','backend','selftest',*sys.argv[2:]],"
            "capture_output=True,text=True);open(sys.argv[1],'w').write(r.stdout);"
            "sys.stderr.write(r.stderr);sys.exit(r.returncode)")
    steps = [[python, "-c", code, str(out_path), *model_args]]
    return ProcessTask("Check backend", steps, log_path, cwd=str(ext_dir), env=clean_env(str(ext_dir)),
                       step_titles=("trellis2 selftest",))


def parse_selftest(text: str) -> Optional[dict]:
    """The last JSON object in the self-test output, or None."""
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        start = text.rfind("\n{")
        if start >= 0:
            try:
                return json.loads(text[start + 1:])
            except ValueError:
                return None
    return None


def format_selftest(data: dict, width: int = 90) -> list[str]:
    """Readable ``key: value`` lines of a self-test dict (nested dicts flattened)."""
    lines: list[str] = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}", v)
        else:
            lines.append(f"{prefix}: {value}"[:width])

    walk("", data)
    return lines


# --- model downloads (only when Blender's online access is on and the user asked) -------------------
#
# ``trellis2 download`` (backend/download.py, which also holds the repository table) runs in the backend's
# Python and prints one JSON event per line; :class:`DownloadProgress` turns them into the preferences'
# progress line and, on failure, the error's message and advice.

def _sizes(done: int, total: int) -> str:
    """``1.2 / 2.5 GB`` (the total's unit for both)."""
    scale, unit, digits = (1e9, "GB", 1) if total >= 1e8 else (1e6, "MB", 0)
    return f"{done / scale:.{digits}f} / {total / scale:.{digits}f} {unit}"


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


@dataclass
class DownloadProgress:
    """The state of a ``trellis2 download --json`` child, fed with its events (an :class:`EventListener`)."""

    what: str = "all"
    total_bytes: int = 0
    done_bytes: int = 0       # files verified so far
    current: dict = field(default_factory=dict)
    error: Optional[dict] = None
    finished: bool = False

    def apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "plan":
            self.total_bytes = int(event.get("bytes") or 0)
        elif kind == "file":
            self.current = event
        elif kind == "verified":
            self.done_bytes += int(event.get("total") or 0)
            self.current = event
        elif kind == "error":
            self.error = event
        elif kind == "done":
            self.finished = True

    def fraction(self) -> Optional[float]:
        if not self.total_bytes:
            return None
        now = int(self.current.get("done") or 0) if self.current.get("event") == "file" else 0
        return min(1.0, (self.done_bytes + now) / self.total_bytes)

    def text(self) -> str:
        """E.g. ``TRELLIS.2-4B · ckpts/… 3/12 · 1.2 / 2.5 GB``."""
        c = self.current
        if not c:
            return ""
        folder = str(c.get("repo", "")).rpartition("/")[2]
        where = f"{folder} · {_short(str(c.get('file', '')))} {c.get('index', 0)}/{c.get('count', 0)}"
        if c.get("event") == "verified":
            return f"{where} · verified"
        return f"{where} · {_sizes(int(c.get('done') or 0), int(c.get('total') or 0))}"


def download_task(python: str, models_root: str, log_path: Path, *, models: bool = True, rembg: bool = True,
                  token: str = "", ext_dir: Optional[Path] = None) -> ProcessTask:
    """``python -m backend download --json`` in the extension folder, its events parsed into a
    :class:`DownloadProgress` (the task's ``listener``).

    Folders are laid out the way the backend's loader looks for them (``<root>/TRELLIS.2-4B``,
    ``<root>/TRELLIS-image-large/ckpts``, ``<root>/dinov3-…``, ``<root>/BiRefNet``; see
    ``backend.download.MODEL_REPOS``). ``token`` goes to the child as ``HF_TOKEN`` only (empty: the
    token of ``hf auth login``); it is in no argv and no log. One step, so the caller may drop it from
    ``task.env`` once the task started.
    """
    what = "all" if models and rembg else "models" if models else "rembg"
    ext = Path(ext_dir) if ext_dir is not None else Path(__file__).resolve().parent
    env = clean_env(str(ext))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if token.strip():
        env["HF_TOKEN"] = token.strip()
    steps = [[python, "-m", "backend", "download", "--root", str(models_root), "--what", what, "--json"]]
    titles = (", ".join(r.repo_id for r in repos_for(what)),)
    return ProcessTask("Download models", steps, log_path, cwd=str(ext), env=env, step_titles=titles,
                       listener=DownloadProgress(what=what))

