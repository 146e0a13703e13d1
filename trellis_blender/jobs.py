"""Job bookkeeping between the operators and the backend client (pure Python + numpy, no bpy).

A :class:`JobManager` owns the backend client, sends job requests, and applies backend messages to
one :class:`JobRecord` per job (the job model of :mod:`.job_model` plus the request, the result
message with its arrays, notes). Its :meth:`JobManager.poll` is a plain function: a Blender timer
calls it in the UI, the blocking operators call it in a loop in background mode (timers never fire
there), tests call it directly.
No bpy here: applying a result to the scene is the operators' job.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import core
from .backend.errors import HINTS
from .backend.jobs import Job, new_job_id
from .job_model import JobState

#: Advice per error kind: the one table in ``backend/errors.py`` (shared with the backend).
ERROR_HINTS = HINTS
STAGE_LABELS = {
    "preprocess": "Preprocess", "cond": "Image features", "sparse_structure": "Structure",
    "shape_slat": "Shape", "shape_slat_lr": "Shape LR", "shape_slat_hr": "Shape HR", "shape_lr": "Shape LR",
    "shape_hr": "Shape HR", "tex_slat": "Texture", "texture": "Texture", "decode": "Decode",
    "postprocess": "Post-process", "unwrap": "UV unwrap", "bake": "Bake",
}


def file_hash(path: str, n_hex: int = 16) -> str:
    """Short SHA-256 of a file's bytes (the image hash stored on generated objects)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n_hex]


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")


def check_image_file(path: str) -> Optional[str]:
    """None when ``path`` looks like a readable image, else a user-facing reason."""
    if not path:
        return "No input image: pick an image or a file"
    if not os.path.isfile(path):
        return f"Image file not found: {path}"
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"Cannot read the image: {exc}"
    if not head:
        return f"The image file is empty: {os.path.basename(path)}"
    if not any(head.startswith(m) for m in _IMAGE_MAGIC) or (head.startswith(b"RIFF") and head[8:12] != b"WEBP"):
        return f"Not a supported image (PNG, JPEG, WebP, BMP, TIFF): {os.path.basename(path)}"
    return None


def format_eta(seconds: float) -> str:
    if seconds <= 0 or seconds != seconds:
        return ""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


@dataclass
class JobRecord(JobState):
    """One job as the add-on sees it: the job model plus what only the add-on keeps.

    ``status`` is the model's ``state`` in the add-on's words (a ``lost`` job reads ``failed``),
    ``job_id`` its ``id``, ``error`` its ``error_message``.
    """

    request: dict
    extra: dict = field(default_factory=dict)   # add-on side data (target object names, UVs, …)
    result: Optional[dict] = None  # the backend's result message (meta, arrays, folder)
    applied: bool = False
    notes: list = field(default_factory=list)   # backend warnings that concern this job's result

    @property
    def job_id(self) -> str:
        return self.id

    @property
    def status(self) -> str:
        """queued | running | done | failed | cancelled"""
        return "failed" if self.state == "lost" else self.state

    @status.setter
    def status(self, value: str) -> None:
        self.state = value

    @property
    def error(self) -> str:
        return self.error_message

    @error.setter
    def error(self, value: str) -> None:
        self.error_message = value

    def apply(self, msg: dict) -> None:
        """:meth:`JobState.apply`, keeping the whole ``result`` message (arrays included)."""
        super().apply(msg)
        if msg.get("type") == "result":
            self.result = msg

    def progress_text(self) -> str:
        if self.status == "queued":
            return "Waiting for the backend…"
        label = STAGE_LABELS.get(self.stage, self.stage.replace("_", " ").title() or "Working")
        text = f"{label} {self.step}/{self.total}" if self.total else label
        eta = format_eta(self.eta())
        return f"{text} · {eta}" if eta else text


