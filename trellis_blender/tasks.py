"""Non-blocking helper processes (environment creation, self-test, model downloads).

Pure Python (stdlib only), so it is importable and testable without Blender. A :class:`ProcessTask`
runs a list of argv steps one after another, writes their output to a log file and is advanced by
:meth:`ProcessTask.poll`, called from a Blender timer (or in a loop when Blender runs headless,
where timers never fire).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

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
        try:
            text = Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def venv_python(env_dir: str, platform: Optional[str] = None) -> Path:
    """The interpreter inside a venv folder (``platform``: a ``sys.platform`` value; default: this one)."""
    windows = platform == "win32" if platform is not None else os.name == "nt"
    if windows:
        return Path(env_dir) / "Scripts" / "python.exe"
    return Path(env_dir) / "bin" / "python"


def requirements_path(ext_dir: Path) -> Path:
    """The backend's pinned requirements bundled with the extension (raises if the file is missing)."""
    path = Path(ext_dir) / "backend" / "requirements.txt"
    if not path.is_file():
        raise FileNotFoundError(f"The extension is incomplete: {path} is missing. Reinstall the add-on.")
    return path


def requirements_for(ext_dir: Path) -> list[str]:
    """pip arguments installing the backend's pinned requirements bundled with the extension."""
    return ["-r", str(requirements_path(ext_dir))]


# --- torch build for "Create backend environment" --------------------------------------------------
#
# PyPI's torch==2.13.0 is a CUDA 13.0 build on Linux x86-64 but a CPU-only build on Windows, and
# users with drivers that predate CUDA 13 need a CUDA 12.x build. PyTorch's own indexes
# (download.pytorch.org/whl/<tag>) carry every build together with torch's dependencies. When a build
# needs such an index, the environment is made in two pip steps:
#   A. pip install --force-reinstall torch==<pin> --index-url <index>    (torch + its deps, that index only)
#   B. pip install -r backend/requirements.txt                           (torch==<pin> already met)
# ``==<pin>`` in B is satisfied by A's local build (2.13.0+cu128 matches ==2.13.0, PEP 440), so B does
# not replace it. --force-reinstall makes A swap the build when an existing environment folder is
# reused with another choice (pip would otherwise accept any installed 2.13.0). The pin is read from
# the bundled requirements.txt, the one source of truth.

PYTORCH_INDEX = "https://download.pytorch.org/whl/"

# (identifier, UI name, description); the order is the preference's enum order.
TORCH_BUILDS: tuple[tuple[str, str, str], ...] = (
    ("AUTO", "Auto",
     "Linux: PyPI's torch (the CUDA 13.0 build); Windows: PyTorch's CUDA 13.0 index (PyPI only has a "
     "CPU build there); macOS: PyPI's torch"),
    ("CU130", "CUDA 13.0", "PyTorch's cu130 index (needs NVIDIA driver 580 or newer)"),
    ("CU128", "CUDA 12.8", "PyTorch's cu128 index (for NVIDIA drivers older than 580)"),
    ("CU126", "CUDA 12.6", "PyTorch's cu126 index (for NVIDIA drivers older than 580)"),
    ("CPU", "CPU only", "PyTorch's cpu index: smallest download, no GPU (very slow)"),
    ("CUSTOM", "Custom index", "torch from a pip index URL you enter"),
)

_BUILD_TAGS = {"CU130": "cu130", "CU128": "cu128", "CU126": "cu126", "CPU": "cpu"}


def _os_of(platform: str) -> str:
    if platform == "win32":
        return "windows"
    if platform == "darwin":
        return "macos"
    return "linux"


def torch_pin(ext_dir: Path) -> str:
    """The version in the ``torch==X`` line of the bundled requirements.txt."""
    path = requirements_path(ext_dir)
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.fullmatch(r"torch\s*==\s*([0-9][^\s;,]*)\s*(;.*)?", line)
        if m:
            return m.group(1)
    raise ValueError(f"{path} has no 'torch==<version>' line; reinstall the add-on.")


