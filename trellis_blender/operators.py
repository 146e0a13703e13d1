"""Operators: generate, texture selected, upscale, backend control, result import, O-Voxel import, history.

Scripting API (``blender -b --python``)::

    prefs = bpy.context.preferences.addons["bl_ext.user_default.trellis2"].preferences
    prefs.backend_python = "/path/to/venv/bin/python"; prefs.model_dir = "/models/TRELLIS.2-4B"
    bpy.ops.trellis.generate(filepath="chair.png", pipeline="1024_cascade", seed=7)
    bpy.ops.trellis.texture_selected(filepath="wood.png", texture_size=1024)
    bpy.ops.trellis.upscale()

In background mode (``bpy.app.background``) the job operators block, driving the backend client's
``poll()`` until the result is in the scene, and return ``{'FINISHED'}``; on failure they return
``{'CANCELLED'}`` with the error reported (as a warning, so a batch script keeps running) and stored
in ``WindowManager.trellis2.error``. In the UI they return at once; a timer polls the backend and
applies the result through the undoable ``trellis.apply_result`` operator.

Every scene edit happens inside an operator with ``UNDO``; bad input is rejected before anything in
the file changes.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Optional

import bpy
import numpy as np
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from . import cutout, jobs, materials, mesh_import, runtime, texture_objects, views
from .preferences import cache_dir, get_prefs
from .properties import PIPELINES

JOB_TIMEOUT_S = 6 * 3600.0


# --------------------------------------------------------------------------------------------------
# backend / manager


def _client_factory():
    """Start the backend client with the current preferences (raises RuntimeError with a reason)."""
    prefs = get_prefs()
    if prefs.backend_mode == "REMOTE":
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
    from . import backend_client

    host = prefs.remote_host.strip()
    if not host:
        raise RuntimeError("Remote backend host not set (Preferences › Add-ons › TRELLIS.2)")
    ca = bpy.path.abspath(prefs.remote_ca_file) if prefs.remote_tls and prefs.remote_ca_file else None
    if ca and not os.path.isfile(ca):
        raise RuntimeError(f"CA file not found: {ca}")
    return backend_client.RemoteBackendClient(host, int(prefs.remote_port), prefs.remote_token or None,
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
        st.job_id, st.job_kind, st.stage = rec.job_id, rec.kind, rec.progress_text()
        st.step, st.total, st.eta, st.progress = rec.step, rec.total, rec.eta(), rec.fraction()
    if m.backend_state == "CRASHED" and m.crash_message and not st.error:
        set_error(wm, m.crash_message, jobs.ERROR_HINTS["crashed"])


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
        set_error(bpy.context.window_manager, f"Backend polling failed: {exc}")
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


def refresh_history(wm=None) -> None:
    """Rebuild ``WindowManager.trellis2.history`` from the cache folder."""
    wm = wm or bpy.context.window_manager
    st = wm.trellis2
    try:
        entries = jobs.read_history(cache_dir() / "jobs")
    except Exception:
        entries = []
    st.history.clear()
    for e in entries:
        item = st.history.add()
        item.name = e["job"]
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


def backend_configured(context) -> bool:
    """A backend can be used: a remote one with a host, or a local one with its Python set."""
    prefs = get_prefs(context)
    if prefs.backend_mode == "REMOTE":
        return bool(prefs.remote_host.strip())
    return bool(prefs.backend_python)


def check_backend_configured(context) -> Optional[str]:
    prefs = get_prefs(context)
    if prefs.backend_mode == "REMOTE":
        return None if prefs.remote_host.strip() else "Remote backend host not set (Preferences › Add-ons › TRELLIS.2)"
    if not prefs.backend_python:
        return "Backend Python not set (Preferences › Add-ons › TRELLIS.2)"
    python = bpy.path.abspath(prefs.backend_python)
    if not os.path.isfile(python):
        return f"Backend Python not found: {python}"
    return None


# --------------------------------------------------------------------------------------------------
# applying results (scene edits; called inside UNDO operators)


def _result_arrays(rec: jobs.JobRecord) -> dict:
    return dict((rec.result or {}).get("arrays") or {})


def _texture_dir(rec: jobs.JobRecord) -> Optional[str]:
    folder = (rec.result or {}).get("folder")
    return os.path.join(folder, "blender") if folder and os.path.isdir(folder) else None


def _object_meta(rec: jobs.JobRecord) -> dict:
    req = rec.request
    meta = dict((rec.result or {}).get("meta") or {})
    return {"job": rec.job_id, "seed": int(meta.get("seed", req.get("seed", 0)) or 0),
            "pipeline": meta.get("pipeline_type", req.get("pipeline_type", req.get("target", ""))),
            "image_hash": rec.extra.get("image_hash"),
            "settings": {k: v for k, v in req.items() if k not in ("type", "job", "arrays")},
            "resolution": meta.get("resolution")}


def _needs_blender_bake(arrays: dict, material_mode: str) -> bool:
    a = mesh_import.canonical_arrays(arrays)
    return material_mode == "TEXTURES" and "base_color_texture" not in a and "coords" in a and "attrs" in a


def bake_textures_onto(context, obj, arrays: dict, resolution: int, size: int, save_dir, *,
                       aabb=((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)), to_grid=None, uv_name: str = "UVMap") -> None:
    """Give ``obj`` (a freshly imported result or O-Voxel) a UV map ``uv_name`` (Smart UV Project) and
    baked PBR textures sampled from the voxel attributes ``arrays["coords"/"attrs"]``; its vertex-attribute
    material is replaced. ``to_grid`` maps object-space points into the grid's frame (``aabb``) when
    the object is not in it (an O-Voxel imported at its source's size and up axis)."""
    from .backend.ovoxel.uvbake import bake_attributes

    me = obj.data
    loop_uv, tri = mesh_import.smart_uv_corners(context, obj)
    uv = np.asarray(tri["uv"], dtype=np.float32).reshape(-1, 3, 2)
    coords = np.asarray(arrays["coords"])
    attrs = np.asarray(arrays["attrs"], dtype=np.float32)
    base, mr, _coverage = bake_attributes(
        tri["vertices"], tri["faces"], uv, size,
        lambda pts: mesh_import.voxel_attrs_at(pts if to_grid is None else to_grid(pts), coords, attrs,
                                               resolution, aabb))
    mesh_import.set_uv_map(me, uv_name, loop_uv)
    name = obj.name
    img_bc = materials.image_from_array(f"{name}_BaseColor", base, save_dir=save_dir)
    img_mr = materials.image_from_array(f"{name}_MetallicRoughness", mr, non_color=True, save_dir=save_dir)
    mat = materials.texture_material(name, img_bc, img_mr, uv_name, blended=materials.alpha_varies(base[..., 3]))
    old = me.materials[0] if len(me.materials) else None
    if old is not None:
        me.materials[0] = mat
        if old.users == 0:
            bpy.data.materials.remove(old)
    else:
        me.materials.append(mat)


def apply_generate(context, rec: jobs.JobRecord) -> "bpy.types.Object":
    meta = _object_meta(rec)
    settings = context.scene.trellis2
    arrays = _result_arrays(rec)
    mode = rec.extra.get("material_mode", settings.material_mode)
    bake = _needs_blender_bake(arrays, mode)
    obj = mesh_import.import_result(
        context, arrays, name=rec.extra.get("name", "TRELLIS"), meta=meta,
        material_mode="VERTEX" if bake else mode, save_dir=_texture_dir(rec))
    if meta.get("resolution"):
        obj["trellis2_resolution"] = int(meta["resolution"])
    rmeta = dict((rec.result or {}).get("meta") or {})
    cutout.apply_result(context, arrays, rmeta)
    if rmeta.get("guide"):   # a blockout-guided result sits on its blockout
        views.place_on_guide(obj, rmeta["guide"], bpy.data.objects.get(rec.extra.get("blockout", "")),
                             rec.extra.get("placement", "REPLACE"))
    if bake:  # the backend sent voxel attributes only: bake them into textures here
        res = int(meta.get("resolution") or (int(np.asarray(arrays["coords"]).max()) + 1))
        size = int(rec.request.get("texture_size") or settings.texture_size)
        bake_textures_onto(context, obj, arrays, res, size, _texture_dir(rec))
    return obj


def apply_upscale(context, rec: jobs.JobRecord) -> "bpy.types.Object":
    obj = bpy.data.objects.get(rec.extra["object"])
    if obj is None or obj.type != "MESH":
        raise ValueError(f"The object {rec.extra['object']!r} is gone")
    meta = _object_meta(rec)
    arrays = _result_arrays(rec)
    mode = rec.extra.get("material_mode", "AUTO")
    bake = _needs_blender_bake(arrays, mode)
    new_mesh = mesh_import.build_result_mesh(arrays, name=obj.name + "_1536", meta=meta,
                                             material_mode="VERTEX" if bake else mode, save_dir=_texture_dir(rec))
    obj.data = new_mesh
    if bake:
        res = int(meta.get("resolution") or (int(np.asarray(arrays["coords"]).max()) + 1))
        size = int(rec.request.get("texture_size") or context.scene.trellis2.texture_size)
        bake_textures_onto(context, obj, arrays, res, size, _texture_dir(rec))  # old datablock stays in the file until saved without users; undo restores it
    mesh_import.set_job_properties(obj, meta)
    if meta.get("resolution"):
        obj["trellis2_resolution"] = int(meta["resolution"])
    obj["trellis2_upscaled_from"] = rec.extra.get("source_job", "")
    for other in context.view_layer.objects:
        other.select_set(other == obj)
    context.view_layer.objects.active = obj
    return obj


def apply_texture(context, rec: jobs.JobRecord) -> "bpy.types.Object":
    return texture_objects.apply_texture(context, rec, _texture_dir(rec))


def apply_cutout(context, rec: jobs.JobRecord) -> None:
    cutout.apply_result(context, _result_arrays(rec), dict((rec.result or {}).get("meta") or {}))


APPLY = {"generate": apply_generate, "texture": apply_texture, "upscale": apply_upscale, "cutout": apply_cutout}


def apply_record(context, rec: jobs.JobRecord):
    obj = APPLY[rec.kind](context, rec)
    rec.applied = True
    context.window_manager.trellis2.last_duration = rec.duration
    context.window_manager.trellis2.error = ""
    return obj


# --------------------------------------------------------------------------------------------------
# operator helpers


class _JobOperator:
    """Shared submit/block/report logic of the three job operators."""

    def fail(self, context, message: str, hint: str = "", kind: str = "", job: str = "") -> set:
        set_error(context.window_manager, message, hint, kind, job)
        # ERROR reports raise in scripted calls; batch scripts get CANCELLED plus a warning instead.
        self.report({"WARNING"} if bpy.app.background else {"ERROR"}, message)
        if bpy.app.background:
            print(f"TRELLIS: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)
        return {"CANCELLED"}

    def submit(self, context, kind: str, request: dict, extra: dict) -> jobs.JobRecord:
        context.window_manager.trellis2.error = ""
        rec = manager().submit(kind, request, extra)
        sync_state(context.window_manager)
        return rec

    def input_image(self, context) -> Optional[str]:
        """The job's input image file (operator ``filepath`` or the panel's image) once the backend is set up;
        None after reporting why not."""
        problem = check_backend_configured(context)
        if problem:
            self.fail(context, problem, jobs.ERROR_HINTS["not_configured"])
            return None
        try:
            return resolve_image(context, self.filepath)
        except ValueError as exc:
            self.fail(context, str(exc))
            return None

    def run_jobs(self, context, kind: str, jobs_: list[tuple[dict, dict]]) -> set:
        """Submit ``(request, extra)`` jobs of one kind, then :meth:`finish`."""
        try:
            recs = [self.submit(context, kind, request, extra) for request, extra in jobs_]
        except Exception as exc:
            return self.fail(context, f"Cannot start the backend: {exc}", jobs.ERROR_HINTS["crashed"])
        return self.finish(context, recs)

    def finish(self, context, recs: list) -> set:
        """Background: wait for the jobs and apply them here (one undo step). UI: start polling."""
        if not bpy.app.background:
            start_polling()
            return {"FINISHED"}
        m = manager()
        ok = False
        for rec in recs:
            m.wait(rec, timeout=JOB_TIMEOUT_S)
            if rec.status != "done":
                self.fail(context, rec.error or f"Job {rec.job_id} {rec.status}", rec.advice,
                          rec.error_kind, rec.job_id)
                continue
            try:
                apply_record(context, rec)
                ok = True
            except Exception as exc:
                self.fail(context, f"Could not import the result: {exc}")
        sync_state(context.window_manager)
        refresh_history(context.window_manager)
        return {"FINISHED"} if ok else {"CANCELLED"}


def _poll_common(cls, context) -> bool:
    if job_running():
        cls.poll_message_set("A TRELLIS job is running (cancel it first)")
        return False
    if not backend_configured(context):
        cls.poll_message_set("Set the backend Python (or a remote backend) in Preferences › Add-ons › TRELLIS.2")
        return False
    return True


# --------------------------------------------------------------------------------------------------
# job operators


class TRELLIS_OT_generate(_JobOperator, bpy.types.Operator):
    """Generate a textured 3D model from the image with TRELLIS.2"""

    bl_idname = "trellis.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(name="Image", subtype="FILE_PATH", options={"SKIP_SAVE"},
                             description="Input image file (default: the panel's image)")
    pipeline: EnumProperty(name="Pipeline", items=PIPELINES, default="1024_cascade", options={"SKIP_SAVE"})
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        return _poll_common(cls, context)

    def execute(self, context):
        settings = context.scene.trellis2
        image = self.input_image(context)
        if image is None:
            return {"CANCELLED"}
        pipeline = self.pipeline if self.properties.is_property_set("pipeline") else settings.pipeline
        if self.properties.is_property_set("seed"):
            seed = self.seed
        elif settings.randomize_seed:
            seed = settings.seed = random.randint(0, 2**31 - 1)
        else:
            seed = settings.seed
        request = dict(_common_request(context), image=image, seed=int(seed), pipeline_type=pipeline,
                       stage_params=stage_params(settings), background=settings.background.lower(),
                       decimation_target=int(settings.decimation_target),
                       texture_size=int(settings.texture_size),
                       output="textures" if settings.material_mode == "TEXTURES" else "vertex_attrs")
        name = bpy.path.display_name_from_filepath(image) or "TRELLIS"
        extra = {"image_hash": jobs.file_hash(image), "name": name, "material_mode": settings.material_mode}
        try:
            more = [image_to_file(img) for img in views.view_images(settings)]
        except ValueError as exc:
            return self.fail(context, str(exc))
        if more:
            request.update(images=[image, *more], multiview=settings.multiview.lower())
        if settings.use_blockout:
            fields, arrays, problem = views.guide_request(context, settings)
            if problem:
                return self.fail(context, problem)
            request.update(fields, arrays=arrays)
            extra.update(blockout=context.active_object.name, placement=settings.blockout_placement)
        return self.run_jobs(context, "generate", [(request, extra)])


class TRELLIS_OT_preview_cutout(_JobOperator, bpy.types.Operator):
    """Show the image the model will see: background removed and cropped, without generating"""

    bl_idname = "trellis.preview_cutout"
    bl_label = "Preview Cut-out"
    bl_options = {"REGISTER"}

    filepath: StringProperty(name="Image", subtype="FILE_PATH", default="", options={"SKIP_SAVE"},
                             description="Image file (default: the panel's image)")

    @classmethod
    def poll(cls, context):
        return _poll_common(cls, context)

    def execute(self, context):
        image = self.input_image(context)
        if image is None:
            return {"CANCELLED"}
        request = dict(_common_request(context), image=image, background=context.scene.trellis2.background.lower())
        return self.run_jobs(context, "cutout", [(request, {"name": bpy.path.display_name_from_filepath(image)})])


class TRELLIS_OT_texture_selected(_JobOperator, bpy.types.Operator):
    """Texture the selected meshes from the image, baked into their UV maps (new materials are added; the
    old ones keep their slots)"""

    bl_idname = "trellis.texture_selected"
    bl_label = "Texture Selected"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(name="Image", subtype="FILE_PATH", options={"SKIP_SAVE"})
    texture_size: IntProperty(name="Texture Size", default=2048, min=64, max=8192, options={"SKIP_SAVE"})
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        if not _poll_common(cls, context):
            return False
        if not context.selected_objects:
            cls.poll_message_set("Select one or more mesh objects")
            return False
        return True

    def execute(self, context):
        settings = context.scene.trellis2
        objs = list(context.selected_objects)
        meshes = [o for o in objs if o.type == "MESH"]
        if not meshes:
            names = ", ".join(o.name for o in objs[:3]) or "nothing"
            return self.fail(context, f"No mesh selected ({names} is not a mesh)")
        empty = [o.name for o in meshes if len(o.data.polygons) == 0]
        if empty:
            return self.fail(context, f"{empty[0]!r} has no faces to texture")
        if context.mode != "OBJECT":
            return self.fail(context, "Switch to Object Mode first")
        image = self.input_image(context)
        if image is None:
            return {"CANCELLED"}
        size = self.texture_size if self.properties.is_property_set("texture_size") else int(settings.texture_size)
        seed = self.seed if self.properties.is_property_set("seed") else settings.seed
        depsgraph = context.evaluated_depsgraph_get()
        payloads = []
        try:
            for obj in meshes:
                arrays, extra, line = texture_objects.texture_payload(context, obj, depsgraph)
                extra.update(image_hash=jobs.file_hash(image), material_slots=settings.texture_slots)
                payloads.append((arrays, extra))
                self.report({"INFO"}, line)
        except ValueError as exc:
            return self.fail(context, str(exc))
        common = dict(_common_request(context), image=image, seed=int(seed), texture_size=int(size),
                      resolution=int(settings.texture_resolution), stage_params=stage_params(settings),
                      background=settings.background.lower())
        return self.run_jobs(context, "texture", [(dict(common, arrays=arrays), extra) for arrays, extra in payloads])


def upscale_problem(context) -> Optional[str]:
    """Why the active object cannot be upscaled (None when it can)."""
    obj = context.active_object
    if obj is None or obj.type != "MESH":
        return "Select an object generated by TRELLIS"
    job = obj.get("trellis2_job")
    if not job:
        return "The active object was not generated by TRELLIS"
    if str(obj.get("trellis2_pipeline", "")) == "1536_cascade":
        return "Already at 1536"
    try:
        folder = cache_dir() / "jobs" / str(job)
    except Exception:
        return "No cache folder"
    if not (folder / "state").is_dir() and not (folder / "job.json").is_file():
        return "Its job is no longer in the cache"
    return None


class TRELLIS_OT_upscale(_JobOperator, bpy.types.Operator):
    """Re-run the active TRELLIS object's job at 1536 (cascade) and replace its mesh, keeping the transform"""

    bl_idname = "trellis.upscale"
    bl_label = "Upscale to 1536"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if not _poll_common(cls, context):
            return False
        problem = upscale_problem(context)
        if problem:
            cls.poll_message_set(problem)
            return False
        return True

    def execute(self, context):
        problem = check_backend_configured(context) or upscale_problem(context)
        if problem:
            return self.fail(context, problem)
        obj = context.active_object
        src = str(obj["trellis2_job"])
        settings = context.scene.trellis2
        req = dict(_common_request(context), source_job=src, target="1536_cascade",
                   stage_params=stage_params(settings), decimation_target=int(settings.decimation_target),
                   texture_size=int(settings.texture_size),
                   output="textures" if settings.material_mode == "TEXTURES" else "vertex_attrs")
        extra = {"object": obj.name, "source_job": src, "image_hash": obj.get("trellis2_image_hash"),
                 "material_mode": context.scene.trellis2.material_mode}
        try:
            rec = self.submit(context, "upscale", req, extra)
        except Exception as exc:
            return self.fail(context, f"Cannot start the backend: {exc}", jobs.ERROR_HINTS["crashed"])
        return self.finish(context, [rec])


class TRELLIS_OT_apply_result(bpy.types.Operator):
    """Import a finished job's result into the scene (run by the job timer)"""

    bl_idname = "trellis.apply_result"
    bl_label = "Apply TRELLIS Result"
    bl_options = {"INTERNAL", "UNDO"}

    job: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context):
        rec = runtime.manager.jobs.get(self.job) if runtime.manager else None
        if rec is None or rec.status != "done":
            return {"CANCELLED"}
        try:
            apply_record(context, rec)
        except Exception as exc:
            set_error(context.window_manager, f"Could not import the result: {exc}")
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


