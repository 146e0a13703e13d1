"""Panel sections: setup status, the error box, presets, the selected-object and history sub-panels,
and the Object menu. Draw code only: what to show is decided in ``core`` / ``setup_check``."""

from __future__ import annotations

import os

import bpy
import bpy.utils.previews

from . import core, setup_check

ADDON = __package__
_previews = None


def _thumbnail(path: str) -> int:
    """Icon id of an image file's preview (0 when unavailable)."""
    global _previews
    if not path or not os.path.isfile(path):
        return 0
    try:
        if _previews is None:
            _previews = bpy.utils.previews.new()
        if path not in _previews:
            _previews.load(path, path, "IMAGE")
        return _previews[path].icon_id
    except Exception:  # previews need a GPU context in some builds
        return 0


def free_previews() -> None:
    global _previews
    if _previews is not None:
        try:
            bpy.utils.previews.remove(_previews)
        except Exception:
            pass
        _previews = None


def _open_prefs(layout, text: str = "Open Preferences") -> None:
    layout.operator("preferences.addon_show", text=text, icon="PREFERENCES").module = ADDON


def draw_remote(layout, context) -> None:
    """Which remote backend the add-on talks to (lock icon when TLS is on)."""
    from .preferences import get_prefs

    prefs = get_prefs(context)
    if setup_check.remote(prefs):
        layout.label(text=f"Remote: {prefs.remote_host}:{prefs.remote_port}",
                     icon="LOCKED" if prefs.remote_tls else "UNLOCKED")


def draw_setup(layout, context) -> None:
    """Per-item setup status (backend Python, model folders) and Open Preferences, while incomplete."""
    from .preferences import get_prefs

    items = setup_check.setup_items(get_prefs(context))
    if all(item.ok for item in items):
        return
    col = layout.column(align=True)
    col.label(text="Setup incomplete:", icon="TOOL_SETTINGS")
    for item in items:
        col.label(text=item.text, icon=item.icon)
    _open_prefs(col)


def _draw_numerical_fix(layout, context) -> None:
    """The NaN/Inf error's one-click fix: fp32 (and run the failed job again when it can be re-sent)."""
    from .preferences import get_prefs
    from .session import retryable_job

    prefs = get_prefs(context)
    if prefs.precision == "FP32":
        layout.label(text="Precision is already fp32: see the log", icon="INFO")
        return
    row = layout.row(align=True)
    if retryable_job(context) is not None:
        op = row.operator("trellis.use_fp32", text="Use FP32 and Retry", icon="FILE_REFRESH")
        op.retry = True
    row.operator("trellis.use_fp32", text="Use FP32", icon="PREFERENCES")


def draw_error(layout, context, st) -> None:
    """The error, its hint, and only the actions that can help with its kind (``core.error_actions``)."""
    from .preferences import get_prefs

    err = layout.box()
    err.alert = True
    col = err.column(align=True)
    col.label(text=st.error[:120], icon="ERROR")
    if st.error_hint:
        col.label(text=st.error_hint[:120])
    actions = core.error_actions(st.error_kind, st.backend_state, has_log=bool(st.log_path))
    if "fp32" in actions:
        _draw_numerical_fix(err, context)
    if "low_vram" in actions:
        row = err.row(align=True)
        row.prop(get_prefs(context), "low_vram", toggle=True)
        if context.scene.trellis2.pipeline == "1536_cascade":
            row.prop_enum(context.scene.trellis2, "pipeline", "1024_cascade")
    row = err.row(align=True)
    if "preferences" in actions:
        _open_prefs(row)
    if "check_backend" in actions:
        row.operator("trellis.check_backend", icon="CHECKMARK")
    if "log" in actions:
        row.operator("trellis.open_path", text="Open Log", icon="TEXT").path = st.log_path
    if "restart" in actions:
        row.operator("trellis.backend", text="Restart Backend", icon="FILE_REFRESH").action = "RESTART"
    row.operator("trellis.clear_error", text="", icon="X")


def draw_presets(layout, context) -> None:
    """Preset menu (shows the preset the settings match) and Save Preset."""
    from .ops_object import current_preset

    row = layout.row(align=True)
    row.menu("TRELLIS_MT_presets", text=current_preset(context) or "Presets", icon="PRESET")
    row.operator("trellis.preset_save", text="", icon="ADD")


