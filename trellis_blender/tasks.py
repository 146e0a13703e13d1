"""Non-blocking helper processes (environment creation, self-test) and model-folder checks.

Pure Python (stdlib only), so it is importable and testable without Blender. A :class:`ProcessTask`
runs a list of argv steps one after another, writes their output to a log file and is advanced by
:meth:`ProcessTask.poll`, called from a Blender timer (or in a loop when Blender runs headless,
where timers never fire).
"""

from __future__ import annotations

import json
import os
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


def venv_python(env_dir: str) -> Path:
    """The interpreter inside a venv folder."""
    if os.name == "nt":
        return Path(env_dir) / "Scripts" / "python.exe"
    return Path(env_dir) / "bin" / "python"


def requirements_for(ext_dir: Path) -> list[str]:
    """pip arguments installing the backend's pinned requirements bundled with the extension."""
    path = Path(ext_dir) / "backend" / "requirements.txt"
    if not path.is_file():
        raise FileNotFoundError(f"The extension is incomplete: {path} is missing. Reinstall the add-on.")
    return ["-r", str(path)]


def create_env_task(env_dir: str, ext_dir: Path, log_path: Path, base_python: Optional[str] = None) -> ProcessTask:
    """Steps: make a venv, upgrade pip, install the backend requirements."""
    base = base_python or sys.executable
    py = str(venv_python(env_dir))
    steps = [
        [base, "-m", "venv", env_dir],
        [py, "-m", "pip", "install", "--upgrade", "pip"],
        [py, "-m", "pip", "install", *requirements_for(ext_dir)],
    ]
    return ProcessTask("Create backend environment", steps, log_path, env=clean_env(),
                       step_titles=("create venv", "upgrade pip", "install backend requirements"))


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


# --- model folders ----------------------------------------------------------------------------------

MODEL_KINDS = {
    "trellis": ("TRELLIS.2-4B snapshot", ("pipeline.json",), "ckpts"),
    "dinov3": ("DINOv3 image encoder", ("config.json",), None),
    "rembg": ("background removal (optional)", (), None),
}


_STATUS_CACHE: dict[tuple[str, str], tuple[float, tuple[str, str]]] = {}


def model_folder_status(path: str, kind: str, max_age: float = 5.0) -> tuple[str, str]:
    """``(icon, text)`` describing a model folder (cached for ``max_age`` s, as draw() calls it often)."""
    now = time.monotonic()
    hit = _STATUS_CACHE.get((path, kind))
    if hit is not None and now - hit[0] < max_age:
        return hit[1]
    result = _model_folder_status(path, kind)
    _STATUS_CACHE[(path, kind)] = (now, result)
    return result


def _model_folder_status(path: str, kind: str) -> tuple[str, str]:
    label, required, subdir = MODEL_KINDS[kind]
    if not path:
        return ("INFO", f"{label}: not set" + (" (skipped)" if kind == "rembg" else ""))
    p = Path(os.path.expanduser(path))
    if not p.is_dir():
        return ("ERROR", f"{label}: folder not found")
    missing = [r for r in required if not (p / r).is_file()]
    if missing:
        return ("ERROR", f"{label}: missing {', '.join(missing)}")
    weights = list(p.rglob("*.safetensors"))
    if subdir and not (p / subdir).is_dir():
        return ("ERROR", f"{label}: no {subdir}/ folder")
    if not weights:
        return ("ERROR", f"{label}: no .safetensors weights")
    size = sum(w.stat().st_size for w in weights)
    return ("CHECKMARK", f"{label}: {len(weights)} weight files, {size / 2**30:.2f} GiB")


# --- model downloads (only when Blender's online access is on and the user asked) -------------------

DOWNLOADS: tuple[tuple[str, str, Optional[list]], ...] = (
    # (Hugging Face repo, folder name next to the TRELLIS.2 snapshot, allow_patterns)
    ("microsoft/TRELLIS.2-4B", "TRELLIS.2-4B", None),
    ("microsoft/TRELLIS-image-large", "TRELLIS-image-large", ["ckpts/ss_dec_conv3d_16l8_fp16.*"]),
    ("facebook/dinov3-vitl16-pretrain-lvd1689m", "dinov3-vitl16-pretrain-lvd1689m", None),
)


def download_task(python: str, models_root: str, log_path: Path) -> ProcessTask:
    """Download the weights with ``huggingface_hub.snapshot_download`` in the backend's Python.

    Folders are laid out the way the backend's loader looks for them: ``<root>/TRELLIS.2-4B``,
    ``<root>/TRELLIS-image-large/ckpts`` (sparse-structure decoder) and ``<root>/dinov3-…`` (DINOv3 is a
    gated repository: accept its licence on huggingface.co and log in with ``hf auth login`` first).
    """
    steps, titles = [], []
    for repo, folder, patterns in DOWNLOADS:
        code = ("import sys,json;from huggingface_hub import snapshot_download;"
                "snapshot_download(sys.argv[1],local_dir=sys.argv[2],allow_patterns=json.loads(sys.argv[3]))")
        steps.append([python, "-c", code, repo, str(Path(models_root) / folder), json.dumps(patterns)])
        titles.append(f"download {repo}")
    env = clean_env()
    env.pop("HF_HUB_OFFLINE", None)
    return ProcessTask("Download models", steps, log_path, env=env, step_titles=titles)