# --------------------------------------------------------------------------------------------------
# backend control


class TRELLIS_OT_cancel(bpy.types.Operator):
    """Cancel the running TRELLIS job"""

    bl_idname = "trellis.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        if not job_running():
            cls.poll_message_set("No job is running")
            return False
        return True

    def execute(self, context):
        rec = manager().active()
        if rec is not None:
            manager().cancel(rec.job_id)
        return {"FINISHED"}


class TRELLIS_OT_backend(bpy.types.Operator):
    """Start, stop, restart the backend process or unload its models (free GPU memory)"""

    bl_idname = "trellis.backend"
    bl_label = "Backend"

    action: EnumProperty(items=(("START", "Start", "Start the backend process"),
                                ("STOP", "Stop", "Stop the backend process"),
                                ("RESTART", "Restart", "Restart the backend process"),
                                ("UNLOAD", "Unload", "Free the GPU memory held by the models")),
                         options={"SKIP_SAVE"})

    @classmethod
    def description(cls, context, properties):
        return {"START": "Start the backend process", "STOP": "Stop the backend process",
                "RESTART": "Restart the backend process (after a crash)",
                "UNLOAD": "Unload the models and free GPU memory"}.get(properties.action, "")

    @classmethod
    def poll(cls, context):
        if not backend_configured(context):
            cls.poll_message_set("Set the backend Python (or a remote backend) in Preferences › Add-ons › TRELLIS.2")
            return False
        return True

    def execute(self, context):
        m = manager()
        try:
            if self.action in ("STOP", "RESTART"):
                m.stop()
            if self.action in ("START", "RESTART"):
                problem = check_backend_configured(context)
                if problem:
                    raise RuntimeError(problem)
                m.ensure_started()
                context.window_manager.trellis2.error = ""
                start_polling()
            if self.action == "UNLOAD":
                m.unload()
        except Exception as exc:
            set_error(context.window_manager, str(exc), jobs.ERROR_HINTS["not_configured"])
            self.report({"WARNING"} if bpy.app.background else {"ERROR"}, str(exc))
            return {"CANCELLED"}
        sync_state(context.window_manager)
        return {"FINISHED"}


