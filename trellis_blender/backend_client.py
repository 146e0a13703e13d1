"""Add-on side client of the backend process: jobs (:mod:`.job_model`) over :class:`~.backend_link.BackendLink`
(stdlib + numpy; no bpy in this module).

The backend runs in its own Python (with torch), started as::

    [python, "-m", "backend", "serve", "--stdio", "--log", LOG, ...]   cwd = PYTHONPATH = extension folder

and speaks :mod:`backend.protocol` frames over its stdin/stdout. A daemon reader thread decodes
frames into a ``queue.Queue``; **Blender's main thread drains it with :meth:`BackendClient.poll`**,
a plain method: a ``bpy.app.timers`` function or a modal operator's TIMER event calls it, and tests
call it directly (timers never fire in the bpy module). No bpy call ever happens off the main
thread, and this module never touches bpy at all.

Typical use (UI side)::

    client = BackendClient(prefs.python_path, ext_dir, log_path=..., cache_dir=..., model_dir=...)
    job = client.generate(image="/path/img.png", seed=1, pipeline_type="1024_cascade")
    # in a timer, every 0.1-0.25 s:
    for msg in client.poll():
        if msg["type"] == "progress": ...          # msg["job"], ["stage"], ["step"], ["total"], ["eta_s"]
        elif msg["type"] == "result": ...          # msg["arrays"]["vertices"], ["faces"], msg["meta"]
        elif msg["type"] == "error": ...           # msg["kind"], ["message"], ["advice"], ["log_tail"]
        elif msg["type"] == "exited": ...          # backend stopped: msg["rc"], ["log_tail"], ["hint"]
    client.state, client.jobs[job].fraction         # for drawing
    client.cancel(job); client.unload(); client.stop()

Messages returned by :meth:`poll` (dicts; backend frames plus two synthetic types):

* ``hello`` {protocol, backend_version, python, numpy, pid, platform}
* ``status`` {state: starting|loading|ready|busy|stopping, loaded, job, queue, torch, cuda, device,
  gpu, vram_total, vram_used}
* ``progress`` {job, stage (``protocol.STAGES``), step, total, elapsed_s (job), stage_elapsed_s, eta_s
  (of the stage; None at step 0)}; a stage may start with a step-0 report
* ``result`` {job, kind: mesh|textures, meta, arrays: {name: ndarray}, folder}
* ``error`` {job | None, kind: oom|missing_dependency|missing_weights|bad_input|internal|protocol|
  crashed, message, advice, traceback_tail, log_tail}
* ``cancelled`` {job, stage, step}
* ``log`` {level, text}; ``pong`` {... echo of the ping}
* synthetic ``exited`` {rc, signal, expected, killed, reason, jobs (lost job ids), log_tail, hint}:
  the process ended; it is followed by one ``error`` {kind: "crashed"} per job that was
  queued or running (or ``cancelled`` if it was being cancelled and had to be killed).

Client states (:attr:`BackendClient.state`): ``stopped`` (never started / stopped on purpose),
``starting`` (spawned, waiting for hello/status), ``loading``, ``ready``, ``busy``, ``stopping``,
``crashed`` (exited unexpectedly; :attr:`last_exit` holds the ``exited`` message). Any job request
while ``stopped``/``crashed`` (re)starts the backend. Jobs (:class:`JobInfo`) are the one job model
of :mod:`.job_model` (states ``queued``, ``running``, ``done``, ``failed``, ``cancelled``, ``lost``: the
backend died under it; Retry re-sends the job id, the backend reuses the inputs kept in its job folder).

Cancel: :meth:`cancel` sends ``cancel{job}``; if the job has not ended ``cancel_timeout`` seconds
later, the next :meth:`poll` kills the whole process group (the ``exited`` message then has
``killed: True``); models reload on the next job.
"""

from __future__ import annotations

import os
import queue
import time
from typing import Any, Callable, Mapping

from .backend import jobs as _jobs
from .backend import protocol
from .backend.errors import read_log_tail
from .backend_link import BackendError, BackendLink, crash_hint, sanitized_env, signal_name, stop_all
from .job_model import JOB_STATES, JobState

__all__ = ["BackendClient", "JobInfo", "BackendError", "sanitized_env", "stop_all", "STATES", "JOB_STATES"]

STATES = ("stopped", "starting", "loading", "ready", "busy", "stopping", "crashed")


class JobInfo(JobState):
    """The client's view of one job (updated by :meth:`BackendClient.poll`)."""

    @property
    def error(self) -> dict[str, Any] | None:
        """``{kind, message, advice}`` once the job failed (or was lost), else None."""
        return {"kind": self.error_kind, "message": self.error_message, "advice": self.advice} \
            if self.error_kind else None


