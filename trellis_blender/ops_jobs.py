"""Job operators: Generate, Preview Cut-out, Texture Selected, Upscale, applying results, and the
fp32 retry; their shared submit/block/report logic (:class:`JobOperator`)."""

from __future__ import annotations

import sys
from typing import Optional

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import core, jobs, runtime, setup_check, texture_objects, views
from .preferences import get_prefs
from .prefs_access import job_folder
from .properties import PIPELINES
from .session import (JOB_TIMEOUT_S, _common_request, apply_record, check_backend_configured, image_to_file,
                      job_running, manager, refresh_history, resolve_image, retryable_job, set_error,
                      stage_params, start_polling, sync_state)

# --------------------------------------------------------------------------------------------------
# operator helpers


class JobOperator:
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
            self.fail(context, problem, jobs.ERROR_HINTS["not_configured"], "not_configured")
            return None
        try:
            return resolve_image(context, self.filepath)
        except ValueError as exc:
            self.fail(context, str(exc), kind="bad_input")
            return None

    def run_jobs(self, context, kind: str, jobs_: list[tuple[dict, dict]]) -> set:
        """Submit ``(request, extra)`` jobs of one kind, then :meth:`finish`."""
        try:
            recs = [self.submit(context, kind, request, extra) for request, extra in jobs_]
        except Exception as exc:
            return self.fail(context, f"Cannot start the backend: {exc}", jobs.ERROR_HINTS["start_failed"], "start_failed")
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
                self.fail(context, f"Could not import the result: {exc}", kind="import")
        sync_state(context.window_manager)
        refresh_history(context.window_manager)
        return {"FINISHED"} if ok else {"CANCELLED"}


def regenerate(context, image_path: str, pipeline: str, seed: Optional[int] = None) -> set:
    """Generate again from a stored input image: its own pipeline when it is a known one (else the panel's),
    with ``seed`` or a new random one."""
    if pipeline not in {p[0] for p in PIPELINES}:
        pipeline = context.scene.trellis2.pipeline
    return bpy.ops.trellis.generate(filepath=image_path, seed=core.random_seed() if seed is None else seed,
                                    pipeline=pipeline)


def poll_common(cls, context) -> bool:
    if job_running():
        cls.poll_message_set("A TRELLIS job is running (cancel it first)")
        return False
    if not setup_check.backend_configured(get_prefs(context)):
        cls.poll_message_set("Set the backend Python (or a remote backend) in Preferences › Add-ons › TRELLIS.2")
        return False
    return True


# --------------------------------------------------------------------------------------------------
# job operators


class TRELLIS_OT_generate(JobOperator, bpy.types.Operator):
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
        return poll_common(cls, context)

    def execute(self, context):
        settings = context.scene.trellis2
        image = self.input_image(context)
        if image is None:
            return {"CANCELLED"}
        pipeline = self.pipeline if self.properties.is_property_set("pipeline") else settings.pipeline
        if self.properties.is_property_set("seed"):
            seed = self.seed
        elif settings.randomize_seed:
            seed = settings.seed = core.random_seed()
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
            return self.fail(context, str(exc), kind="bad_input")
        if more:
            request.update(images=[image, *more], multiview=settings.multiview.lower())
        if settings.use_blockout:
            fields, arrays, problem = views.guide_request(context, settings)
            if problem:
                return self.fail(context, problem, kind="bad_input")
            request.update(fields, arrays=arrays)
            extra.update(blockout=context.active_object.name, placement=settings.blockout_placement)
        return self.run_jobs(context, "generate", [(request, extra)])


class TRELLIS_OT_preview_cutout(JobOperator, bpy.types.Operator):
    """Show the image the model will see: background removed and cropped, without generating"""

    bl_idname = "trellis.preview_cutout"
    bl_label = "Preview Cut-out"
    bl_options = {"REGISTER"}

    filepath: StringProperty(name="Image", subtype="FILE_PATH", default="", options={"SKIP_SAVE"},
                             description="Image file (default: the panel's image)")

    @classmethod
    def poll(cls, context):
        return poll_common(cls, context)

    def execute(self, context):
        image = self.input_image(context)
        if image is None:
            return {"CANCELLED"}
        request = dict(_common_request(context), image=image, background=context.scene.trellis2.background.lower())
        return self.run_jobs(context, "cutout", [(request, {"name": bpy.path.display_name_from_filepath(image)})])


class TRELLIS_OT_texture_selected(JobOperator, bpy.types.Operator):
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
        if not poll_common(cls, context):
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
            return self.fail(context, f"No mesh selected ({names} is not a mesh)", kind="bad_input")
        empty = [o.name for o in meshes if len(o.data.polygons) == 0]
        if empty:
            return self.fail(context, f"{empty[0]!r} has no faces to texture", kind="bad_input")
        if context.mode != "OBJECT":
            return self.fail(context, "Switch to Object Mode first", kind="bad_input")
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
            return self.fail(context, str(exc), kind="bad_input")
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
    folder = job_folder(str(job))
    if folder is None:
        return "No cache folder (or an invalid job id)"
    if not folder.state_dir.is_dir() and not folder.meta_path.is_file():
        return "Its job is no longer in the cache"
    return None


class TRELLIS_OT_upscale(JobOperator, bpy.types.Operator):
    """Re-run the active TRELLIS object's job at 1536 (cascade) and replace its mesh, keeping the transform"""

    bl_idname = "trellis.upscale"
    bl_label = "Upscale to 1536"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if not poll_common(cls, context):
            return False
        problem = upscale_problem(context)
        if problem:
            cls.poll_message_set(problem)
            return False
        return True

    def execute(self, context):
        problem = check_backend_configured(context)
        if problem:
            return self.fail(context, problem, jobs.ERROR_HINTS["not_configured"], "not_configured")
        problem = upscale_problem(context)
        if problem:
            return self.fail(context, problem, kind="bad_input")
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
            return self.fail(context, f"Cannot start the backend: {exc}", jobs.ERROR_HINTS["start_failed"], "start_failed")
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
            set_error(context.window_manager, f"Could not import the result: {exc}", kind="import")
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}



class TRELLIS_OT_use_fp32(JobOperator, bpy.types.Operator):
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
            return self.fail(context, f"Cannot start the backend: {exc}", jobs.ERROR_HINTS["start_failed"], "start_failed")
        return self.finish(context, [new])


CLASSES = (TRELLIS_OT_preview_cutout, TRELLIS_OT_generate, TRELLIS_OT_texture_selected, TRELLIS_OT_upscale,
           TRELLIS_OT_apply_result, TRELLIS_OT_use_fp32)