class TRELLIS_OT_randomize_seed(bpy.types.Operator):
    """Pick a new random seed"""

    bl_idname = "trellis.randomize_seed"
    bl_label = "Random Seed"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        context.scene.trellis2.seed = random.randint(0, 2**31 - 1)
        return {"FINISHED"}


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


class TRELLIS_OT_use_fp32(_JobOperator, bpy.types.Operator):
    """Set Precision to fp32 in the preferences (never overflows to NaN/Inf; more VRAM, slower) and,
    with Retry, run the failed job again with it"""

    bl_idname = "trellis.use_fp32"
    bl_label = "Use FP32"
    bl_options = {"UNDO"}  # a retry imports its result like the job operators do

    retry: BoolProperty(name="Retry", default=False, options={"SKIP_SAVE"},
                       description="Run the failed job again with fp32")

    @classmethod
    def description(cls, context, properties):
        if properties.retry:
            return "Set Precision to fp32 in the preferences and run the failed job again"
        return "Set Precision to fp32 in the preferences (never overflows; about 2× the VRAM, slower)"

    def execute(self, context):
        prefs = get_prefs(context)
        rec = retryable_job(context) if self.retry else None
        prefs.precision = "FP32"
        set_error(context.window_manager, "", "")
        if not self.retry:
            self.report({"INFO"}, "Precision set to fp32; run the job again")
            return {"FINISHED"}
        if rec is None:
            self.report({"WARNING"}, "Precision set to fp32; the failed job cannot be re-sent: run it again")
            return {"FINISHED"}
        if job_running():
            return self.fail(context, "A TRELLIS job is running (cancel it first)")
        request = {k: v for k, v in rec.request.items() if k not in ("type", "job")}
        request.update(_common_request(context))
        try:
            new = self.submit(context, rec.kind, request, dict(rec.extra))
        except Exception as exc:
            return self.fail(context, f"Cannot start the backend: {exc}", jobs.ERROR_HINTS["crashed"])
        return self.finish(context, [new])


