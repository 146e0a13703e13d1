"""Download Models: the operator (with a token field that is never saved) and its preferences box.

The download runs ``trellis2 download --json`` in the backend's Python as a :class:`tasks.ProcessTask`
(see ``backend/download.py``: resumable, verified, classified errors). The access token typed in the
dialog reaches the child only as its ``HF_TOKEN`` environment variable: the property is ``SKIP_SAVE``
(Blender does not remember it), cleared after use, dropped from the task once the child started, and
never stored in the preferences (which ``userpref.blend`` saves).
"""

from __future__ import annotations

import os

import bpy
from bpy.props import EnumProperty, StringProperty

from . import runtime, tasks
from .prefs_access import backend_task_ready, cache_dir, get_prefs, start_task_polling

_GATED = tasks.MODEL_REPOS[0].repo_id   # DINOv3: the gated one, downloaded first


def _models_root(prefs) -> str:
    """Where the model folders go: next to the TRELLIS.2-4B folder, else ``<cache>/../models``."""
    if prefs.model_dir:
        return os.path.dirname(os.path.normpath(bpy.path.abspath(prefs.model_dir)))
    return str(cache_dir(prefs).parent / "models")


class TRELLIS_OT_download_models(bpy.types.Operator):
    """Download DINOv3 (gated: first, so a missing licence acceptance fails fast), the sparse-structure
    decoder, TRELLIS.2-4B and the BiRefNet background remover with the backend's Python (resumable, verified)"""

    bl_idname = "trellis.download_models"
    bl_label = "Download Models"

    which: EnumProperty(name="What", default="ALL", options={"SKIP_SAVE"}, items=(
        ("ALL", "All Models", "TRELLIS.2-4B, DINOv3, the sparse-structure decoder and BiRefNet"),
        ("REMBG", "Background Removal", "Only BiRefNet (ZhengPeng7/BiRefNet, MIT, ~440 MB)")))
    token: StringProperty(
        name="Access token", subtype="PASSWORD", options={"SKIP_SAVE"},
        description="A Hugging Face access token (read) of an account that accepted the DINOv3 licence. "
                    "Used for this download only, never saved; empty: the login of 'hf auth login'")

    @classmethod
    def description(cls, context, properties):
        if properties.which == "REMBG":
            return "Download the BiRefNet background remover (ZhengPeng7/BiRefNet, MIT, ungated, ~440 MB)"
        return cls.__doc__

    @classmethod
    def poll(cls, context):
        if not getattr(bpy.app, "online_access", False):
            cls.poll_message_set("Blender's Online Access is off (Preferences › System › Network)")
            return False
        if not get_prefs(context).allow_downloads:
            cls.poll_message_set("Tick 'Allow model downloads' first")
            return False
        return backend_task_ready(cls, context, runtime.download_task, "A download is running")

    def invoke(self, context, event):
        if self.which == "REMBG":           # ungated: no token needed
            return self.execute(context)
        return context.window_manager.invoke_props_dialog(self, width=460)

    def draw(self, context):
        col = self.layout.column(align=True)
        col.label(text=f"{_GATED} is gated: accept its licence on huggingface.co first.", icon="INFO")
        col.prop(self, "token")
        col.label(text="Empty: the token of 'hf auth login'. The token is used for this download only.")

    def execute(self, context):
        prefs = get_prefs(context)
        root = _models_root(prefs)
        everything = self.which == "ALL"
        token, self.token = self.token, ""
        task = tasks.download_task(bpy.path.abspath(prefs.backend_python), root,
                                   cache_dir(prefs) / "logs" / "download.log", models=everything,
                                   token=token, ext_dir=runtime.extension_dir())
        runtime.download_task = task.start()
        task.env.pop("HF_TOKEN", None)      # one step, already started: the child has it, nothing else keeps it
        if everything:
            prefs.model_dir = os.path.join(root, tasks.MODEL_REPOS[-1].folder)   # TRELLIS.2-4B
            if not prefs.dinov3_dir:
                prefs.dinov3_dir = os.path.join(root, tasks.MODEL_REPOS[0].folder)
        if not prefs.rembg_dir:
            prefs.rembg_dir = os.path.join(root, tasks.REMBG_REPO.folder)
        if bpy.app.background:
            task.wait(timeout=6 * 3600)
            if not task.ok:
                self.report({"WARNING"}, download_error_lines(task)[0])
            return {"FINISHED"} if task.ok else {"CANCELLED"}
        start_task_polling()
        return {"FINISHED"}


def download_error_lines(task: tasks.ProcessTask) -> list[str]:
    """What went wrong, for the preferences: the child's message and advice (never a traceback)."""
    error = getattr(task.listener, "error", None)
    if error:
        return [str(error.get("message", "")), str(error.get("advice", ""))]
    tail = [ln for ln in task.log_tail(6).splitlines() if ln.strip() and not ln.startswith(("{", "$", "["))]
    return [task.status_text()] + tail[-1:]


def draw_download_box(box: "bpy.types.UILayout", prefs) -> None:
    """The download row, progress / error lines and notices inside the preferences' Models box."""
    row = box.row()
    online = bool(getattr(bpy.app, "online_access", False))
    row.enabled = online
    row.prop(prefs, "allow_downloads")
    row.operator("trellis.download_models", icon="URL").which = "ALL"
    row.operator("trellis.download_models", text="Download BiRefNet", icon="IMAGE_RGB_ALPHA").which = "REMBG"
    task = runtime.download_task
    if task is None:
        box.label(text=f"{_GATED.split('/')[1]} is gated: accept its licence on huggingface.co; Download Models "
                       "asks for an access token (about 18 GB in all)", icon="INFO")
    elif task.running:
        box.progress(factor=task.fraction, type="BAR", text=task.status_text())
    elif task.ok:
        box.label(text="Download models: done, every file verified", icon="CHECKMARK")
    else:
        col = box.column(align=True)
        message, *advice = download_error_lines(task)
        col.label(text=message[:160], icon="ERROR")
        for line in advice:
            col.label(text=line[:160])
        retry = col.operator("trellis.download_models", text="Retry (resumes)", icon="FILE_REFRESH")
        retry.which = "REMBG" if getattr(task.listener, "what", "all") == "rembg" else "ALL"
    if task is not None:
        box.operator("trellis.open_path", text="Open download log", icon="TEXT").path = str(task.log_path)
    if not online:
        box.label(text="Downloads need Online Access (Preferences › System › Network)", icon="INFO")


CLASSES = (TRELLIS_OT_download_models,)
register, unregister = bpy.utils.register_classes_factory(CLASSES)
