"""Add-on side client of the backend process (stdlib + numpy; no bpy in this module).

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
while ``stopped``/``crashed`` (re)starts the backend. Job states (:class:`JobInfo.state`): ``queued``,
``running``, ``done``, ``failed``, ``cancelled``, ``lost`` (the backend died under it; Retry re-sends
the job id, the backend reuses the inputs kept in its job folder).

Cancel: :meth:`cancel` sends ``cancel{job}``; if the job has not ended ``cancel_timeout`` seconds
later, the next :meth:`poll` kills the whole process group (the ``exited`` message then has
``killed: True``); models reload on the next job.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .backend import jobs as _jobs
from .backend.errors import HINTS
from .backend import protocol

__all__ = ["BackendClient", "JobInfo", "BackendError", "SelftestJob", "sanitized_env", "stop_all", "STATES",
           "JOB_STATES"]

STATES = ("stopped", "starting", "loading", "ready", "busy", "stopping", "crashed")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "lost")
_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONINSPECT",
             "PYTHONSAFEPATH", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "__PYVENV_LAUNCHER__")
_LOG_ROTATE_BYTES = 5 << 20
#: what a dying backend's last output says → the entry of the one hint table (``backend.errors.HINTS``)
_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("CUDA out of memory", "OutOfMemoryError", "out of memory"), "The GPU ran out of memory. " + HINTS["oom"]),
    (("No module named", "ModuleNotFoundError", "ImportError"), HINTS["missing_dependency"]),
    (("Illegal instruction", "Segmentation fault", "core dumped"), HINTS["native_crash"]),
)


class BackendError(RuntimeError):
    """The backend cannot be started or spoken to (bad Python path, missing extension folder...)."""


@dataclass
class JobInfo:
    """What the client knows about one job (updated by :meth:`BackendClient.poll`)."""

    id: str
    kind: str
    state: str = "queued"
    stage: str | None = None
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    submitted: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: dict[str, Any] | None = None
    result_meta: dict[str, Any] | None = None
    folder: str | None = None

    @property
    def fraction(self) -> float:
        """Progress of the current stage in [0, 1]."""
        return min(1.0, self.step / self.total) if self.total else 0.0

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


def sanitized_env(ext_dir: str | os.PathLike, base: Mapping[str, str] | None = None,
                  extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Blender's environment minus its Python variables, with ``PYTHONPATH`` = the extension folder."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _DROP_ENV}
    env["PYTHONPATH"] = str(ext_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if extra:
        env.update(extra)
    return env


def _signal_name(rc: int | None) -> str | None:
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _tail(path: Path | None, lines: int = 30) -> list[str]:
    if path is None:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 65536))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def _hint(lines: Iterable[str]) -> str | None:
    text = "\n".join(lines)
    for needles, hint in _HINTS:
        if any(n in text for n in needles):
            return hint
    return None


class BackendClient:
    """One backend process (started lazily, restarted after a crash). See the module docstring."""

    def __init__(self, python: str | os.PathLike, ext_dir: str | os.PathLike | None = None, *,
                 log_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 model_dir: str | os.PathLike | None = None, device: str = "auto", low_vram: bool = False,
                 idle_unload_min: float = 0.0, extra_args: Sequence[str] = (),
                 env_extra: Mapping[str, str] | None = None, cancel_timeout: float = 10.0,
                 stop_timeout: float = 5.0, max_payload: int = protocol.DEFAULT_MAX_PAYLOAD,
                 parent_death_signal: bool = True) -> None:
        self.python = str(python)
        self.ext_dir = Path(ext_dir) if ext_dir else Path(__file__).resolve().parent
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"trellis2-backend-{os.getpid()}.log"
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.model_dir = Path(model_dir) if model_dir else None
        self.device = device
        self.low_vram = low_vram
        self.idle_unload_min = idle_unload_min
        self.extra_args = list(extra_args)
        self.env_extra = dict(env_extra or {})
        self.cancel_timeout = cancel_timeout
        self.stop_timeout = stop_timeout
        self.max_payload = max_payload
        self.parent_death_signal = parent_death_signal

        self.state = "stopped"
        self.hello: dict[str, Any] = {}
        self.info: dict[str, Any] = {}        # latest status fields (device, vram, loaded...)
        self.jobs: dict[str, JobInfo] = {}
        self.last_exit: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        self.restarts = 0
        self.spawned: list[int] = []          # pids of every backend this client started
        self.proc: subprocess.Popen | None = None
        self._gen = 0
        self._queue: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self._writer: protocol.FrameWriter | None = None
        self._writer_thread: threading.Thread | None = None
        self._outq: "queue.Queue[list | None]" = queue.Queue()
        self._reader: threading.Thread | None = None
        self._log_fh = None
        self._cancel_deadline: dict[str, float] = {}
        self._backlog: list[dict[str, Any]] = []
        self._expect_exit = False
        self._kill_reason: str | None = None
        _LIVE.add(self)

    # ------------------------------------------------------------------ process
    def argv(self) -> list[str]:
        """The backend command line (an argv list; never run through a shell)."""
        argv = [self.python, "-u", "-m", "backend", "serve", "--stdio", "--log", str(self.log_path),
                "--device", self.device, "--max-payload-mb", str(self.max_payload / (1 << 20))]
        if self.cache_dir:
            argv += ["--cache-dir", str(self.cache_dir)]
        if self.model_dir:
            argv += ["--model-dir", str(self.model_dir)]
        if self.low_vram:
            argv.append("--low-vram")
        if self.idle_unload_min:
            argv += ["--idle-unload", str(self.idle_unload_min)]
        if self.parent_death_signal and sys.platform.startswith("linux"):
            argv += ["--pdeathsig", "--parent-pid", str(os.getpid())]
        return argv + self.extra_args

    @property
    def running(self) -> bool:
        """True while the backend process exists and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Spawn the backend (no-op if it runs). Non-blocking: ``hello`` arrives through :meth:`poll`.

        Raises :class:`BackendError` if the interpreter or the extension's backend is missing, or
        the process cannot be spawned.
        """
        if self.running:
            return
        self._cleanup_process()
        py = Path(self.python)
        if not (py.is_file() or (os.sep not in self.python and self.python)):
            raise BackendError(f"Backend Python not found: {self.python}")
        if not (self.ext_dir / "backend" / "__main__.py").is_file():
            raise BackendError(f"No backend/ package in the extension folder {self.ext_dir}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_suffix(self.log_path.suffix + ".1"))
        except OSError:
            pass
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - owned until the process ends
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            kwargs["start_new_session"] = True
        try:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_fh,
                cwd=str(self.ext_dir), env=sanitized_env(self.ext_dir, extra=self.env_extra),
                bufsize=0, close_fds=True, shell=False, **kwargs)
        except OSError as exc:
            self._log_fh.close()
            self._log_fh = None
            raise BackendError(f"Cannot start the backend with {self.python}: {exc}") from exc
        self.spawned.append(self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout):
            protocol.enlarge_pipe(stream.fileno())
        self._start_session(self.proc.stdin, self._read_loop, (self.proc,), "backend")

    def _start_session(self, out_stream: Any, read: Callable[..., None], read_args: tuple, name: str) -> None:
        """A new connection generation: the frame writer thread on ``out_stream`` and the reader thread
        ``read(*read_args[:1], generation, *read_args[1:])``; the session state reset to starting."""
        self._gen += 1
        self._writer = protocol.FrameWriter(out_stream)
        self._outq = queue.Queue()
        self._writer_thread = threading.Thread(target=self._write_loop, args=(self._writer, self._outq),
                                               name=f"trellis2-{name}-writer-{self._gen}", daemon=True)
        self._writer_thread.start()
        self._expect_exit = False
        self._kill_reason = None
        self._cancel_deadline.clear()
        self.state = "starting"
        self.hello = {}
        self._reader = threading.Thread(target=read, args=(read_args[0], self._gen, *read_args[1:]),
                                        name=f"trellis2-{name}-reader-{self._gen}", daemon=True)
        self._reader.start()

    def _frames(self, stream: Any) -> Iterator[dict[str, Any]]:
        """The decoded frames of ``stream`` until it ends; a bad frame becomes a ``protocol`` error
        message (and ends the stream when the reader cannot resynchronise)."""
        reader = protocol.FrameReader(stream, max_payload=self.max_payload)
        while True:
            try:
                msg = reader.read()
            except protocol.ProtocolError as exc:
                yield {"type": "error", "job": exc.job, "kind": "protocol", "source": "backend",
                       "message": f"Bad frame from the backend: {exc}", "advice": None,
                       "traceback_tail": [], "log_tail": []}
                if exc.fatal:
                    return
                continue
            except (OSError, ValueError):
                return
            if msg is None:
                return
            yield msg

    def _read_loop(self, proc: subprocess.Popen, gen: int) -> None:
        """Reader thread: frames -> queue; on EOF, reap the process and queue ``exited``."""
        put = self._queue.put
        for msg in self._frames(proc.stdout):
            put((gen, msg))
        try:
            rc = proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            # stdout closed but the process lingers: it cannot talk to us any more
            self._killpg(proc)
            rc = proc.wait()
        put((gen, {"type": "exited", "rc": rc}))

    @staticmethod
    def _write_loop(writer: protocol.FrameWriter, outq: "queue.Queue[list | None]") -> None:
        """Writer thread: big frames never block Blender's main thread (a backend stuck in a
        GIL-holding call stops reading, and a full pipe would otherwise freeze the UI)."""
        while True:
            bufs = outq.get()
            if bufs is None:
                return
            try:
                writer.write_encoded(bufs)
            except (OSError, ValueError):
                return  # the backend is gone; the reader thread reports the exit

    def _killpg(self, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True, check=False)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                proc.kill()
            except OSError:
                pass

    def kill(self, reason: str = "killed") -> None:
        """Hard-kill the backend's whole process group now (the ``exited`` message follows in poll)."""
        if self.proc is not None and self.proc.poll() is None:
            self._kill_reason = reason
            self._killpg(self.proc)

    def _cleanup_process(self) -> None:
        # never close stdin under a live writer thread (its fd number could be reused meanwhile)
        self._close_writer(1.0)
        if self.proc is not None:
            streams = (self.proc.stdout,) if self._writer_thread is not None else (self.proc.stdin, self.proc.stdout)
            for stream in streams:
                try:
                    if stream:
                        stream.close()
                except OSError:
                    pass
        if self._log_fh is not None:
            try:
                self._log_fh.close()
            except OSError:
                pass
            self._log_fh = None

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the backend: ``shutdown``, close stdin, wait ``timeout`` s, then kill the group.

        Blocking (at most ``timeout`` + ~1 s); call from ``unregister()`` / atexit. Returns the
        exit code (None if it was not running). Afterwards :attr:`state` is ``stopped``.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        proc = self.proc
        rc = None
        if proc is not None:
            self._expect_exit = True
            if proc.poll() is None:
                self.state = "stopping"
                self.send({"type": "shutdown"})
                self._close_writer(min(timeout, 2.0))
                if self._writer_thread is not None:
                    # the backend stopped reading (stuck): kill it, which unblocks the writer
                    self._kill_reason = "did not read its input"
                    self._killpg(proc)
                    self._close_writer(2.0)
                else:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._killpg(proc)
            try:
                rc = proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                rc = None
            self._close_writer(1.0)
            if self._reader is not None:
                self._reader.join(timeout=5.0)
            self._cleanup_process()
            self.poll()  # consume the exited message of this process
        self.state = "stopped"
        self.proc = None
        self._writer = None
        self._reader = None
        return rc

    def _close_writer(self, timeout: float) -> None:
        """Let the writer thread finish what is queued (up to ``timeout`` s), then end it."""
        t = self._writer_thread
        if t is not None:
            self._outq.put(None)
            t.join(timeout)
            if not t.is_alive():
                self._writer_thread = None

    def restart(self) -> None:
        """Stop (if running) and start a fresh backend."""
        self.stop()
        self.restarts += 1
        self.start()

    # ------------------------------------------------------------------ sending
    def send(self, msg: Mapping[str, Any]) -> bool:
        """Queue one message for the writer thread (non-blocking); False if the backend is not
        running (an ``exited`` message then comes through :meth:`poll`).

        The message is encoded here (``protocol.ProtocolError`` for unencodable fields/arrays), but
        arrays are sent zero-copy from their memory by the writer thread: do not modify arrays
        passed in ``msg["arrays"]`` after sending (give each job its own arrays)."""
        if self._writer is None or self._writer_thread is None or not self.running:
            return False
        self._outq.put(protocol.encode(msg))   # raises ProtocolError here, in the caller, if unencodable
        return True

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
            self.jobs[job].state = "lost"
            self.jobs[job].error = {"kind": "crashed", "message": "The backend is not accepting jobs."}
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
        elif t == "progress" and job is not None:
            job.state, job.stage, job.step, job.total = "running", msg.get("stage"), msg.get("step", 0), msg.get("total", 0)
            job.eta_s = msg.get("eta_s")
        elif t == "result" and job is not None:
            job.state, job.finished = "done", time.monotonic()
            job.result_meta, job.folder = msg.get("meta"), msg.get("folder")
            self._cancel_deadline.pop(job.id, None)
        elif t == "cancelled" and job is not None:
            job.state, job.finished = "cancelled", time.monotonic()
            self._cancel_deadline.pop(job.id, None)
        elif t == "error":
            self.last_error = msg
            if job is not None:
                job.state, job.finished = "failed", time.monotonic()
                job.error = {k: msg.get(k) for k in ("kind", "message", "advice")}
                self._cancel_deadline.pop(job.id, None)
        elif t == "exited":
            return self._on_exit(msg)
        return [msg]

    def _on_exit(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        rc = msg.get("rc")
        lines = _tail(self.log_path)
        killed = self._kill_reason is not None
        expected = self._expect_exit
        lost = [j for j, info in self.jobs.items() if info.active]
        reason = self._kill_reason or ("stopped" if expected else msg.get("reason") or
                                       f"Backend stopped (code {rc}{', ' + _signal_name(rc) if _signal_name(rc) else ''})")
        exited = {"type": "exited", "rc": rc, "signal": _signal_name(rc), "expected": expected,
                  "killed": killed, "reason": reason, "jobs": lost, "log_tail": lines,
                  "hint": None if expected else _hint(lines)}
        out: list[dict[str, Any]] = []
        for j in lost:
            info = self.jobs[j]
            cancelled = j in self._cancel_deadline
            info.state = "cancelled" if (cancelled and killed) else "lost"
            info.finished = time.monotonic()
            info.error = {"kind": "crashed", "message": reason, "advice": exited["hint"]}
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
        return _tail(self.log_path, lines)

    def active_jobs(self) -> list[JobInfo]:
        return [j for j in self.jobs.values() if j.active]

    def __del__(self) -> None:  # best effort; stop() is the real API
        try:
            if self.proc is not None and self.proc.poll() is None:
                self._killpg(self.proc)
        except Exception:  # noqa: BLE001
            pass


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


_LIVE: "weakref.WeakSet[BackendClient]" = weakref.WeakSet()


def stop_all(timeout: float = 3.0) -> None:
    """Stop every live client's backend (add-on ``unregister()`` and interpreter exit)."""
    for client in list(_LIVE):
        try:
            client.stop(timeout)
        except Exception:  # noqa: BLE001 - shutting down
            pass


atexit.register(stop_all)
