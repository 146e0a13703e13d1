"""The add-on's live job session (bpy glue around the bpy-free :class:`jobs.JobManager`): the manager
and its backend client, the UI polling timer, the panel state (``WindowManager.trellis2``), the
history list, request building from the panel and preferences, and applying finished results.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import bpy
import numpy as np

from . import core, jobs, materials, runtime, scene_results, setup_check
from .backend.jobs import Job
from .preferences import cache_dir, get_prefs
from .prefs_access import job_store

JOB_TIMEOUT_S = 6 * 3600.0


# --------------------------------------------------------------------------------------------------
# backend / manager


def _client_factory():
    """Start the backend client with the current preferences (raises RuntimeError with a reason)."""
    prefs = get_prefs()
    if setup_check.remote(prefs):
        return _remote_client(prefs)
    python = bpy.path.abspath(prefs.backend_python) if prefs.backend_python else ""
    if not python:
        raise RuntimeError("Backend Python not set (Preferences › Add-ons › TRELLIS.2)")
    if not os.path.isfile(python):
        raise RuntimeError(f"Backend Python not found: {python}")
    from . import backend_client

    cache = cache_dir(prefs)
    log = cache / "logs" / "backend.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return backend_client.BackendClient(
        python, runtime.extension_dir(), log_path=log, cache_dir=cache,
        model_dir=bpy.path.abspath(prefs.model_dir) if prefs.model_dir else None,
        device=prefs.device.lower(), low_vram=bool(prefs.low_vram),
        idle_unload_min=float(prefs.idle_unload_minutes))


def _remote_client(prefs):
    """A client of a remote backend (``trellis2 serve --listen``) from the preferences."""
    from . import remote_client

    host = prefs.remote_host.strip()
    if not host:
        raise RuntimeError("Remote backend host not set (Preferences › Add-ons › TRELLIS.2)")
    ca = bpy.path.abspath(prefs.remote_ca_file) if prefs.remote_tls and prefs.remote_ca_file else None
    if ca and not os.path.isfile(ca):
        raise RuntimeError(f"CA file not found: {ca}")
    return remote_client.RemoteBackendClient(host, int(prefs.remote_port), prefs.remote_token or None,
                                              tls=bool(prefs.remote_tls), ca_file=ca, cache_dir=cache_dir(prefs))


def manager() -> jobs.JobManager:
    if runtime.manager is None:
        runtime.manager = jobs.JobManager(_client_factory)
    return runtime.manager


def job_running() -> bool:
    return runtime.manager is not None and runtime.manager.active() is not None


def sync_state(wm=None) -> None:
    """Copy the manager's state into ``WindowManager.trellis2`` (what the panel draws)."""
    wm = wm or bpy.context.window_manager
    st = getattr(wm, "trellis2", None)
    if st is None:
        return
    m = runtime.manager
    if m is None:
        st.backend_state, st.running = "STOPPED", False
        return
    st.backend_state = m.backend_state
    st.backend_info = m.backend_info[:200]
    st.log_path = m.log_path()
    rec = m.active()
    st.running = rec is not None
    if rec is not None:
        st.job_id, st.job_kind = rec.job_id, rec.kind
        st.step, st.total, st.eta, st.stage_progress = rec.step, rec.total, rec.eta(), rec.fraction
        estimate = run_timings().estimate(core.RunTimings.key(rec.kind, rec.request)) if rec.status == "running" else None
        now = time.monotonic()
        st.progress, left = core.overall_progress(rec.stage_times, rec.stage, rec.fraction, now - rec.stage_started,
                                                  rec.duration, estimate)
        st.job_eta = -1.0 if left is None else left
        text = rec.progress_text()
        if left is not None and rec.status == "running":   # the whole job's ETA replaces the stage's
            stage_text = text.split(" · ")[0]
            n = len(estimate["order"]) if estimate else 0
            prefix = f"{min(len(rec.stage_times) + 1, n)}/{n} " if n else ""
            text = f"{prefix}{stage_text} · {jobs.format_eta(left) or '0:00'} left"
        st.stage = text
    if m.backend_state == "CRASHED" and m.crash_message and not st.error:
        set_error(wm, m.crash_message, jobs.ERROR_HINTS["crashed"], "crashed")