class TRELLIS_OT_clear_error(bpy.types.Operator):
    """Dismiss the error message"""

    bl_idname = "trellis.clear_error"
    bl_label = "Dismiss"

    def execute(self, context):
        set_error(context.window_manager, "", "")
        return {"FINISHED"}


# --------------------------------------------------------------------------------------------------
# import and history


def load_ovoxel_arrays(path: str, fill_holes: bool = True, normalized: bool = False) -> tuple[dict, dict]:
    """Mesh arrays (+ normals, per-vertex PBR) and meta from an O-Voxel file or a result ``.npz``.

    O-Voxels go through the codec's one asset decoder (``ovoxel.decode_asset``, the same as
    ``trellis2 ovoxel decode``): oriented geometry, hole filling (``fill_holes``: loops shorter than 3 %
    of the box, the official post-decode step), normals, PBR attributes sampled per vertex. Unless
    ``normalized``, the source's size and position are restored from the stored normalisation and a
    Y-up source (glTF, OBJ) is turned into Blender's Z-up frame, like Blender's own importers do;
    meta["restored"] tells whether the vertices are in the source's place (import at the origin)."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            if {"vertices", "faces"} <= names:
                return {k: z[k] for k in names}, {}
    from .backend import ovoxel  # numpy-only codec bundled with the extension

    ov = ovoxel.load(path)
    dec = ovoxel.decode_asset(ov, fill_holes=fill_holes, frame="normalized" if normalized else "source")
    up = dec.up_axis
    arrays = {"vertices": ovoxel.to_blender_frame(dec.vertices, up), "faces": dec.faces,
              "normals": ovoxel.to_blender_frame(dec.normals, up)}
    if dec.attrs is not None:
        arrays["attrs"] = dec.attrs
    return arrays, {"resolution": ov.resolution, "restored": dec.frame == "source", "up_axis": up,
                    "coords": ov.coords, "voxel_attrs": ov.attrs, "aabb": ov.aabb,
                    "normalization": ov.meta.get("normalization")}


OVOXEL_PROP = "trellis2_ovoxel"


class VoxelSource:
    """The voxel PBR attributes an object was made from, and how its object space maps into their grid."""

    def __init__(self, coords, attrs, resolution: int, aabb=((-0.5,) * 3, (0.5,) * 3), up_axis: str = "Z",
                 normalization: Optional[dict] = None, restored: bool = False):
        self.coords, self.attrs, self.resolution = np.asarray(coords), np.asarray(attrs, np.float32), int(resolution)
        self.aabb = np.asarray(aabb, np.float64)
        self.up_axis, self.normalization, self.restored = up_axis, normalization, bool(restored)

    def to_grid(self, pts: np.ndarray) -> np.ndarray:
        from .backend import ovoxel

        return ovoxel.grid_points(pts, up_axis=self.up_axis, normalization=self.normalization, aabb=self.aabb,
                                  restored=self.restored)

    def bake(self, context, obj, size: int, save_dir=None) -> None:
        """UVs + baked base colour / metallic-roughness textures on ``obj`` (the generator's bake path)."""
        me = obj.data
        uv_name = next((n for n in ("UVMap", mesh_import.UV_NAME_NEW) if n not in me.uv_layers), None)
        if uv_name is None:
            raise ValueError(f"{obj.name!r} already has UV maps 'UVMap' and '{mesh_import.UV_NAME_NEW}'")
        bake_textures_onto(context, obj, {"coords": self.coords, "attrs": self.attrs}, self.resolution, size,
                           save_dir, aabb=self.aabb, to_grid=self.to_grid, uv_name=uv_name)


def voxel_source_path(obj) -> Optional[str]:
    """The file holding ``obj``'s voxel attributes: the O-Voxel it was imported from, or its job's
    stored result (generated objects); None when there is none."""
    if obj is None or obj.type != "MESH":
        return None
    path = obj.get(OVOXEL_PROP)
    if path and os.path.isfile(path):
        return str(path)
    job = obj.get("trellis2_job")
    if job:
        result = os.path.join(str(cache_dir()), "jobs", str(job), "result", "result.npz")
        if os.path.isfile(result):
            return result
    return None


def load_voxel_source(obj) -> VoxelSource:
    """:class:`VoxelSource` of ``obj`` (see :func:`voxel_source_path`); ValueError when it has none."""
    path = voxel_source_path(obj)
    if path is None:
        raise ValueError(f"{getattr(obj, 'name', '?')!r} has no O-Voxel or stored TRELLIS result to bake from")
    if path == obj.get(OVOXEL_PROP):
        from .backend import ovoxel

        ov = ovoxel.load(path)
        if ov.attrs is None:
            raise ValueError(f"{os.path.basename(path)} has no PBR attributes")
        return VoxelSource(ov.coords, ov.attrs, ov.resolution, ov.aabb, ovoxel.source_up_axis(ov.meta),
                           ov.meta.get("normalization"), bool(obj.get(OVOXEL_PROP + "_restored", False)))
    with np.load(path, allow_pickle=False) as z:
        if "coords" not in z.files or "attrs" not in z.files:
            raise ValueError("the stored result has no voxel attributes (coords/attrs)")
        coords, attrs = z["coords"], z["attrs"]
    if len(attrs) != len(coords):
        raise ValueError("the stored result's attributes are per vertex, not per voxel")
    meta = _read_json(os.path.join(os.path.dirname(path), "meta.json"))
    res = int(obj.get("trellis2_resolution") or meta.get("resolution") or int(np.asarray(coords).max()) + 1)
    return VoxelSource(coords, attrs, res)


class TRELLIS_OT_bake_voxel_textures(bpy.types.Operator):
    """Give the active imported O-Voxel or generated object UVs and baked base colour / metallic-roughness
    image textures from its voxels (for editing and glTF export)"""

    bl_idname = "trellis.bake_voxel_textures"
    bl_label = "Bake PBR Textures"
    bl_options = {"REGISTER", "UNDO"}

    texture_size: IntProperty(name="Texture Size", default=1024, min=64, max=8192,
                              description="Width and height of the baked textures (pixels)")

    @classmethod
    def poll(cls, context):
        if voxel_source_path(context.active_object) is None:
            cls.poll_message_set("Select an imported O-Voxel or a generated object whose job result is stored")
            return False
        return True

    def execute(self, context):
        obj = context.active_object
        try:
            if obj.mode != "OBJECT":
                bpy.ops.object.mode_set(mode="OBJECT")
            load_voxel_source(obj).bake(context, obj, self.texture_size)
        except Exception as exc:
            self.report({"ERROR"}, f"Cannot bake {obj.name}: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Baked {self.texture_size}² PBR textures onto {obj.name}")
        return {"FINISHED"}


class TRELLIS_OT_import_ovoxel(bpy.types.Operator, ImportHelper):
    """Import an O-Voxel file (.npz / .vxz) or a TRELLIS result (.npz) as a mesh with PBR material"""

    bl_idname = "trellis.import_ovoxel"
    bl_label = "Import O-Voxel"
    bl_options = {"REGISTER", "UNDO", "PRESET"}

    filename_ext = ".npz"
    filter_glob: StringProperty(default="*.npz;*.vxz", options={"HIDDEN"})
    fill_holes: BoolProperty(
        name="Fill Small Holes", default=True,
        description="Close holes shorter than 3% of the box size after decoding, as the official pipeline does")
    normalized: BoolProperty(
        name="Import Normalised", default=False,
        description="Keep the O-Voxel's unit cube (1 m, centred, at the 3D cursor) instead of restoring the "
                    "source asset's size, position and up axis")
    decimate: IntProperty(
        name="Target Faces", default=500_000, min=0, soft_max=5_000_000,
        description="Decimate the decoded mesh to about this many triangles (0 = keep all; a 1024 O-Voxel "
                    "decodes to millions)")
    bake_textures: BoolProperty(
        name="Bake Textures", default=False,
        description="Give the mesh UVs (Smart UV Project) and baked base colour / metallic-roughness image "
                    "textures, so it edits and exports (glTF) like any textured asset; else vertex attributes")
    texture_size: IntProperty(name="Texture Size", default=1024, min=64, max=8192,
                              description="Width and height of the baked textures (pixels)")

    def execute(self, context):
        path = self.filepath
        if not os.path.isfile(path):
            self.report({"ERROR"}, f"File not found: {path}")
            return {"CANCELLED"}
        obj = None
        try:
            arrays, meta = load_ovoxel_arrays(path, self.fill_holes, self.normalized)
            if self.decimate and len(arrays["faces"]) > self.decimate:
                arrays.pop("normals", None)  # custom normals do not survive a collapse; smooth shading does
            name = bpy.path.display_name_from_filepath(path) or "OVoxel"
            obj = mesh_import.import_result(context, arrays, name=name, material_mode="VERTEX",
                                            meta={"job": meta.get("job")},
                                            location=(0.0, 0.0, 0.0) if meta.get("restored") else None)
            mesh_import.decimate_object(obj, self.decimate)
            if meta.get("coords") is not None:  # what Bake PBR Textures needs later
                obj[OVOXEL_PROP] = os.path.abspath(path)
                obj[OVOXEL_PROP + "_restored"] = bool(meta["restored"])
            if self.bake_textures and meta.get("voxel_attrs") is not None:
                src = VoxelSource(meta["coords"], meta["voxel_attrs"], meta["resolution"], meta["aabb"],
                                  meta["up_axis"], meta["normalization"], meta["restored"])
                src.bake(context, obj, self.texture_size)
        except Exception as exc:
            if obj is not None:  # a failed decimation / bake leaves nothing behind
                bpy.data.objects.remove(obj)
            self.report({"ERROR"}, f"Cannot import {os.path.basename(path)}: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Imported {obj.name}: {len(obj.data.vertices)} vertices, {len(obj.data.polygons)} faces")
        return {"FINISHED"}


class TRELLIS_OT_history_refresh(bpy.types.Operator):
    """Reload the job history from the cache folder"""

    bl_idname = "trellis.history_refresh"
    bl_label = "Refresh History"

    def execute(self, context):
        refresh_history(context.window_manager)
        return {"FINISHED"}


def _history_item(context):
    st = context.window_manager.trellis2
    if 0 <= st.history_index < len(st.history):
        return st.history[st.history_index]
    return None


class TRELLIS_OT_history_reimport(bpy.types.Operator):
    """Import the selected job's stored result again"""

    bl_idname = "trellis.history_reimport"
    bl_label = "Re-import"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        item = _history_item(context)
        if item is None or not os.path.isfile(os.path.join(item.folder, "result", "result.npz")):
            cls.poll_message_set("Select a finished job with a stored result")
            return False
        return True

    def execute(self, context):
        item = _history_item(context)
        folder = item.folder
        try:
            arrays, _ = load_ovoxel_arrays(os.path.join(folder, "result", "result.npz"))
            rec = jobs.JobRecord(item.name, item.kind or "generate",
                                 {"seed": item.seed, "pipeline_type": item.pipeline},
                                 {"name": item.name})
            rec.result = {"arrays": arrays, "meta": _read_json(os.path.join(folder, "result", "meta.json")),
                          "folder": folder}
            rec.status = "done"
            if rec.kind == "texture":
                raise ValueError("Texture jobs are re-applied with Texture Selected")
            apply_generate(context, rec)
        except Exception as exc:
            self.report({"ERROR"}, f"Re-import failed: {exc}")
            return {"CANCELLED"}
        return {"FINISHED"}


def _read_json(path: str) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


class TRELLIS_OT_history_rerun(_JobOperator, bpy.types.Operator):
    """Run the selected job again with a new random seed"""

    bl_idname = "trellis.history_rerun"
    bl_label = "Re-run with New Seed"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if not _poll_common(cls, context):
            return False
        item = _history_item(context)
        if item is None or item.kind not in ("generate", "upscale") or not item.image_path:
            cls.poll_message_set("Select a generate job whose input image is stored")
            return False
        return True

    def execute(self, context):
        item = _history_item(context)
        seed = random.randint(0, 2**31 - 1)
        return bpy.ops.trellis.generate(filepath=item.image_path, seed=seed,
                                        pipeline=item.pipeline if item.pipeline in {p[0] for p in PIPELINES}
                                        else context.scene.trellis2.pipeline)


class TRELLIS_OT_history_open_folder(bpy.types.Operator):
    """Open the selected job's folder"""

    bl_idname = "trellis.history_open_folder"
    bl_label = "Open Folder"

    @classmethod
    def poll(cls, context):
        if _history_item(context) is None:
            cls.poll_message_set("Select a job in the history")
            return False
        return True

    def execute(self, context):
        return bpy.ops.trellis.open_path(path=_history_item(context).folder)


CLASSES = (
    TRELLIS_OT_preview_cutout,
    TRELLIS_OT_generate, TRELLIS_OT_texture_selected, TRELLIS_OT_upscale, TRELLIS_OT_apply_result,
    TRELLIS_OT_cancel, TRELLIS_OT_backend, TRELLIS_OT_randomize_seed, TRELLIS_OT_use_fp32, TRELLIS_OT_clear_error,
    TRELLIS_OT_import_ovoxel, TRELLIS_OT_bake_voxel_textures, TRELLIS_OT_history_refresh, TRELLIS_OT_history_reimport,
    TRELLIS_OT_history_rerun, TRELLIS_OT_history_open_folder,
)


@bpy.app.handlers.persistent
def _on_load_post(*_args) -> None:
    """A new file has a fresh WindowManager: refill the history and backend state."""
    try:
        refresh_history()
        sync_state()
    except Exception:  # never break file loading
        pass


def _initial_refresh():
    _on_load_post()
    return None


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    import atexit

    atexit.register(runtime.reset)
    bpy.app.handlers.load_post.append(_on_load_post)
    if not bpy.app.background:
        bpy.app.timers.register(_initial_refresh, first_interval=0.5)


def unregister() -> None:
    import atexit

    atexit.unregister(runtime.reset)
    if _on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load_post)
    for timer in (_job_timer, _initial_refresh):
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)
    runtime.reset()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
