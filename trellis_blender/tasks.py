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
from typing import Optional, Sequence

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


@dataclass
class ProcessTask:
    """Runs ``steps`` (argv lists, never a shell) in order; output goes to ``log_path``."""

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
    _proc: Optional[subprocess.Popen] = None
    _log: Optional[object] = None

    @property
    def running(self) -> bool:
        return self.returncode is None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def fraction(self) -> float:
        n = max(1, len(self.steps))
        return min(1.0, (self.index + (1.0 if not self.running else 0.5)) / n) if self.steps else 1.0

    def status_text(self) -> str:
        n = len(self.steps)
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
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                          cwd=self.cwd, env=self.env, **_popen_kwargs())
        except OSError as exc:
            self._log.write(f"cannot start: {exc}\n")  # type: ignore[union-attr]
            self._finish(127)

    def _finish(self, code: int) -> None:
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

DOWNLOADS: tuple[tuple[str, str, Optional[list]], ...] = (
    # (Hugging Face repo, folder name next to the TRELLIS.2 snapshot, allow_patterns). The gated DINOv3
    # comes first: a missing licence acceptance / login fails in seconds, not after the 16 GB model.
    ("facebook/dinov3-vitl16-pretrain-lvd1689m", "dinov3-vitl16-pretrain-lvd1689m", None),
    ("microsoft/TRELLIS-image-large", "TRELLIS-image-large", ["ckpts/ss_dec_conv3d_16l8_fp16.*"]),
    ("microsoft/TRELLIS.2-4B", "TRELLIS.2-4B", None),
)
#: The background remover (MIT, ungated): only the weights and config, never its remote code.
REMBG_DOWNLOAD: tuple[str, str, Optional[list]] = ("ZhengPeng7/BiRefNet", "BiRefNet", ["model.safetensors", "config.json"])

# One download step, run by the backend's Python: ``python -c CODE REPO FOLDER PATTERNS_JSON``. A gated
# or unauthorised repository ends with an explanation of what to do (exit code 3), not a traceback.
_DOWNLOAD_CODE = """\
import json, sys
from huggingface_hub import snapshot_download
repo, folder, patterns = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    snapshot_download(repo, local_dir=folder, allow_patterns=patterns)
except Exception as e:
    text = f"{type(e).__name__}: {e}"
    if type(e).__name__ in ("GatedRepoError", "RepositoryNotFoundError") or " 401" in text or " 403" in text:
        sys.stderr.write(f"\\n{repo} is a gated repository (or needs a login): open https://huggingface.co/{repo} , "
                         "accept its licence, log in with `hf auth login` (or set HF_TOKEN), then press "
                         f"Download Models again.\\n({text.splitlines()[0]})\\n")
        sys.exit(3)
    raise
"""


def download_task(python: str, models_root: str, log_path: Path, *, models: bool = True,
                  rembg: bool = True) -> ProcessTask:
    """Download the weights with ``huggingface_hub.snapshot_download`` in the backend's Python.

    Folders are laid out the way the backend's loader looks for them: ``<root>/TRELLIS.2-4B``,
    ``<root>/TRELLIS-image-large/ckpts`` (sparse-structure decoder) and ``<root>/dinov3-…`` (DINOv3 is a
    gated repository: accept its licence on huggingface.co and log in with ``hf auth login`` first);
    ``rembg`` adds ``<root>/BiRefNet`` (the background remover, ~440 MB, ungated).
    """
    steps, titles = [], []
    for repo, folder, patterns in (DOWNLOADS if models else ()) + ((REMBG_DOWNLOAD,) if rembg else ()):
        steps.append([python, "-c", _DOWNLOAD_CODE, repo, str(Path(models_root) / folder), json.dumps(patterns)])
        titles.append(f"download {repo}")
    env = clean_env()
    env.pop("HF_HUB_OFFLINE", None)
    return ProcessTask("Download models", steps, log_path, env=env, step_titles=titles)