def run_timings() -> core.RunTimings:
    """This machine's learned job durations (cached per cache folder; re-read when it changes)."""
    path = cache_dir() / "timings.json"
    cached = getattr(runtime, "timings", None)
    if cached is None or cached.path != path:
        cached = runtime.timings = core.RunTimings(path)
    return cached


def set_error(wm, message: str, hint: str = "", kind: str = "", job: str = "") -> None:
    """Show an error in the panel; ``kind``/``job`` (a failed job's) enable the error's fix action."""
    st = wm.trellis2
    st.error = message[:1000]
    st.error_hint = hint[:300]
    st.error_kind = kind
    st.error_job = job


def _tag_redraw() -> None:
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


def _job_timer():
    """UI timer: poll the backend, apply finished results, keep the panel fresh."""
    m = runtime.manager
    if m is None:
        return None
    try:
        m.poll()
    except Exception as exc:  # keep the timer alive; show the problem
        set_error(bpy.context.window_manager, f"Backend polling failed: {exc}", kind="polling")
    for rec in list(m.jobs.values()):
        if rec.done and not rec.applied:
            rec.applied = True
            if rec.status == "done":
                window = next(iter(bpy.context.window_manager.windows), None)
                if window is not None:
                    with bpy.context.temp_override(window=window):
                        # second positional True: push an undo step, as a click would
                        bpy.ops.trellis.apply_result("EXEC_DEFAULT", True, job=rec.job_id)
                else:
                    bpy.ops.trellis.apply_result("EXEC_DEFAULT", True, job=rec.job_id)
            elif rec.status == "failed":
                set_error(bpy.context.window_manager, rec.error, rec.advice, rec.error_kind, rec.job_id)
            refresh_history(bpy.context.window_manager)
    sync_state()
    _tag_redraw()
    if m.active() is not None:
        return 0.2
    # keep watching a live backend (idle crash → error box); stop once it is down and reported
    return 1.0 if m.client is not None and (m.alive or m.backend_state not in ("STOPPED", "CRASHED")) else None


def start_polling() -> None:
    if not bpy.app.background and not bpy.app.timers.is_registered(_job_timer):
        bpy.app.timers.register(_job_timer, first_interval=0.1, persistent=True)


def live_job_ids() -> set[str]:
    """Jobs a live backend of this session still owns (queued or running)."""
    m = runtime.manager
    if m is None or not m.alive:
        return set()
    return {r.job_id for r in m.jobs.values() if not r.done}


def refresh_history(wm=None) -> None:
    """Rebuild ``WindowManager.trellis2.history`` from the cache folder; jobs left ``running`` by a
    backend that is gone (killed, crashed, Blender quit) are marked failed in their job folder."""
    wm = wm or bpy.context.window_manager
    st = wm.trellis2
    try:
        entries = jobs.read_history(job_store().root)
    except Exception:
        entries = []
    for e in core.stale_jobs(entries, live_job_ids()):
        if core.mark_failed(Job(e["folder"]).meta_path):
            e["status"], e["error"] = "failed", core.INTERRUPTED_MESSAGE
    st.history.clear()
    for e in entries:
        item = st.history.add()
        item.name = e["job"]
        item.title = e.get("title") or e["job"]
        item.error = str(e.get("error") or "")[:300]
        item.kind, item.pipeline, item.seed = e["kind"], e["pipeline"], e["seed"]
        item.duration, item.folder, item.status = e["duration"], e["folder"], e["status"]
        item.image_path = e["image"]
        item.created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["created"])) if e["created"] else ""
    st.history_index = min(st.history_index, max(0, len(st.history) - 1))


# --------------------------------------------------------------------------------------------------
# inputs


