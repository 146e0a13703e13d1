"""Opening and running one job (helpers of :class:`~backend.server.loop.Server`, called on its worker
thread): a TCP client's request screened, the input images read and validated, the job folder
created and its inputs stored (in that order), the runner called and the answer sent."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import errors as _errors
from .. import jobs as _jobs
from ..validation import validate_request
from .classify import classify_error
from .context import JobContext, Runner

if TYPE_CHECKING:
    from .loop import Server

log = logging.getLogger("backend.server")


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


def _intake(runner: Runner, check: Callable[[], None], *, array: Any = None, path: str | None = None,
            what: str = "The image the add-on sent") -> bytes:
    """One image, read and validated in memory (nothing is stored yet): bytes the add-on sent
    (``array``) or a named file (``path``), then checked by the runner's ``prepare_image`` when it has one."""
    from ..intake import check_image_bytes, read_image_source

    if array is not None:
        data = memoryview(np.ascontiguousarray(array, dtype=np.uint8)).cast("B")
        check_image_bytes(data, what)
    else:
        data = read_image_source(path)
    prepare = getattr(runner, "prepare_image", None)
    return bytes(prepare(bytes(data), check)) if callable(prepare) else bytes(data)


def _read_image(runner: Runner, msg: dict[str, Any], check: Callable[[], None]) -> bytes | None:
    """The request's image (see :func:`_intake`), or None when it names none."""
    arrays = msg.get("arrays") or {}
    if "image_png" in arrays:
        return _intake(runner, check, array=arrays["image_png"])
    if isinstance(msg.get("image"), str) and msg["image"]:
        return _intake(runner, check, path=msg["image"])
    return None


def _read_views(runner: Runner, msg: dict[str, Any], check: Callable[[], None]) -> list[bytes]:
    """The extra views of a multi-view request (``images[1:]``), each read and validated like the image."""
    from ..validation import view_array_names

    arrays = msg.get("arrays") or {}
    names = view_array_names(arrays)
    paths = msg.get("images") or []
    if names and len(paths) > 1:
        raise _errors.BadInput("Extra views came both as paths (images) and as bytes (arrays.view_png_*).",
                               field="images")
    out = []
    for k, name in enumerate(names, 1):
        check()
        out.append(_intake(runner, check, array=arrays[name], what=f"Extra view {k} the add-on sent"))
    for path in paths[1:]:
        check()
        out.append(_intake(runner, check, path=path))
    return out


def open_job(store: _jobs.JobStore, runner: Runner, msg: dict[str, Any],
             cancel: threading.Event) -> _jobs.Job:
    """Validate the inputs, then create/reopen the job folder and store them (in that order, so
    a bad input or a cancel leaves nothing half-written). Cancel is honoured between steps."""
    def check() -> None:
        if cancel.is_set():
            raise _errors.Cancelled(stage="opening")

    check()
    if store.get(msg["job"]) is None:
        validate_request(msg)  # a new job: complete now (a retry completes from its stored settings)
    if msg.get("images") and not msg.get("image"):
        msg["image"] = msg["images"][0]
    image = _read_image(runner, msg, check)
    views = _read_views(runner, msg, check)
    src_job = None
    if msg["type"] == "upscale" and image is None and msg.get("source_job") is not None:
        src_job = store.get(validate_request(msg, partial=True)["source_job"])
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
    job = store.open(msg["job"], kind=msg["type"], settings=settings)
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


def run_job(server: Server, msg: dict[str, Any]) -> None:
    """Open and run one job from the queue (on the worker thread), then send its answer: ``result``,
    ``cancelled`` or a typed ``error``; the job id is released once the answer is sent."""
    job_id = msg["job"]
    ctx: JobContext | None = None
    with server._cv:
        cancel = server._active.setdefault(job_id, threading.Event())
    try:
        job = open_job(server.store, server.runner, msg, cancel)
        ctx = JobContext(server, msg, job, cancel)
        with server._cv:
            if server._stopping:
                return
            server._current = ctx
        job.set_status("running", started=time.time())
        server.send_status("busy")
        log.info("job %s (%s) started", job_id, msg["type"])
        kind, meta, arrays = server.runner.run(ctx)
        ctx.check_cancel()  # a cancel that came during the last, uncheckable step: no result
        meta = dict(meta or {})
        meta["elapsed_s"] = round(time.monotonic() - ctx.started, 3)
        if not msg.get("no_store"):
            job.save_result(arrays, meta)
        job.set_status("done", finished=time.time())
        log.info("job %s done in %.2f s", job_id, meta["elapsed_s"])
        server.send({"type": "result", "job": job_id, "kind": kind, "meta": meta, "arrays": arrays,
                     "folder": str(job.root)})
    except BaseException as exc:  # noqa: BLE001 - report everything, keep serving
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        kind, message, advice = classify_error(exc)
        if kind == "cancelled":
            log.info("job %s cancelled", job_id)
            server._mark(job_id, "cancelled")
            server.send({"type": "cancelled", "job": job_id,
                         "stage": ctx.stage if ctx else getattr(exc, "stage", None), "step": ctx.step if ctx else 0,
                         "requested_step": getattr(ctx, "cancel_step", None)})
        else:
            log.error("job %s failed (%s): %s", job_id, kind, message, exc_info=kind == "internal")
            if kind == "oom":
                try:
                    server.runner.unload()
                except Exception:  # noqa: BLE001
                    log.exception("unload after OOM failed")
            server._mark(job_id, "failed", error={"kind": kind, "message": message})
            server.send_error(job_id, kind, message, advice, traceback.format_exc(),
                              field=getattr(exc, "field", None))
    finally:
        with server._cv:
            server._current = None
            server._active.pop(job_id, None)
            server._release(job_id)
        if not server._stopping:
            server.send_status("ready")
