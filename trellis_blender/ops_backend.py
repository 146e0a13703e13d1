"""Backend control and small panel operators: Cancel, Start/Stop/Restart/Unload, Random Seed, Dismiss."""

from __future__ import annotations

import bpy
from bpy.props import EnumProperty

from . import core, jobs, setup_check
from .preferences import get_prefs
from .session import check_backend_configured, job_running, manager, set_error, start_polling, sync_state

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
        if not setup_check.backend_configured(get_prefs(context)):
            cls.poll_message_set("Set the backend Python (or a remote backend) in Preferences › Add-ons › TRELLIS.2")
            return False
        return True

    def execute(self, context):
        problem = check_backend_configured(context) if self.action in ("START", "RESTART") else None
        if problem:   # a setup problem: Preferences help, a restart would not
            set_error(context.window_manager, problem, jobs.ERROR_HINTS["not_configured"], "not_configured")
            self.report({"WARNING"} if bpy.app.background else {"ERROR"}, problem)
            return {"CANCELLED"}
        m = manager()
        try:
            if self.action in ("STOP", "RESTART"):
                m.stop()
            if self.action in ("START", "RESTART"):
                m.ensure_started()
                context.window_manager.trellis2.error = ""
                start_polling()
            if self.action == "UNLOAD":
                m.unload()
        except Exception as exc:
            set_error(context.window_manager, str(exc), jobs.ERROR_HINTS["start_failed"], "start_failed")
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
        context.scene.trellis2.seed = core.random_seed()
        return {"FINISHED"}



class TRELLIS_OT_clear_error(bpy.types.Operator):
    """Dismiss the error message"""

    bl_idname = "trellis.clear_error"
    bl_label = "Dismiss"

    def execute(self, context):
        set_error(context.window_manager, "", "")
        return {"FINISHED"}


CLASSES = (TRELLIS_OT_cancel, TRELLIS_OT_backend, TRELLIS_OT_randomize_seed, TRELLIS_OT_clear_error)