class TRELLIS_PT_object(bpy.types.Panel):
    """The active mesh: what TRELLIS made it from (seed, pipeline, resolution, job) and its actions."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "TRELLIS"
    bl_label = "Selected Object"
    bl_parent_id = "TRELLIS_PT_main"

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return obj is not None and obj.type == "MESH"

    def draw(self, context):
        from .ops_object import object_job, object_job_image

        layout = self.layout
        obj = context.active_object
        col = layout.column(align=True)
        job = obj.get("trellis2_job")
        thumb = _thumbnail(object_job_image(obj) or "")
        if thumb:   # the image it was made from
            col.template_icon(icon_value=thumb, scale=3.0)
        if job:
            col.label(text=f"{obj.name}: seed {obj.get('trellis2_seed', '?')} · {obj.get('trellis2_pipeline', '?')}",
                      icon="MESH_MONKEY")
            if obj.get("trellis2_resolution"):
                col.label(text=f"Resolution: {obj['trellis2_resolution']}³ voxels")
            col.label(text=f"Job: {job}")
            if obj.get("trellis2_upscaled_from"):
                col.label(text=f"Upscaled from: {obj['trellis2_upscaled_from']}", icon="MOD_SUBSURF")
            if obj.get("trellis2_note"):
                col.label(text=str(obj["trellis2_note"])[:140], icon="INFO")
        elif object_job(obj):
            col.label(text=f"{obj.name}: textured by TRELLIS ({object_job(obj)})", icon="TEXTURE")
        else:
            col.label(text=f"{obj.name}: not made by TRELLIS", icon="MESH_DATA")
        if obj.data.uv_layers.active is None:
            col.label(text="No UV map: Texture Selected will create 'TRELLIS_UV'", icon="UV")
        row = layout.row(align=True)
        if job:
            row.operator("trellis.upscale", text="Upscale", icon="MOD_SUBSURF")
        if object_job(obj):
            row.operator("trellis.object_retexture", icon="TEXTURE")
        if job:
            row.operator("trellis.object_rerun", icon="FILE_REFRESH")
            layout.operator("trellis.object_use_settings", icon="COPYDOWN")
        else:
            row.operator("trellis.texture_selected", icon="TEXTURE")


class TRELLIS_UL_history(bpy.types.UIList):
    """One row per job: thumbnail, image name, pipeline, seed, duration (failed jobs say so)."""

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        thumb = _thumbnail(item.image_path)
        row = layout.row(align=True)
        text = f"{item.title or item.name} · {item.pipeline or item.kind} · seed {item.seed}"
        if item.status == "failed":
            row.label(text=text, icon="ERROR")
        elif thumb:
            row.label(text=text, icon_value=thumb)
        else:
            row.label(text=text, icon="MESH_MONKEY" if item.kind != "texture" else "TEXTURE")
        row.label(text=f"{item.duration:.0f} s" if item.duration else item.status)


class TRELLIS_PT_history(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "TRELLIS"
    bl_label = "History"
    bl_parent_id = "TRELLIS_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        st = context.window_manager.trellis2
        row = layout.row()
        row.template_list("TRELLIS_UL_history", "", st, "history", st, "history_index", rows=4)
        col = row.column(align=True)
        col.operator("trellis.history_refresh", text="", icon="FILE_REFRESH")
        col.operator("trellis.history_open_folder", text="", icon="FILE_FOLDER")
        if 0 <= st.history_index < len(st.history):
            item = st.history[st.history_index]
            box = layout.box()
            thumb = _thumbnail(item.image_path)
            if thumb:
                box.template_icon(icon_value=thumb, scale=4.0)
            box.label(text=item.title or item.name)
            box.label(text=f"{item.kind} · {item.pipeline} · seed {item.seed} · {item.created}")
            if item.title:
                box.label(text=f"Job: {item.name}")
            if item.status == "failed" and item.error:
                box.label(text=item.error[:120], icon="ERROR")
            row = box.row(align=True)
            row.operator("trellis.history_reimport", icon="IMPORT")
            row.operator("trellis.history_rerun", icon="FILE_REFRESH")


class TRELLIS_MT_object(bpy.types.Menu):
    bl_idname = "TRELLIS_MT_object"
    bl_label = "TRELLIS"

    def draw(self, context):
        layout = self.layout
        layout.operator("trellis.upscale", text="Upscale to 1536", icon="MOD_SUBSURF")
        layout.operator("trellis.texture_selected", text="Texture with TRELLIS", icon="TEXTURE")


def draw_object_menu(self, context):
    self.layout.separator()
    self.layout.menu("TRELLIS_MT_object")


CLASSES = (TRELLIS_PT_object, TRELLIS_UL_history, TRELLIS_PT_history, TRELLIS_MT_object)