def image_to_file(img: "bpy.types.Image") -> str:
    """A file path holding ``img``: its own file when clean on disk, else a PNG written to the cache."""
    if img.source == "FILE" and not img.packed_file and not img.is_dirty:
        path = bpy.path.abspath(img.filepath, library=img.library)
        if os.path.isfile(path):
            return path
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError(f"Image {img.name!r} has no pixels (unreadable?)")
    px = np.empty(w * h * 4, dtype=np.float32)
    img.pixels.foreach_get(px)
    rgba = (np.clip(np.flipud(px.reshape(h, w, 4)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    out = cache_dir() / "inputs" / f"{bpy.path.clean_name(img.name)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(materials.png_bytes(rgba, level=6))
    return str(out)


def resolve_image(context, filepath: str) -> str:
    """The input image file for a job (operator argument, else the panel's image); ValueError if bad."""
    if filepath:
        path = bpy.path.abspath(filepath)
    else:
        img = context.scene.trellis2.image
        if img is None:
            raise ValueError("No input image: pick an image in the TRELLIS panel or pass filepath=")
        path = image_to_file(img)
    problem = jobs.check_image_file(path)
    if problem:
        raise ValueError(problem)
    return path


def stage_params(settings) -> dict:
    return {
        "sparse_structure": {"steps": settings.ss_steps, "guidance_strength": settings.ss_guidance},
        "shape_slat": {"steps": settings.shape_steps, "guidance_strength": settings.shape_guidance},
        "tex_slat": {"steps": settings.tex_steps, "guidance_strength": settings.tex_guidance},
    }


def _common_request(context) -> dict:
    """The per-job fields every request carries (generate, texture, upscale, re-run, retry): the one
    place they are built from the preferences."""
    prefs = get_prefs(context)
    req = {"device": prefs.device.lower(), "low_vram": bool(prefs.low_vram),
           "precision": prefs.precision.lower(), "max_tokens": int(prefs.max_tokens)}
    if prefs.model_dir:
        req["model_dir"] = bpy.path.abspath(prefs.model_dir)
    if prefs.dinov3_dir:
        req["dinov3_dir"] = bpy.path.abspath(prefs.dinov3_dir)
    if prefs.rembg_dir:
        req["rembg_dir"] = bpy.path.abspath(prefs.rembg_dir)
    return req


def check_backend_configured(context) -> Optional[str]:
    """Why a job cannot be sent (backend Python, model folders that are set but unusable), or None."""
    prefs = get_prefs(context)
    problem = setup_check.python_problem(prefs)
    if problem:
        return problem
    folders = setup_check.folder_problems(prefs)
    if folders:
        return f"{folders[0]} (fix it in Preferences › Add-ons › TRELLIS.2)"
    return None



def apply_record(context, rec: jobs.JobRecord):
    obj = scene_results.APPLY[rec.kind](context, rec)
    rec.applied = True
    if rec.stage_times:   # learn this machine's timings for the next whole-job ETA
        run_timings().record(core.RunTimings.key(rec.kind, rec.request), rec.stage_times, rec.duration)
    context.window_manager.trellis2.result_note = result_note(rec)
    if obj is not None and context.window_manager.trellis2.result_note:
        obj["trellis2_note"] = context.window_manager.trellis2.result_note
    context.window_manager.trellis2.last_duration = rec.duration
    context.window_manager.trellis2.error = ""
    return obj



def retryable_job(context) -> Optional[jobs.JobRecord]:
    """The failed job the panel's error belongs to, when it can be sent again as it was
    (generate / upscale: their requests are kept whole; texture requests drop their mesh arrays)."""
    st = context.window_manager.trellis2
    m = runtime.manager
    rec = m.jobs.get(st.error_job) if (m is not None and st.error_job) else None
    if rec is None or rec.status != "failed" or rec.kind not in ("generate", "upscale"):
        return None
    if rec.kind == "upscale" and bpy.data.objects.get(rec.extra.get("object", "")) is None:
        return None
    return rec


def result_note(rec: jobs.JobRecord) -> str:
    """What the user should know about a finished job's result (the token budget lowered a cascade's
    resolution), or ''."""
    for note in rec.notes:
        pipe = str(rec.request.get("pipeline_type") or rec.request.get("target") or "")
        nominal = int(pipe.split("_")[0]) if pipe.split("_")[0].isdigit() else 0
        if nominal and note["resolution"] < nominal:
            return core.token_budget_text(note, nominal)
    return ""