class BackendClient(BackendLink):
    """One backend process and the jobs sent to it (see the module docstring)."""

    def __init__(self, python: str | os.PathLike, ext_dir: str | os.PathLike | None = None, **options: Any) -> None:
        """``options``: see :class:`~.backend_link.BackendLink` (log/cache/model folders, device, timeouts...)."""
        super().__init__(python, ext_dir, **options)
        self.info: dict[str, Any] = {}        # latest status fields (device, vram, loaded...)
        self.jobs: dict[str, JobInfo] = {}
        self.last_exit: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        self._cancel_deadline: dict[str, float] = {}
        self._backlog: list[dict[str, Any]] = []

    def _start_session(self, out_stream: Any, read: Callable[..., None], read_args: tuple, name: str) -> None:
        self._cancel_deadline.clear()
        super()._start_session(out_stream, read, read_args, name)

    # ------------------------------------------------------------------ jobs
    def submit(self, msg: Mapping[str, Any]) -> str:
        """Send a job request (``generate``/``texture``/``upscale``), starting the backend if it is
        stopped or crashed. A missing ``job`` id is generated. Returns the job id."""
        msg = dict(msg)
        if msg.get("type") not in protocol.JOB_MESSAGES:
            raise ValueError(f"not a job message: {msg.get('type')!r}")
        job = msg.setdefault("job", _jobs.new_job_id(msg["type"]))
        if not _jobs.valid_job_id(job):
            raise ValueError(f"invalid job id {job!r}")
        if not self.running:
            if self.state == "crashed":
                self.restarts += 1
            self.start()
        self.jobs[job] = JobInfo(id=job, kind=msg["type"])
        if not self.send(msg):
            self.jobs[job].lose("The backend is not accepting jobs.")
        return job

    def generate(self, *, image: str | os.PathLike | None = None, image_png: bytes | None = None,
                 job: str | None = None, **settings: Any) -> str:
        """Queue an image->3D job (``image`` path, or ``image_png`` bytes of an internal image).

        ``settings``: seed, pipeline_type, stage_params, decimation_target, texture_size, output,
        background (auto|remove|keep)...
        """
        return self._image_job("generate", image, image_png, job, settings)

    def cutout(self, *, image: str | os.PathLike | None = None, image_png: bytes | None = None,
               job: str | None = None, **settings: Any) -> str:
        """Queue a cut-out preview: only the backend's preprocessing runs (background removal, crop);
        the result's ``arrays["preprocessed"]`` is the image the model would see."""
        return self._image_job("cutout", image, image_png, job, settings)

    def _image_job(self, kind: str, image: str | os.PathLike | None, image_png: bytes | None, job: str | None,
                   settings: dict[str, Any]) -> str:
        msg: dict[str, Any] = {"type": kind, **settings}
        if job:
            msg["job"] = job
        if image is not None:
            msg["image"] = str(image)
        if image_png is not None:
            msg["arrays"] = {"image_png": image_png}
        return self.submit(msg)

    def texture(self, vertices, faces, *, uvs=None, image: str | os.PathLike | None = None,
                image_png: bytes | None = None, job: str | None = None, **settings: Any) -> str:
        """Queue a texture job for a triangulated mesh (``uvs`` per corner, float32 [F*3, 2])."""
        arrays: dict[str, Any] = {"vertices": vertices, "faces": faces}
        if uvs is not None:
            arrays["uvs"] = uvs
        if image_png is not None:
            arrays["image_png"] = image_png
        msg: dict[str, Any] = {"type": "texture", "arrays": arrays, **settings}
        if image is not None:
            msg["image"] = str(image)
        if job:
            msg["job"] = job
        return self.submit(msg)

    def upscale(self, source_job: str, *, target: str = "1536_cascade", job: str | None = None,
                **settings: Any) -> str:
        """Queue an upscale of a finished job (reuses its conditioning and seed)."""
        msg: dict[str, Any] = {"type": "upscale", "source_job": source_job, "target": target, **settings}
        if job:
            msg["job"] = job
        return self.submit(msg)

    def retry(self, job: str, *, kind: str | None = None, **overrides: Any) -> str:
        """Re-run a job with the same id: the backend reuses the inputs (image, mesh) and the
        settings stored in its job folder; ``overrides`` replace individual settings."""
        info = self.jobs.get(job)
        kind = kind or (info.kind if info else "generate")
        return self.submit({**overrides, "type": kind, "job": job})

    def cancel(self, job: str | None = None) -> bool:
        """Soft-cancel ``job`` (or all jobs); hard kill if no answer within ``cancel_timeout``."""
        targets = [j for j, info in self.jobs.items() if info.active and (job is None or j == job)]
        if not targets:
            return False
        deadline = time.monotonic() + self.cancel_timeout
        for j in targets:
            self._cancel_deadline[j] = deadline
        msg: dict[str, Any] = {"type": "cancel"}
        if job is not None:
            msg["job"] = job
        return self.send(msg)

    def unload(self) -> bool:
        """Ask the backend to free its models and GPU memory."""
        return self.send({"type": "unload"})

    def ping(self, **fields: Any) -> bool:
        """Send a ``ping``; the backend answers ``pong`` with the same fields/arrays."""
        return self.send({"type": "ping", **fields})

    # ------------------------------------------------------------------ receiving (main thread)
    def poll(self, max_messages: int | None = None) -> list[dict[str, Any]]:
        """Drain the reader queue (non-blocking), update :attr:`state` / :attr:`jobs`, enforce the
        cancel timeout. Returns the messages in arrival order (see the module docstring)."""
        out: list[dict[str, Any]] = []
        if self._backlog:  # already applied; left over by wait_for
            k = len(self._backlog) if max_messages is None else max_messages
            out, self._backlog = self._backlog[:k], self._backlog[k:]
        while max_messages is None or len(out) < max_messages:
            try:
                gen, msg = self._queue.get_nowait()
            except queue.Empty:
                break
            if gen != self._gen:
                continue  # from a process we already replaced
            out.extend(self._apply(msg))
        if self._cancel_deadline and self.running:
            now = time.monotonic()
            overdue = [j for j, t in self._cancel_deadline.items()
                       if now >= t and j in self.jobs and self.jobs[j].active]
            if overdue:
                self.kill(reason=f"no answer to cancel within {self.cancel_timeout:g} s")
        return out

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                 interval: float = 0.005) -> list[dict[str, Any]]:
        """Poll until a message satisfies ``predicate``; return the messages seen, ending with that
        one (later ones stay queued for the next :meth:`poll`). Outside Blender only (tests,
        scripts): it blocks. Raises ``TimeoutError`` naming the messages seen so far."""
        seen: list[dict[str, Any]] = []
        end = time.monotonic() + timeout
        while True:
            msgs = self.poll()
            for i, m in enumerate(msgs):
                if predicate(m):
                    self._backlog = msgs[i + 1:] + self._backlog
                    return seen + msgs[:i + 1]
            seen.extend(msgs)
            if time.monotonic() >= end:
                raise TimeoutError(f"no matching message within {timeout} s; got {[m['type'] for m in seen]}")
            time.sleep(interval)

    def _apply(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        t = msg.get("type")
        job = self.jobs.get(msg.get("job") or "")
        if t == "hello":
            self.hello = msg
            if msg.get("protocol") != protocol.PROTOCOL_VERSION:
                err = {"type": "error", "job": None, "kind": "protocol",
                       "message": f"Backend speaks protocol {msg.get('protocol')}, the add-on "
                                  f"{protocol.PROTOCOL_VERSION}: reinstall the extension.",
                       "advice": None, "traceback_tail": [], "log_tail": []}
                self.last_error = err
                self.kill(reason="protocol mismatch")
                return [msg, err]
        elif t == "status":
            self.info.update({k: v for k, v in msg.items() if k != "type"})
            if self.state not in ("stopping",):
                self.state = msg.get("state", self.state)
        elif t == "error":
            self.last_error = msg
        elif t == "exited":
            return self._on_exit(msg)
        if job is not None:
            job.apply(msg)
            if t in ("result", "error", "cancelled"):
                self._cancel_deadline.pop(job.id, None)
        return [msg]

    def _on_exit(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        rc = msg.get("rc")
        lines = read_log_tail(self.log_path)
        killed = self._kill_reason is not None
        expected = self._expect_exit
        lost = [j for j, info in self.jobs.items() if info.active]
        reason = self._kill_reason or ("stopped" if expected else msg.get("reason") or
                                       f"Backend stopped (code {rc}{', ' + signal_name(rc) if signal_name(rc) else ''})")
        exited = {"type": "exited", "rc": rc, "signal": signal_name(rc), "expected": expected,
                  "killed": killed, "reason": reason, "jobs": lost, "log_tail": lines,
                  "hint": None if expected else crash_hint(lines)}
        out: list[dict[str, Any]] = []
        for j in lost:
            info = self.jobs[j]
            info.lose(reason, exited["hint"], cancelled=killed and j in self._cancel_deadline)
            if info.state == "cancelled":
                out.append({"type": "cancelled", "job": j, "stage": info.stage, "step": info.step, "killed": True})
            else:
                out.append({"type": "error", "job": j, "kind": "crashed", "message": reason,
                            "advice": exited["hint"], "traceback_tail": [], "log_tail": lines})
        self._cancel_deadline.clear()
        self.last_exit = exited
        self.state = "stopped" if expected else "crashed"
        self._cleanup_process()
        return [exited] + out

    # ------------------------------------------------------------------ helpers
    def log_tail(self, lines: int = 30) -> list[str]:
        """The last lines of the backend log file."""
        return read_log_tail(self.log_path, lines)

    def active_jobs(self) -> list[JobInfo]:
        return [j for j in self.jobs.values() if j.active]
