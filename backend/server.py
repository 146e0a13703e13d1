"""``trellis2 serve --stdio``: the backend process the Blender add-on talks to over its pipes.

Process model (see docs/ARCHITECTURE.md and the add-on spec, part (b)):

* **Stream protection, first thing.** The protocol goes out on a private ``dup`` of fd 1; fd 1 is
  then pointed at fd 2 (the log), and fd 0 at ``/dev/null`` after taking a private dup of it. So
  ``print``, tqdm, C libraries and child processes writing to stdout, or reading stdin, can never
  corrupt or steal protocol bytes.
* **Threads.** A reader thread decodes frames: ``ping``/``cancel``/``shutdown`` are handled at
  once, jobs (``generate``/``texture``/``upscale``) and ``unload`` go to a FIFO queue. The main
  thread is the worker: one job at a time. A job request is validated (:mod:`backend.validation`)
  before it is queued, and its id is reserved together with a job-wide cancel ``threading.Event``
  the moment it arrives (a duplicate id is refused until the job has answered). Cancel is
  cooperative: the reader sets that event; opening the job (image intake, storing the inputs), every
  sampler step, :meth:`JobContext.progress`, the unwrap (a killable child process) and the chunked
  bake check it, and the job ends with a ``cancelled`` message (never with a late result).
* **Lifetime.** EOF on stdin means the add-on (Blender) is gone: the running job is cancelled and
  the process exits within ~1.5 s whatever the job is doing. ``--pdeathsig`` also asks Linux to
  SIGTERM us when the parent dies. Idle auto-unload (``--idle-unload MINUTES``) frees the models.
* **Errors** are typed: ``error{job, kind, message, advice, traceback_tail, log_tail}`` with kind in
  ``oom | missing_dependency | missing_weights | bad_input | cancelled | internal | protocol``.
* **Jobs** live in folders (:mod:`backend.jobs`) under ``--cache-dir``: inputs first, then the
  pipeline's resumable state, then the result, so nothing is lost on a crash.

Job execution goes through one small adapter, a *runner* (:class:`PipelineRunner` for the real
pipelines, :class:`backend.fake_runner.FakeRunner` for tests): ``describe()``, ``run(ctx)``,
``unload()``, ``loaded``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from . import __version__
from . import errors as _errors
from . import jobs as _jobs
from . import protocol as proto
from .contract import DEFAULT_SEED
from .validation import validate_request

log = logging.getLogger("backend.server")

_LOG_TAIL_LINES = 30
_EXIT_GRACE_S = 1.2
_RUNNERS = {"pipelines": "PipelineRunner", "fake": "fake"}


# --------------------------------------------------------------------------------------------------
# runner interface


class JobContext:
    """What a runner gets for one job: the request, its folder, progress and cancel plumbing."""

    def __init__(self, server: "Server", msg: dict[str, Any], job: _jobs.Job,
                 cancel: threading.Event | None = None) -> None:
        self.server = server
        self.msg = msg
        self.kind: str = msg["type"]
        self.job_id: str = msg["job"]
        self.arrays: dict[str, np.ndarray] = msg.get("arrays") or {}
        self.job = job
        #: the job-wide cancel flag: the one the server reserved with the job id when it arrived
        self.cancel = cancel if cancel is not None else threading.Event()
        self.started = time.monotonic()
        self.stage: str | None = None
        self.step = 0
        #: the progress step the job was at when its cancel arrived (None: not cancelled while running)
        self.cancel_step: int | None = None
        self._stage_t0 = self.started
        self._last_t = self.started

    @property
    def settings(self) -> dict[str, Any]:
        """The request's fields except transport ones (type, job, arrays)."""
        return {k: v for k, v in self.msg.items() if k not in ("type", "job", "arrays")}

    def check_cancel(self) -> None:
        """Raise :class:`backend.errors.Cancelled` if the job was cancelled."""
        if self.cancel.is_set():
            raise _errors.Cancelled(stage=self.stage)

    def progress(self, stage: str, step: int, total: int, elapsed: float | None = None) -> None:
        """Report progress (the pipelines' ``ProgressFn``), then honour a pending cancel.

        ``elapsed`` is the pipeline's own clock (seconds since the job started); the ETA of the
        stage is estimated here from the stage's own step rate.
        """
        now = time.monotonic()
        if stage != self.stage:
            # a stage starts at its step-0 report, or else when the previous stage's last step came
            self.stage, self._stage_t0 = stage, now if step == 0 else self._last_t
        self._last_t = now
        self.step = int(step)
        stage_el = now - self._stage_t0
        eta = stage_el / step * (total - step) if step > 0 and total > 0 else None
        self.server.send({"type": "progress", "job": self.job_id, "stage": stage, "step": int(step),
                          "total": int(total), "stage_elapsed_s": round(stage_el, 3),
                          "elapsed_s": round(float(elapsed) if elapsed is not None else now - self.started, 3),
                          "eta_s": None if eta is None else round(eta, 3)})
        self.check_cancel()

    def log(self, text: str, level: str = "info") -> None:
        self.server.send_log(level, text)


class Runner(Protocol):
    """The job adapter the server calls (on the main thread, one job at a time)."""

    loaded: bool

    def describe(self) -> dict[str, Any]:
        """Device facts for ``status`` (may import torch; called once, off the reader thread)."""

    def run(self, ctx: JobContext) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
        """Execute ``ctx.msg``; return ``(result kind, meta, arrays)``. Raise typed errors."""

    def unload(self) -> None:
        """Free models and device memory."""

    def prepare_image(self, data: bytes, check: Callable[[], None] | None = None) -> bytes:
        """Optional: the checked, re-encoded input image to store (raise ``BadInput`` if unusable;
        ``check()`` raises on cancel and may be called while it works); without it the server
        stores the bytes as read (after its own format sniff)."""