class JobManager:
    """Owns the backend client and the job records. ``client_factory()`` returns a started client."""

    def __init__(self, client_factory: Callable[[], Any]) -> None:
        self._factory = client_factory
        self.client: Any = None
        self.jobs: dict[str, JobRecord] = {}
        self.backend_state = "STOPPED"   # STOPPED STARTING READY BUSY CRASHED
        self.backend_info = ""
        self.last_error: Optional[JobRecord] = None
        self.crash_message = ""

    # -- backend lifecycle
    @property
    def alive(self) -> bool:
        """True while the backend process runs."""
        return self.client is not None and bool(getattr(self.client, "running", False))

    def ensure_started(self) -> Any:
        if self.client is None:
            self.client = self._factory()
        if not self.alive:
            self.client.start()
            self.backend_state = "STARTING"
            self.crash_message = ""
        return self.client

    def stop(self) -> None:
        c, self.client = self.client, None
        if c is not None:
            for name in ("stop", "shutdown", "close"):
                fn = getattr(c, name, None)
                if callable(fn):
                    fn()
                    break
        self.backend_state = "STOPPED"

    shutdown = stop

    def unload(self) -> None:
        if self.client is not None and self.alive:
            self.client.unload()

    def log_path(self) -> str:
        c = self.client
        for name in ("log_path", "log_file"):
            value = getattr(c, name, None) if c is not None else None
            if value:
                return str(value)
        return ""

    # -- jobs
    def submit(self, kind: str, request: dict, extra: Optional[dict] = None, job_id: Optional[str] = None) -> JobRecord:
        client = self.ensure_started()
        job_id = job_id or new_job_id(kind)
        msg = dict(request)
        msg["type"] = kind
        msg["job"] = job_id
        rec = JobRecord(job_id, kind, {k: v for k, v in msg.items() if k != "arrays"}, extra or {})
        self.jobs[job_id] = rec
        client.submit(msg)
        info = client.jobs.get(job_id)
        if info is not None and info.state == "lost":   # the backend is not accepting jobs
            end = time.monotonic() + 2.0   # collect the exit report (code, log hint) if it comes
            while self.backend_state != "CRASHED" and time.monotonic() < end:
                if not self.poll():
                    time.sleep(0.02)
            rec.lose(self.crash_message or info.error_message or "The backend is not accepting jobs")
            self.last_error = rec
        return rec

    def cancel(self, job_id: Optional[str] = None) -> None:
        if self.client is None:
            return
        fn = getattr(self.client, "cancel", None)
        if callable(fn):
            fn(job_id)
        else:
            self.client.send({"type": "cancel", "job": job_id})

    def active(self) -> Optional[JobRecord]:
        """The newest job still running or queued."""
        live = [r for r in self.jobs.values() if not r.done]
        return max(live, key=lambda r: r.started) if live else None

    def poll(self) -> list[dict]:
        """Drain the client's messages and update the records; returns the messages handled."""
        if self.client is None:
            return []
        msgs = list(self.client.poll() or [])
        for msg in msgs:
            self._handle(msg)
        return msgs

    def _crashed(self, code: Any, text: str = "") -> None:
        self.backend_state = "CRASHED"
        self.crash_message = text or f"Backend stopped (code {code})"
        for rec in self.jobs.values():
            if not rec.done:
                rec.lose(self.crash_message)
                self.last_error = rec

    def _handle(self, msg: dict) -> None:
        mtype = msg.get("type")
        rec = self.jobs.get(msg.get("job") or "")
        if mtype == "hello":
            self.backend_state = "READY"
            self.backend_info = " · ".join(str(x) for x in (f"v{msg.get('backend_version')}",
                                                            f"Python {msg.get('python')}") if x)
        elif mtype == "status":
            state = str(msg.get("state") or "")
            dev = " ".join(str(msg[k]) for k in ("device", "gpu") if msg.get(k))
            if dev:
                vram = msg.get("vram_used")
                self.backend_info = dev + (f" · {vram / 2**30:.1f} GiB used" if vram else "")
            self.backend_state = {"busy": "BUSY", "loading": "BUSY", "ready": "READY",
                                  "stopping": "STOPPED"}.get(state, self.backend_state)
        elif mtype == "exited":
            if msg.get("expected"):
                self.backend_state = "STOPPED"
            else:
                self._crashed(msg.get("rc"), str(msg.get("reason") or ""))
                if msg.get("hint"):
                    self.crash_message += f" — {msg['hint']}"
        elif mtype == "log" and rec is None:
            budget = core.token_budget_note(str(msg.get("text") or ""))
            active = self.active()
            if budget is not None and active is not None:   # one job runs at a time: the log is its
                active.notes.append(budget)
        elif rec is None:
            if mtype == "error" and not msg.get("job"):
                self.crash_message = str(msg.get("message", ""))
            return
        else:
            rec.apply(msg)
            if mtype == "error":
                self.last_error = rec

    def wait(self, rec: JobRecord, timeout: float = 3600.0, interval: float = 0.02,
             on_progress: Optional[Callable[[JobRecord], None]] = None) -> JobRecord:
        """Block until ``rec`` is done (headless / scripting use); cancels on timeout."""
        end = time.monotonic() + timeout
        while not rec.done:
            if not self.poll():
                time.sleep(interval)
            if on_progress is not None:
                on_progress(rec)
            if time.monotonic() > end:
                self.cancel(rec.job_id)
                rec.fail("timeout", f"No result after {timeout:.0f} s")
                break
        return rec


def read_history(jobs_root: Path, limit: int = 200) -> list[dict]:
    """Finished and failed jobs (newest first) from the backend's job folders ``jobs_root/<id>/job.json``.

    Each entry: job, title (the input image's name), kind, pipeline, seed, duration (s), status, error,
    image (input image path or ""), created (epoch seconds), folder, has_result.
    """
    entries: list[dict] = []
    if not Path(jobs_root).is_dir():
        return entries
    for meta_path in Path(jobs_root).glob("*/job.json"):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        folder = meta_path.parent
        job = Job(folder)
        settings = meta.get("settings") or {}
        duration = 0.0
        rmeta = job.result_meta_path
        if rmeta.is_file():
            try:
                duration = float(json.loads(rmeta.read_text(encoding="utf-8")).get("elapsed_s", 0.0))
            except (OSError, ValueError, TypeError):
                pass
        image = job.image_path
        title = core.history_title(settings)
        if not title and meta.get("source_job"):   # an upscale: named after its source's image
            try:
                src = json.loads(Job(folder.parent / str(meta["source_job"])).meta_path.read_text(encoding="utf-8"))
                title = core.history_title(src.get("settings") or {})
            except (OSError, ValueError, TypeError):
                pass
        error = meta.get("error")
        entries.append({
            "title": title, "error": error.get("message", "") if isinstance(error, dict) else str(error or ""),
            "job": meta.get("id", folder.name), "kind": meta.get("kind", ""),
            "pipeline": str(settings.get("pipeline_type", settings.get("target", ""))),
            "seed": int(settings.get("seed") or meta.get("seed") or 0), "duration": duration,
            "status": meta.get("status", ""), "image": str(image) if image.is_file() else "",
            "created": float(meta.get("created", 0.0) or 0.0), "folder": str(folder),
            "has_result": job.result_path.is_file(),
        })
    entries.sort(key=lambda d: d["created"], reverse=True)
    return entries[:limit]