def torch_index_url(build: str, custom_url: str = "", platform: Optional[str] = None) -> Optional[str]:
    """The pip index torch is installed from for ``build``, or None for PyPI (requirements.txt only).

    Raises ``ValueError`` for an unknown build, a CUDA build on macOS and a CUSTOM build whose URL
    is empty or not http(s).
    """
    plat = _os_of(platform or sys.platform)
    if build == "AUTO":
        return PYTORCH_INDEX + "cu130" if plat == "windows" else None
    if build == "CUSTOM":
        url = (custom_url or "").strip()
        if not url:
            raise ValueError("Torch build 'Custom index': enter the index URL first")
        if not re.match(r"https?://[^\s/]+", url, re.IGNORECASE):
            raise ValueError(f"Torch build 'Custom index': {url!r} is not an http(s) URL")
        return url
    if build not in _BUILD_TAGS:
        raise ValueError(f"Unknown torch build {build!r} (one of {', '.join(b for b, _, _ in TORCH_BUILDS)})")
    if plat == "macos" and build != "CPU":
        raise ValueError("PyTorch has no CUDA builds for macOS; choose Auto or CPU only")
    return PYTORCH_INDEX + _BUILD_TAGS[build]


def torch_build_hint(build: str, platform: Optional[str] = None) -> str:
    """One line for the preferences: what ``build`` installs here and what it needs."""
    plat = _os_of(platform or sys.platform)
    if plat == "macos" and build in ("CU130", "CU128", "CU126"):
        return "No CUDA builds of torch exist for macOS: choose Auto or CPU only"
    if build == "AUTO":
        if plat == "macos":
            return "PyPI's torch for macOS: no CUDA, the backend runs on the CPU (very slow)"
        where = "PyTorch's cu130 index" if plat == "windows" else "PyPI"  # PyPI: CPU-only on Windows
        return f"CUDA 13.0 build from {where}: NVIDIA driver 580+ (older: CUDA 12.x)"
    if build == "CU130":
        return "CUDA 13.0 build: needs NVIDIA driver 580 or newer"
    if build in ("CU128", "CU126"):
        ver = "12.8" if build == "CU128" else "12.6"
        return f"CUDA {ver} build: for NVIDIA drivers older than 580 (CUDA 12)"
    if build == "CPU":
        return "CPU-only build: smallest download, no GPU use (generation is very slow)"
    if build == "CUSTOM":
        return "torch from the index URL below (pip --index-url); the other packages from PyPI"
    return ""


def _env_plan(env_dir: str, ext_dir: Path, build: str, custom_url: str, platform: str,
              base_python: str) -> list[tuple[str, list[str]]]:
    req = requirements_path(ext_dir)  # first: a missing file is the clearest error
    pin = torch_pin(ext_dir)          # the bundle must pin torch, whichever build is chosen
    url = torch_index_url(build, custom_url, platform)
    py = str(venv_python(env_dir, platform))
    plan = [("create venv", [base_python, "-m", "venv", env_dir]),
            ("upgrade pip", [py, "-m", "pip", "install", "--upgrade", "pip"])]
    if url is not None:
        tag = next((t for b, t in _BUILD_TAGS.items() if PYTORCH_INDEX + t == url), None)
        title = f"install torch ({tag})" if tag else "install torch (custom index)"
        plan.append((title, [py, "-m", "pip", "install", "--force-reinstall", f"torch=={pin}",
                             "--index-url", url]))
    plan.append(("install backend requirements", [py, "-m", "pip", "install", "-r", str(req)]))
    return plan


def env_install_plan(env_dir: str, ext_dir: Path, build: str = "AUTO", custom_url: str = "",
                     platform: Optional[str] = None, base_python: Optional[str] = None) -> list[list[str]]:
    """The argv steps that make the backend environment (see the comment above ``TORCH_BUILDS``).

    Raises ``FileNotFoundError`` when the bundled requirements.txt is missing and ``ValueError`` for
    a build that cannot apply (no torch pin, CUDA on macOS, a bad custom URL).
    """
    return [argv for _, argv in _env_plan(env_dir, ext_dir, build, custom_url, platform or sys.platform,
                                          base_python or sys.executable)]


def create_env_task(env_dir: str, ext_dir: Path, log_path: Path, base_python: Optional[str] = None,
                    build: str = "AUTO", custom_url: str = "") -> ProcessTask:
    """Steps: make a venv, upgrade pip, [install torch from the build's index], install the backend
    requirements. Raises like :func:`env_install_plan`."""
    plan = _env_plan(env_dir, ext_dir, build, custom_url, sys.platform, base_python or sys.executable)
    return ProcessTask("Create backend environment", [argv for _, argv in plan], log_path, env=clean_env(),
                       step_titles=tuple(title for title, _ in plan))


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


# --- model folders: checked in ``model_folders`` (names kept here for the preferences and scripts) ---

from .model_folders import (MODEL_KINDS, find_model_folder, forget_folder_status,  # noqa: E402,F401
                            model_folder_problem, model_folder_status)


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