class PipelineRunner:
    """Adapter from protocol requests to :mod:`backend.pipelines` (the real TRELLIS.2 pipelines)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model_dir = getattr(args, "model_dir", None)
        self.device = getattr(args, "device", "auto") or "auto"
        self.low_vram = bool(getattr(args, "low_vram", False))
        self._pipe: Any = None
        self._pipe_key: tuple = ()
        self.loaded = False

    def describe(self) -> dict[str, Any]:
        from .selftest import device_info

        return device_info()

    @staticmethod
    def prepare_image(data: bytes, check: Callable[[], None] | None = None) -> bytes:
        """Decode and validate the image fully (bomb guard, 16-bit, EXIF); store the re-encoded PNG
        (a big image in a child process that a cancel kills)."""
        from .intake import validated_png

        return validated_png(data, check)

    def vram_used(self) -> int | None:
        try:
            import torch

            return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - diagnostics only
            return None

    def settings_key(self, m: dict[str, Any]) -> tuple:
        """What a loaded pipeline depends on: model folders, device, low-VRAM mode, precision."""
        return (m.get("model_dir") or self.model_dir, m.get("device", self.device), m.get("dinov3_dir") or None,
                m.get("ss_decoder_dir") or None, bool(m.get("low_vram", self.low_vram)),
                str(m.get("precision") or "auto"), m.get("rembg_dir") or None)

    def _pipeline(self, ctx: JobContext):
        """The pipeline for this job's settings; loaded on first use and reloaded (models freed first)
        when the model folders, device, low-VRAM mode or precision change between jobs."""
        key = self.settings_key(ctx.msg)
        model_dir = key[0]
        if self._pipe is not None and key != self._pipe_key:
            log.info("pipeline settings changed: reloading the models")
            self.unload()
        if self._pipe is None:
            from . import pipelines

            if not model_dir:
                raise _errors.MissingWeights("No model folder configured (set it in the add-on Preferences).")
            self.server_status(ctx, "loading")
            self._pipe = pipelines.load_pipeline(model_dir, device=key[1], dinov3_dir=key[2], ss_decoder_dir=key[3],
                                                 low_vram=key[4], precision=key[5], rembg_dir=key[6])
            self._pipe_key = key
            self.loaded = True
            self.server_status(ctx, "busy")
        return self._pipe

    @staticmethod
    def server_status(ctx: JobContext, state: str) -> None:
        ctx.server.send_status(state)

    def run(self, ctx: JobContext) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
        from .pipelines.pipeline import token_budget

        s = ctx.msg
        budget = token_budget(s.get("max_tokens"))  # checked before loading; a job without it: official
        pipe = self._pipeline(ctx)
        pipe.max_num_tokens = budget
        common = {"stage_params": s.get("stage_params") or {}, "progress": ctx.progress, "cancel": ctx.cancel}
        if ctx.kind == "generate":
            views = ctx.job.view_paths()
            image = [_load_image(ctx), *(_load_image(ctx, p) for p in views)] if views else _load_image(ctx)
            guide = _guide(ctx)
            res = pipe.generate(image, pipeline_type=s.get("pipeline_type") or None,
                                seed=int(s.get("seed", DEFAULT_SEED)), preprocess=bool(s.get("preprocess", True)),
                                background=background_policy(s), multiview=s.get("multiview") or "stochastic",
                                guide=guide, **common)
            res.state.save(ctx.job.root / "state")
            arrays = _generation_arrays(res, s, ctx)
            cut = getattr(res.state, "image", None)   # the cut-out the model saw (the panel's preview)
            if cut is not None:
                arrays["preprocessed"] = np.ascontiguousarray(cut, np.uint8)
            meta = {**_generation_meta(res), "background": dict(getattr(res, "preprocess_info", {}) or {}),
                    "views": 1 + len(views)}
            if guide is not None:
                meta["guide"] = {"center": [float(c) for c in guide.center], "scale": float(guide.scale),
                                 "strength": float(guide.strength)}
            return "mesh", meta, arrays
        if ctx.kind == "cutout":  # preview of what the model will see: only the preprocess stage runs
            img, info = pipe.preview_cutout(_load_image(ctx), background_policy(s), ctx.progress, ctx.cancel)
            return "cutout", {"background": info}, {"preprocessed": img}
        if ctx.kind == "upscale":
            from .pipelines import JobState

            src = ctx.server.store.get(str(s.get("source_job")))
            if src is None:
                raise _errors.BadInput(f"Unknown source job {s.get('source_job')!r} for upscale.")
            state = JobState.load(src.root / "state")
            res = pipe.upscale(state, **common)
            res.state.save(ctx.job.root / "state")
            return "mesh", _generation_meta(res), _generation_arrays(res, s, ctx)
        if ctx.kind == "texture":
            a = ctx.arrays
            for key in ("vertices", "faces"):
                if key not in a:
                    raise _errors.BadInput(f"texture request without '{key}' array.")
            uvs = a.get("uvs")
            if uvs is not None and uvs.ndim == 2 and uvs.shape[0] == 3 * a["faces"].shape[0]:
                uvs = uvs.reshape(-1, 3, 2)      # per-corner [3F, 2] -> [F, 3, 2]
            tex = pipe.texture(a["vertices"], a["faces"], _load_image(ctx), uvs=uvs, transform=a.get("matrix"),
                               seed=int(s.get("seed", DEFAULT_SEED)), resolution=int(s.get("resolution", 1024)),
                               texture_size=int(s.get("texture_size", 2048)),
                               preprocess=bool(s.get("preprocess", True)), background=background_policy(s),
                               **common)
            meta = {"uv_created": bool(tex.uv_created), "resolution": int(tex.resolution),
                    "coverage": float(tex.coverage), "timings": dict(tex.timings)}
            norm = getattr(tex, "normalization", None)   # world → unit cube of the textured shape
            if norm is not None:
                meta["normalization"] = {"center": [float(c) for c in norm[0]], "scale": float(norm[1])}
            arrays = {"base_color": tex.base_color, "metallic_roughness": tex.metallic_roughness,
                      "vertices": tex.vertices, "faces": tex.faces, "uvs": tex.uvs}
            return "textures", meta, arrays
        raise _errors.BadInput(f"unsupported job type {ctx.kind!r}")

    def unload(self) -> None:
        pipe, self._pipe, self.loaded = self._pipe, None, False
        if pipe is not None:
            fn = getattr(pipe, "unload", None) or getattr(getattr(pipe, "models", None), "unload", None)
            if callable(fn):
                fn()
        del pipe
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def background_policy(msg: dict[str, Any]) -> str:
    """The request's cut-out policy: ``background`` (auto|remove|keep); the add-on's older boolean
    ``remove_background`` maps to auto (True) / keep (False)."""
    if msg.get("background") is not None:
        return str(msg["background"])
    if "remove_background" in msg:
        return "auto" if msg["remove_background"] else "keep"
    return "auto"


#: request fields naming files or folders on the backend's machine: a TCP client may not choose them
_SERVER_PATH_FIELDS = ("model_dir", "dinov3_dir", "ss_decoder_dir", "rembg_dir")


def _remote_request(msg: dict[str, Any]) -> dict[str, Any]:
    """A TCP client's job request: server-side model folders are the server's own (the fields are
    dropped), and images must come as bytes (a path would read the server's files)."""
    for name in ("image", "images"):
        if msg.get(name):
            raise _errors.BadInput(f"A remote backend cannot read files by path ('{name}'): send the image bytes "
                                   "(arrays.image_png, extra views arrays.view_png_1..N).", field=name)
    return {k: v for k, v in msg.items() if k not in _SERVER_PATH_FIELDS}


def _guide(ctx: JobContext):
    """The request's blockout (``guide_*`` arrays and fields) as a normalised guide, or None."""
    a = ctx.arrays
    if "guide_vertices" not in a:
        return None
    from .pipelines.guide import prepare_guide

    s = ctx.msg
    strength = s.get("guide_strength")
    return prepare_guide(a["guide_vertices"], a["guide_faces"], 1.0 if strength is None else strength,
                         transform=a.get("guide_matrix"), frame=s.get("guide_frame") or "fit")


def _load_image(ctx: JobContext, path: Path | None = None):
    """The job's input image (or one of its stored extra views) as a PIL image (from the job folder;
    inputs were validated and saved first; loaded with every guard again, for older job folders)."""
    from .pipelines.preprocess import load_image

    path = path or ctx.job.image_path
    if not path.exists():
        raise _errors.BadInput("The job has no input image.", field="image")
    return load_image(path)


def _generation_meta(res: Any) -> dict[str, Any]:
    return {"pipeline_type": res.pipeline_type, "seed": int(res.seed), "resolution": int(res.resolution),
            "num_voxels": int(res.coords.shape[0]), "timings": dict(res.timings),
            "peak_memory": dict(res.peak_memory)}


def _generation_arrays(res: Any, request: dict[str, Any], ctx: JobContext | None = None) -> dict[str, np.ndarray]:
    """The result arrays: the O-Voxel and its mesh; with ``output == "textures"`` the mesh is
    (optionally decimated to ``decimation_target`` faces,) UV-unwrapped and carries baked
    ``uvs [F,3,2]``, ``base_color [S,S,4]`` and glTF ``metallic_roughness [S,S,4]`` images."""
    arrays = {"vertices": np.asarray(res.vertices, np.float32), "faces": np.asarray(res.faces, np.int32),
              "coords": res.coords, "dual_vertices": res.dual_vertices, "intersected": res.intersected,
              "split_weight": res.split_weight, "attrs": res.attrs}
    if request.get("output") == "textures":
        from .pipelines.export import generation_to_textured_mesh

        v, f, uv, base, mr = generation_to_textured_mesh(
            res, texture_size=int(request.get("texture_size") or 2048),
            decimate=int(request.get("decimation_target") or 0) or None,
            progress=ctx.progress if ctx is not None else None, check=ctx.check_cancel if ctx is not None else None)
        arrays.update(vertices=v, faces=f, uvs=uv, base_color=base, metallic_roughness=mr)
    return arrays


# --------------------------------------------------------------------------------------------------
# error classification


def classify_error(exc: BaseException) -> tuple[str, str, str | None]:
    """``(kind, human message, advice)`` for any exception a job raised."""
    if isinstance(exc, _errors.Cancelled):
        return "cancelled", str(exc), None
    name = type(exc).__name__
    text = str(exc)
    if (isinstance(exc, (_errors.OutOfMemory, MemoryError)) or name == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and "out of memory" in text.lower())):
        advice = getattr(exc, "advice", None) or _errors.OutOfMemory().advice
        return "oom", getattr(exc, "message", None) or "The device ran out of memory.", advice
    if isinstance(exc, _errors.MissingWeights):
        return "missing_weights", exc.message, exc.advice or _errors.HINTS["missing_weights"]
    missing_dep = getattr(_errors, "MissingDependency", None)
    if (missing_dep is not None and isinstance(exc, missing_dep)) or isinstance(exc, ImportError):
        mod = getattr(exc, "name", None)
        msg = getattr(exc, "message", None) or (f"Missing Python module {mod!r}." if mod else text)
        return "missing_dependency", msg, _errors.HINTS["missing_dependency"]
    if isinstance(exc, _errors.BadInput):
        return "bad_input", exc.message, exc.advice
    if isinstance(exc, _errors.NumericalError):
        # NaN/Inf in fp32 is not a precision problem: not "numerical" (whose fix is "use fp32")
        return ("numerical" if getattr(exc, "precision_related", True) else "internal"), exc.message, exc.advice
    if isinstance(exc, _errors.Trellis2Error):
        return "internal", exc.message, exc.advice
    return "internal", f"{name}: {text}" if text else name, _errors.HINTS["internal"]


