"""The "Create backend environment" plan: a venv, pip, the right torch build for this machine (CUDA 13 / 12.x,
CPU, or a custom index) and the backend's pinned requirements, run as one :class:`~.tasks.ProcessTask`.
Pure Python (stdlib only), testable without Blender."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

from .tasks import ProcessTask, clean_env

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