# --------------------------------------------------------------------------------------------------
# logging


class _TailHandler(logging.Handler):
    """Keeps the last lines of the log in memory (for error messages' ``log_tail``)."""

    def __init__(self, lines: int = 200) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.extend(self.format(record).splitlines())
        except Exception:  # noqa: BLE001
            pass


class _ForwardHandler(logging.Handler):
    """Forwards WARNING+ log records to the add-on as ``log`` frames (throttled by the server)."""

    def __init__(self, server: "Server") -> None:
        super().__init__(logging.WARNING)
        self.server = server
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False) or self.server._pipe_broken:
            return  # a warning raised while sending must not recurse into sending
        if record.name.startswith("backend.transport"):
            return  # about other connections (addresses, failed logins): the server's log only
        self._local.busy = True
        try:
            self.server.send_log(record.levelname.lower(), self.format(record))
        except Exception:  # noqa: BLE001
            pass
        finally:
            self._local.busy = False


def read_log_tail(path: str | os.PathLike | None, lines: int = _LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log file (reads at most the last 64 KiB)."""
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


# --------------------------------------------------------------------------------------------------
# the server


class Server:
    """The stdio server; :meth:`run` blocks until shutdown or EOF and returns the exit code."""

    def __init__(self, reader: proto.FrameReader, writer: proto.FrameWriter, runner: Runner,
                 store: _jobs.JobStore, *, idle_unload_s: float = 0.0, log_path: str | None = None,
                 tail: _TailHandler | None = None, max_jobs_per_peer: int = 8) -> None:
        """``reader``/``writer`` are the stdio pipes; both None for a TCP server, whose connections
        come through :meth:`serve_peer` (frames about a job go to the connection that sent it)."""
        self.reader = reader
        self.writer = writer
        self.runner = runner
        self.store = store
        self.idle_unload_s = idle_unload_s
        self.log_path = log_path
        self.tail = tail
        self._cv = threading.Condition()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._current: JobContext | None = None
        #: job id -> its cancel flag, from the moment the id arrives (queued, opening, running) until
        #: the job's answer is sent; reserving the id here is what makes duplicates impossible
        self._active: dict[str, threading.Event] = {}
        self._stopping = False
        self._exit_code = 0
        self._worker_done = threading.Event()
        self._last_activity = time.monotonic()
        self._device: dict[str, Any] = {}
        self._state = "starting"
        self._pipe_broken = False
        self._log_tokens = 10.0
        self._log_t = time.monotonic()
        #: TCP mode: the live connections and, per job id, the connection that submitted it
        self._peers: set[Any] = set()
        self._owner: dict[str, Any] = {}
        self.max_jobs_per_peer = max_jobs_per_peer

    # -- sending
    def send(self, msg: dict[str, Any]) -> bool:
        """Send a frame; False (and stop) if the add-on side is gone. TCP mode: a job's frames go to
        the connection that submitted the job (dropped if it is gone), the rest to every connection."""
        if self.writer is None:
            return self._route(msg)
        if self._pipe_broken:
            return False
        try:
            self.writer.send(msg)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            log.warning("protocol pipe closed while sending %s: %s", msg.get("type"), exc)
            self._pipe_broken = True
            self.stop(0)
            return False

    _JOB_FRAMES = frozenset({"progress", "result", "error", "cancelled"})

    def _route(self, msg: dict[str, Any]) -> bool:
        job = msg.get("job")
        with self._cv:
            if msg.get("type") in self._JOB_FRAMES and job is not None:
                owner = self._owner.get(job)
                targets = [owner] if owner is not None else []
            else:
                targets = list(self._peers)
        sent = False
        for peer in targets:
            sent = peer.send(msg) or sent
        return sent

    def send_log(self, level: str, text: str) -> None:
        """Forward a log line to the add-on, throttled to ~10 lines/s."""
        now = time.monotonic()
        self._log_tokens = min(10.0, self._log_tokens + (now - self._log_t) * 10.0)
        self._log_t = now
        if self._log_tokens >= 1.0:
            self._log_tokens -= 1.0
            self.send({"type": "log", "level": level, "text": text[:2000]})

    def queue_ids(self) -> list[str]:
        with self._cv:
            return [m["job"] for m in self._queue if m["type"] in proto.JOB_MESSAGES]

    def send_status(self, state: str | None = None, **extra: Any) -> None:
        """Broadcast a ``status`` frame (``state`` becomes the server's state)."""
        if state:
            self._state = state
        self.send(self.status_msg(**extra))

    def status_msg(self, **extra: Any) -> dict[str, Any]:
        """The ``status`` frame for the current state."""
        cur = self._current
        msg: dict[str, Any] = {"type": "status", "state": self._state, "loaded": bool(getattr(self.runner, "loaded", False)),
                               "job": cur.job_id if cur else None, "queue": self.queue_ids(), **self._device}
        vram = getattr(self.runner, "vram_used", None)
        if callable(vram):
            msg["vram_used"] = vram()
        msg.update(extra)
        return msg

    def send_error(self, job: str | None, kind: str, message: str, advice: str | None = None,
                   tb: str | None = None, field: str | None = None, peer: Any = None) -> None:
        """An ``error`` frame; ``field``: the request field at fault (``bad_input`` from validation)."""
        tail = read_log_tail(self.log_path) if self.log_path else list(self.tail.lines)[-_LOG_TAIL_LINES:] if self.tail else []
        msg = {"type": "error", "job": job, "kind": kind, "message": message, "advice": advice,
               "traceback_tail": (tb or "").splitlines()[-25:], "log_tail": tail}
        if field:
            msg["field"] = field
        if peer is not None:
            peer.send(msg)
        else:
            self.send(msg)

    # -- lifecycle
    def stop(self, code: int = 0) -> None:
        """Cancel everything and make the worker loop end."""
        with self._cv:
            self._stopping = True
            self._exit_code = code
            self._queue.clear()
            for flag in self._active.values():
                flag.set()
            self._cv.notify_all()

    def hello(self) -> dict[str, Any]:
        """The first frame a client gets."""
        msg = {"type": "hello", "protocol": proto.PROTOCOL_VERSION, "backend_version": __version__,
               "python": platform.python_version(), "numpy": np.__version__, "pid": os.getpid(),
               "platform": sys.platform, "executable": sys.executable, "runner": type(self.runner).__name__}
        if self.writer is None:
            msg.update(remote=True, executable=None)   # a remote client has no use for server paths
        return msg

    def run(self) -> int:
        """Serve until shutdown (stdio: or EOF); the calling thread becomes the worker."""
        if self.reader is not None:
            self.send(self.hello())
            reader = threading.Thread(target=self._reader_loop, name="protocol-reader", daemon=True)
            reader.start()
        try:
            try:
                self._device = dict(self.runner.describe() or {})
            except Exception as exc:  # noqa: BLE001 - describing must never kill the server
                log.exception("describe() failed")
                self._device = {"describe_error": f"{type(exc).__name__}: {exc}"}
            if not self._stopping:
                self.send_status("ready")
            self._worker_loop()
        finally:
            self._worker_done.set()
        log.info("server exiting with code %d", self._exit_code)
        return self._exit_code

    # -- reader thread
    def _reader_loop(self) -> None:
        while True:
            try:
                msg = self.reader.read()
            except proto.ProtocolError as exc:
                log.warning("bad frame from the add-on: %s", exc)
                self.send_error(exc.job, "protocol", f"Rejected a bad frame: {exc}")
                if exc.fatal:
                    break
                continue
            except OSError as exc:
                log.warning("protocol input failed: %s", exc)
                break
            if msg is None:
                log.info("stdin closed: the add-on is gone")
                break
            try:
                self._handle(msg)
            except Exception as exc:  # noqa: BLE001 - never let one message kill the reader
                log.exception("handling %s failed", msg.get("type"))
                self.send_error(msg.get("job"), "internal", f"{type(exc).__name__}: {exc}",
                                tb=traceback.format_exc())
        # EOF (or a fatal stream error): stop, and make sure we are gone shortly whatever the job does
        self.stop(0)
        if not self._worker_done.wait(_EXIT_GRACE_S):
            log.warning("job did not stop within %.1f s after stdin closed; exiting hard", _EXIT_GRACE_S)
            logging.shutdown()
            os._exit(0)

    def _handle(self, msg: dict[str, Any], peer: Any = None) -> None:
        """One frame from the add-on (stdio) or from a TCP connection ``peer``."""
        mtype = msg["type"]
        if mtype == "ping":
            reply = dict(msg)
            reply["type"] = "pong"
            reply["t_backend"] = time.time()
            (peer.send if peer is not None else self.send)(reply)
        elif mtype == "cancel":
            self._cancel(msg.get("job"), peer)
        elif mtype == "shutdown" and peer is not None:
            # a shared server outlives its clients: a remote shutdown ends only this connection
            log.info("connection %s said goodbye", peer.address)
            self._cancel(None, peer)
            peer.close()
        elif mtype == "shutdown":
            log.info("shutdown requested")
            self.send_status("stopping")
            self.stop(0)
        elif mtype == "unload":
            with self._cv:
                self._queue.append(msg)
                self._cv.notify_all()
        elif mtype in proto.JOB_MESSAGES:
            job = msg.get("job")
            if not _jobs.valid_job_id(job):
                self.send_error(job if isinstance(job, str) else None, "bad_input", f"Invalid job id {job!r}.",
                                peer=peer)
                return
            try:  # every field's type and range, before the job is queued (a retry may omit fields)
                if peer is not None:
                    msg = _remote_request(msg)
                msg = validate_request(msg, partial=True)
            except _errors.BadInput as exc:
                self.send_error(job, "bad_input", exc.message, exc.advice, field=exc.field, peer=peer)
                return
            with self._cv:
                # the id is reserved atomically with its cancel flag: a duplicate is refused from
                # now until the job's answer has been sent, whatever phase the job is in
                dup = job in self._active
                full = peer is not None and len(peer.jobs) >= self.max_jobs_per_peer
                if not dup and not full:
                    self._active[job] = threading.Event()
                    if peer is not None:
                        self._owner[job] = peer
                        peer.jobs.add(job)
                    self._queue.append(msg)
                    self._cv.notify_all()
            if dup:
                self.send_error(job, "bad_input", f"Job {job} is already queued or running.", peer=peer)
            elif full:
                self.send_error(job, "bad_input", f"This connection already has {self.max_jobs_per_peer} jobs "
                                "queued or running; wait for one to finish.", peer=peer)
            else:
                self.send_status()
        else:
            self.send_error(msg.get("job"), "protocol", f"Unexpected message type {mtype!r} from the add-on.",
                            peer=peer)

    def _release(self, job_id: str) -> None:
        """Forget which connection owns ``job_id`` (its answer has been sent). Call with ``_cv`` held."""
        owner = self._owner.pop(job_id, None)
        if owner is not None:
            owner.jobs.discard(job_id)

    # -- TCP connections (each in its own thread; see backend.transport.Listener)
    def serve_peer(self, peer: Any) -> None:
        """Talk to one authenticated connection until it closes, then cancel the jobs it left behind."""
        from .transport import IdleTimeout

        with self._cv:
            if self._stopping:
                return
            self._peers.add(peer)
        try:
            peer.send(self.hello())
            peer.send(self.status_msg())
            while not peer.closed.is_set() and not self._stopping:
                try:
                    msg = peer.reader.read()
                except proto.ProtocolError as exc:
                    log.info("bad frame from %s: %s", peer.address, exc)   # not forwarded to other clients
                    self.send_error(exc.job, "protocol", f"Rejected a bad frame: {exc}", peer=peer)
                    if exc.fatal:
                        break
                    continue
                except IdleTimeout:
                    log.info("connection %s idle for %.0f s: closing", peer.address, peer.idle_timeout)
                    peer.send(self.status_msg(closing="idle"))
                    break
                except OSError:
                    break
                if msg is None:
                    break
                try:
                    self._handle(msg, peer)
                except Exception as exc:  # noqa: BLE001 - never let one message kill the connection
                    log.exception("handling %s failed", msg.get("type"))
                    self.send_error(msg.get("job"), "internal", f"{type(exc).__name__}: {exc}",
                                    tb=traceback.format_exc(), peer=peer)
        finally:
            with self._cv:
                self._peers.discard(peer)
                left = bool(peer.jobs)
            if left:
                log.info("connection %s closed with jobs pending: cancelling them", peer.address)
                self._cancel(None, peer)
            peer.close()

    def _cancel(self, job: str | None, peer: Any = None) -> None:
        """Cancel ``job`` (None: every job; from a TCP ``peer``: only among the jobs it submitted)."""
        dropped: list[str] = []
        with self._cv:
            mine = None if peer is None else set(peer.jobs)
            if mine is not None and job is not None and job not in mine:
                return
            keep: collections.deque[dict[str, Any]] = collections.deque()
            for m in self._queue:
                if (m["type"] in proto.JOB_MESSAGES and (job is None or m.get("job") == job)
                        and (mine is None or m.get("job") in mine)):
                    dropped.append(m["job"])
                else:
                    keep.append(m)
            self._queue = keep
            for jid in dropped:
                self._active.pop(jid, None)
            # jobs past the queue (being opened or running): their job-wide flag
            for jid, flag in self._active.items():
                if (job is None or jid == job) and (mine is None or jid in mine):
                    if self._current is not None and self._current.job.id == jid and not flag.is_set():
                        self._current.cancel_step = self._current.step   # where the request found it
                    flag.set()
        for jid in dropped:
            self._mark(jid, "cancelled")
            self.send({"type": "cancelled", "job": jid, "stage": None, "step": 0, "queued": True})
            with self._cv:
                self._release(jid)
        if dropped:
            self.send_status()

    def _mark(self, job_id: str, status: str, **fields: Any) -> None:
        try:
            j = self.store.get(job_id)
            if j is not None:
                j.set_status(status, **fields)
        except OSError as exc:
            log.warning("could not update job %s: %s", job_id, exc)

    # -- worker (main thread)
    def _worker_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    timeout = None
                    if self.idle_unload_s > 0 and getattr(self.runner, "loaded", False):
                        timeout = self._last_activity + self.idle_unload_s - time.monotonic()
                        if timeout <= 0:
                            break
                    self._cv.wait(timeout)
                if self._stopping:
                    return
                item = self._queue.popleft() if self._queue else None
            if item is None:
                log.info("idle for %.0f s: unloading models", self.idle_unload_s)
                self._unload(reason="idle")
                continue
            if item["type"] == "unload":
                self._unload(reason="request")
            else:
                self._run_job(item)
            self._last_activity = time.monotonic()

    def _unload(self, reason: str) -> None:
        try:
            self.runner.unload()
        except Exception as exc:  # noqa: BLE001
            log.exception("unload failed")
            self.send_error(None, "internal", f"Unload failed: {exc}", tb=traceback.format_exc())
        self.send_status("ready", unloaded=reason)

    def _intake(self, check: Callable[[], None], *, array: Any = None, path: str | None = None,
                what: str = "The image the add-on sent") -> bytes:
        """One image, read and validated in memory (nothing is stored yet): bytes the add-on sent
        (``array``) or a named file (``path``), then checked by the runner's ``prepare_image`` when it has one."""
        from .intake import check_image_bytes, read_image_source

        if array is not None:
            data = memoryview(np.ascontiguousarray(array, dtype=np.uint8)).cast("B")
            check_image_bytes(data, what)
        else:
            data = read_image_source(path)
        prepare = getattr(self.runner, "prepare_image", None)
        return bytes(prepare(bytes(data), check)) if callable(prepare) else bytes(data)

    def _read_image(self, msg: dict[str, Any], check: Callable[[], None]) -> bytes | None:
        """The request's image (see :meth:`_intake`), or None when it names none."""
        arrays = msg.get("arrays") or {}
        if "image_png" in arrays:
            return self._intake(check, array=arrays["image_png"])
        if isinstance(msg.get("image"), str) and msg["image"]:
            return self._intake(check, path=msg["image"])
        return None

    def _read_views(self, msg: dict[str, Any], check: Callable[[], None]) -> list[bytes]:
        """The extra views of a multi-view request (``images[1:]``), each read and validated like the image."""
        from .validation import view_array_names

        arrays = msg.get("arrays") or {}
        names = view_array_names(arrays)
        paths = msg.get("images") or []
        if names and len(paths) > 1:
            raise _errors.BadInput("Extra views came both as paths (images) and as bytes (arrays.view_png_*).",
                                   field="images")
        out = []
        for k, name in enumerate(names, 1):
            check()
            out.append(self._intake(check, array=arrays[name], what=f"Extra view {k} the add-on sent"))
        for path in paths[1:]:
            check()
            out.append(self._intake(check, path=path))
        return out

    def _open_job(self, msg: dict[str, Any], cancel: threading.Event) -> _jobs.Job:
        """Validate the inputs, then create/reopen the job folder and store them (in that order, so
        a bad input or a cancel leaves nothing half-written). Cancel is honoured between steps."""
        def check() -> None:
            if cancel.is_set():
                raise _errors.Cancelled(stage="opening")

        check()
        if self.store.get(msg["job"]) is None:
            validate_request(msg)  # a new job: complete now (a retry completes from its stored settings)
        if msg.get("images") and not msg.get("image"):
            msg["image"] = msg["images"][0]
        image = self._read_image(msg, check)
        views = self._read_views(msg, check)
        src_job = None
        if msg["type"] == "upscale" and image is None and msg.get("source_job") is not None:
            src_job = self.store.get(validate_request(msg, partial=True)["source_job"])
            if src_job is None:
                raise _errors.BadInput(f"Unknown source job {msg.get('source_job')!r} for upscale.", field="source_job")
            src_settings = src_job.meta().get("settings", {})
            if not isinstance(src_settings, dict):
                raise _errors.BadInput(f"The source job {src_job.id} has a malformed job.json (settings).",
                                       field="source_job")
        arrays = msg.get("arrays") or {}
        mesh = {k: v for k, v in arrays.items() if k != "image_png" and not k.startswith("view_png_")}
        check()
        settings = {k: v for k, v in msg.items() if k not in ("type", "job", "arrays")}
        job = self.store.open(msg["job"], kind=msg["type"], settings=settings)
        if image is not None:
            job.save_image_bytes(image)
        elif src_job is not None:
            if src_job.image_path.exists() and not job.image_path.exists():
                job.save_image_file(src_job.image_path)
            job.update(source_job=src_job.id, seed=src_job.meta().get("settings", {}).get("seed"))
        for k, data in enumerate(views, 1):
            job.save_view_bytes(k, data)
        check()
        if mesh:
            job.save_mesh(mesh)
        elif job.mesh_path.exists() and msg["type"] in ("texture", "generate"):
            msg.setdefault("arrays", {}).update(job.load_mesh())   # retry: reuse the stored mesh / guide
        # Retry: fields the request leaves out come from the job's stored settings (seed, type...)
        stored = job.meta().get("settings", {})
        for key, value in (stored.items() if isinstance(stored, dict) else ()):
            if key != "image":
                msg.setdefault(key, value)
        msg.update(validate_request(msg))  # the merged request, stored settings included
        check()
        return job

    def _run_job(self, msg: dict[str, Any]) -> None:
        job_id = msg["job"]
        ctx: JobContext | None = None
        with self._cv:
            cancel = self._active.setdefault(job_id, threading.Event())
        try:
            job = self._open_job(msg, cancel)
            ctx = JobContext(self, msg, job, cancel)
            with self._cv:
                if self._stopping:
                    return
                self._current = ctx
            job.set_status("running", started=time.time())
            self.send_status("busy")
            log.info("job %s (%s) started", job_id, msg["type"])
            kind, meta, arrays = self.runner.run(ctx)
            ctx.check_cancel()  # a cancel that came during the last, uncheckable step: no result
            meta = dict(meta or {})
            meta["elapsed_s"] = round(time.monotonic() - ctx.started, 3)
            if not msg.get("no_store"):
                job.save_result(arrays, meta)
            job.set_status("done", finished=time.time())
            log.info("job %s done in %.2f s", job_id, meta["elapsed_s"])
            self.send({"type": "result", "job": job_id, "kind": kind, "meta": meta, "arrays": arrays,
                       "folder": str(job.root)})
        except BaseException as exc:  # noqa: BLE001 - report everything, keep serving
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            kind, message, advice = classify_error(exc)
            if kind == "cancelled":
                log.info("job %s cancelled", job_id)
                self._mark(job_id, "cancelled")
                self.send({"type": "cancelled", "job": job_id,
                           "stage": ctx.stage if ctx else getattr(exc, "stage", None), "step": ctx.step if ctx else 0,
                           "requested_step": getattr(ctx, "cancel_step", None)})
            else:
                log.error("job %s failed (%s): %s", job_id, kind, message, exc_info=kind == "internal")
                if kind == "oom":
                    try:
                        self.runner.unload()
                    except Exception:  # noqa: BLE001
                        log.exception("unload after OOM failed")
                self._mark(job_id, "failed", error={"kind": kind, "message": message})
                self.send_error(job_id, kind, message, advice, traceback.format_exc(),
                                field=getattr(exc, "field", None))
        finally:
            with self._cv:
                self._current = None
                self._active.pop(job_id, None)
                self._release(job_id)
            if not self._stopping:
                self.send_status("ready")


# --------------------------------------------------------------------------------------------------
# process setup


def protect_stdio() -> tuple[int, int]:
    """Move the protocol onto private fds; point fd 1 at fd 2 and fd 0 at /dev/null.

    Returns ``(proto_in_fd, proto_out_fd)``. After this, Python prints, C-level writes to fd 1 and
    child processes' stdout all land in the log (stderr), and nothing else can read our stdin.
    """
    proto_out = os.dup(1)
    proto_in = os.dup(0)
    if os.name == "nt":  # binary mode for the CRT file descriptors
        import msvcrt

        msvcrt.setmode(proto_out, os.O_BINARY)
        msvcrt.setmode(proto_in, os.O_BINARY)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives for the process
    if hasattr(os, "set_inheritable"):
        os.set_inheritable(proto_out, False)
        os.set_inheritable(proto_in, False)
    proto.enlarge_pipe(proto_out)
    proto.enlarge_pipe(proto_in)
    return proto_in, proto_out


def set_parent_death_signal(parent_pid: int | None = None) -> bool:
    """Linux: ask the kernel to SIGTERM this process when its parent dies. False elsewhere.

    Note that the kernel ties this to the parent *thread* that spawned us.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        log.warning("parent %d already gone", parent_pid)
        os._exit(0)
    return True


def _setup_logging(log_file: str | None, verbose: bool) -> _TailHandler:
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    tail = _TailHandler()
    tail.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler, tail]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return tail


def make_runner(args: argparse.Namespace) -> Runner:
    """The job runner chosen by ``--runner`` (``pipelines`` by default, ``fake`` for tests)."""
    if args.runner == "fake":
        from .fake_runner import FakeRunner

        return FakeRunner(args)
    return PipelineRunner(args)


def serve(args: argparse.Namespace) -> int:
    """Entry point of ``trellis2 serve``: ``--stdio`` (what the add-on starts) or ``--listen HOST:PORT``."""
    if args.listen is not None:
        if args.stdio:
            print("trellis2 serve: choose --stdio or --listen, not both", file=sys.stderr)
            return 2
        return serve_tcp(args)
    if not args.stdio:
        print("trellis2 serve: pass --stdio (the add-on's pipes) or --listen HOST:PORT", file=sys.stderr)
        return 2
    # stderr first (it becomes the log), then the protocol fds
    tail = _setup_logging(args.log, args.verbose)
    proto_in, proto_out = protect_stdio()
    if args.pdeathsig:
        set_parent_death_signal(args.parent_pid)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path.home() / ".cache" / "trellis2-blender"
    log.info("trellis2 backend %s (pid %d, python %s), cache %s", __version__, os.getpid(),
             platform.python_version(), cache)
    server = Server(proto.FrameReader(proto_in, max_payload=int(args.max_payload_mb * (1 << 20))),
                    proto.FrameWriter(proto_out), make_runner(args), _jobs.JobStore(cache),
                    idle_unload_s=max(0.0, args.idle_unload) * 60.0, log_path=args.log, tail=tail)
    forward = _ForwardHandler(server)
    forward.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger().addHandler(forward)
    _exit_process(server.run())


def _exit_process(code: int) -> None:
    """Flush the log and the standard streams, then leave without the interpreter teardown: with
    torch/CUDA loaded it can take seconds, and everything that matters (job folders, log) is on disk."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def serve_tcp(args: argparse.Namespace) -> int:
    """``trellis2 serve --listen HOST:PORT``: the same protocol over TCP (TLS optional), token-checked.

    Prints ``listening on HOST:PORT`` on stdout once the socket is bound; SIGTERM/SIGINT shut down
    cleanly (running jobs cancelled, connections closed)."""
    import signal

    from . import transport

    try:
        host, port = transport.parse_listen(args.listen)
        token = transport.read_token_file(args.token_file) if args.token_file else None
        if bool(args.tls_cert) != bool(args.tls_key):
            raise transport.TransportError("--tls-cert and --tls-key go together")
        ssl_ctx = transport.server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        if not transport.is_loopback(host) and token is None:
            raise transport.TransportError(
                f"refusing to listen on {host} without a token: run 'trellis2 token FILE' and pass --token-file FILE")
    except transport.TransportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # bind first: a port in use, or the warning, must reach the terminal (not only a --log file)
    holder: dict[str, Server] = {}
    try:
        listener = transport.Listener(host, port, lambda peer: holder["server"].serve_peer(peer), token=token,
                                      ssl_context=ssl_ctx, max_payload=int(args.max_payload_mb * (1 << 20)),
                                      idle_timeout=args.idle_timeout, max_connections=args.max_connections)
    except (OSError, transport.TransportError) as exc:
        print(f"error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    warning = transport.exposure_warning(host, ssl_ctx is not None)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    tail = _setup_logging(args.log, args.verbose)
    if warning:
        log.warning("%s", warning)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path.home() / ".cache" / "trellis2-blender"
    server = holder["server"] = Server(None, None, make_runner(args), _jobs.JobStore(cache),  # type: ignore[arg-type]
                                       idle_unload_s=max(0.0, args.idle_unload) * 60.0, log_path=args.log,
                                       tail=tail, max_jobs_per_peer=args.max_jobs)
    forward = _ForwardHandler(server)
    forward.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger().addHandler(forward)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        server.stop(0)
        threading.Timer(_EXIT_GRACE_S * 4, lambda: os._exit(0)).start()   # a job that ignores its cancel

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    listener.start()
    shown = f"[{listener.address[0]}]" if ":" in listener.address[0] else listener.address[0]
    log.info("trellis2 backend %s listening on %s:%d (%s, %s)", __version__, shown, listener.address[1],
             "TLS" if ssl_ctx else "no TLS", "token required" if token else "no token")
    print(f"listening on {shown}:{listener.address[1]}", flush=True)
    code = server.run()
    server.send_status("stopping")
    listener.close()
    _exit_process(code)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` and ``token`` subcommands (no torch import here)."""
    p = subparsers.add_parser("serve", help="run the backend server for the Blender add-on",
                              description="Serve TRELLIS.2 jobs over stdin/stdout (the add-on starts this) "
                                          "or over TCP (--listen; a remote backend for other machines).")
    p.add_argument("--stdio", action="store_true", help="speak the frame protocol on stdin/stdout")
    p.add_argument("--listen", metavar="HOST:PORT", default=None, nargs="?", const="127.0.0.1:47860",
                   help="serve over TCP instead (alone: 127.0.0.1:47860; any non-loopback address needs --token-file)")
    p.add_argument("--token-file", metavar="FILE", help="require the token in FILE (made by 'trellis2 token FILE')")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key")
    p.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                   help="close a TCP connection silent for S seconds with no job of its own running (0: never)")
    p.add_argument("--max-jobs", type=int, default=8, metavar="N", help="jobs one TCP connection may have queued")
    p.add_argument("--max-connections", type=int, default=16, metavar="N", help="TCP connections served at once")
    p.add_argument("--log", metavar="FILE", help="append the log (and all stray output) to FILE")
    p.add_argument("--cache-dir", metavar="DIR", help="job folders go to DIR/jobs")
    p.add_argument("--model-dir", metavar="DIR", help="TRELLIS.2 weights folder (pipeline.json, ckpts/)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--low-vram", action="store_true", help="keep only the running stage on the GPU")
    p.add_argument("--idle-unload", type=float, default=0.0, metavar="MIN",
                   help="unload the models after MIN idle minutes (0: never)")
    p.add_argument("--max-payload-mb", type=float, default=float(proto.DEFAULT_MAX_PAYLOAD >> 20),
                   help="reject incoming frames with a bigger payload")
    p.add_argument("--pdeathsig", action="store_true", help="Linux: exit when the parent process dies")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--runner", choices=sorted(_RUNNERS), default="pipelines", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=serve)
    t = subparsers.add_parser("token", help="write a new random access token for 'serve --listen'",
                              description="Write a random token to FILE (mode 0600) for 'trellis2 serve "
                                          "--token-file FILE'; give the same token to the add-on (Preferences).")
    t.add_argument("file", metavar="FILE")
    t.add_argument("--force", action="store_true", help="replace an existing FILE")
    t.add_argument("--print", dest="show", action="store_true", help="also print the token (for pasting)")
    t.set_defaults(func=make_token)


def make_token(args: argparse.Namespace) -> int:
    """``trellis2 token FILE``: a new token, written owner-only."""
    from .transport import write_token_file

    try:
        token = write_token_file(args.file, overwrite=args.force)
    except FileExistsError:
        print(f"error: {args.file} exists (use --force to replace it)", file=sys.stderr)
        return 1
    print(f"token written to {args.file} (mode 0600)", file=sys.stderr)
    if args.show:
        print(token)
    return 0
