"""Sidebar panel (View3D › Sidebar › TRELLIS), history list, Object menu and File › Import entries."""

from __future__ import annotations

import os

import bpy
import bpy.utils.previews



STATE_ICONS = {"STOPPED": "RADIOBUT_OFF", "STARTING": "SORTTIME", "READY": "CHECKMARK", "BUSY": "SORTTIME",
               "CRASHED": "ERROR"}
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


def _backend_python_set(context) -> bool:
    from .preferences import get_prefs

    prefs = get_prefs(context)
    return bool(prefs.remote_host.strip()) if prefs.backend_mode == "REMOTE" else bool(prefs.backend_python)


def _draw_numerical_fix(layout, context) -> None:
    """The NaN/Inf error's one-click fix: fp32 (and run the failed job again when it can be re-sent)."""
    from .operators import retryable_job
    from .preferences import get_prefs

    prefs = get_prefs(context)
    if prefs.precision == "FP32":
        layout.label(text="Precision is already fp32: see the log", icon="INFO")
        return
    row = layout.row(align=True)
    if retryable_job(context) is not None:
        op = row.operator("trellis.use_fp32", text="Use FP32 and Retry", icon="FILE_REFRESH")
        op.retry = True
    row.operator("trellis.use_fp32", text="Use FP32", icon="PREFERENCES")


class TRELLIS_PT_main(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "TRELLIS"
    bl_label = "TRELLIS.2"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.trellis2
        st = context.window_manager.trellis2

        # Backend row
        box = layout.box()
        row = box.row(align=True)
        state_label = st.bl_rna.properties["backend_state"].enum_items[st.backend_state].name
        row.label(text=f"Backend: {state_label}", icon=STATE_ICONS.get(st.backend_state, "NONE"))
        if st.backend_state in ("STOPPED", "CRASHED"):
            op = row.operator("trellis.backend", text="", icon="PLAY")
            op.action = "START"
        else:
            op = row.operator("trellis.backend", text="", icon="UNLINKED")
            op.action = "UNLOAD"
            op = row.operator("trellis.backend", text="", icon="CANCEL")
            op.action = "STOP"
        if st.backend_info:
            box.label(text=st.backend_info)
        from .preferences import get_prefs

        prefs = get_prefs(context)
        if prefs.backend_mode == "REMOTE":
            lock = "LOCKED" if prefs.remote_tls else "UNLOCKED"
            box.label(text=f"Remote: {prefs.remote_host}:{prefs.remote_port}", icon=lock)
        if not _backend_python_set(context):
            box.label(text="Set the backend Python (or a remote backend) in Preferences", icon="INFO")

        # Error box
        if st.error:
            err = layout.box()
            err.alert = True
            col = err.column(align=True)
            col.label(text=st.error[:120], icon="ERROR")
            if st.error_hint:
                col.label(text=st.error_hint[:120])
            if st.error_kind == "numerical":
                _draw_numerical_fix(err, context)
            row = err.row(align=True)
            if st.log_path:
                op = row.operator("trellis.open_path", text="Open Log", icon="TEXT")
                op.path = st.log_path
            op = row.operator("trellis.backend", text="Restart", icon="FILE_REFRESH")
            op.action = "RESTART"
            row.operator("trellis.clear_error", text="", icon="X")

        # Input
        col = layout.column(align=True)
        col.label(text="Image", icon="IMAGE_DATA")
        col.template_ID(settings, "image", open="image.open")
        if settings.image is not None:
            col.template_icon(icon_value=layout.icon(settings.image), scale=6.0)
        _draw_background(col, context, settings)
        _draw_views_and_blockout(layout, context, settings)

        # Settings
        col = layout.column()
        col.prop(settings, "pipeline", text="")
        row = col.row(align=True)
        row.prop(settings, "seed")
        row.operator("trellis.randomize_seed", text="", icon="FILE_REFRESH")
        row.prop(settings, "randomize_seed", text="", icon="MOD_NOISE", toggle=True)

        header, body = layout.panel("trellis_sampling", default_closed=True)
        header.label(text="Sampling")
        if body is not None:
            for title, steps, guidance in (("Structure", "ss_steps", "ss_guidance"),
                                           ("Shape", "shape_steps", "shape_guidance"),
                                           ("Texture", "tex_steps", "tex_guidance")):
                sub = body.column(align=True)
                sub.label(text=title)
                row = sub.row(align=True)
                row.prop(settings, steps)
                row.prop(settings, guidance)

        header, body = layout.panel("trellis_output", default_closed=True)
        header.label(text="Output")
        if body is not None:
            body.prop(settings, "material_mode")
            body.prop(settings, "decimation_target")
            body.prop(settings, "texture_size")

        # Action
        if st.running:
            row = layout.row(align=True)
            row.progress(factor=st.progress, type="BAR", text=st.stage or "Working…")
            row.operator("trellis.cancel", text="", icon="CANCEL")
        else:
            has_image = settings.image is not None
            col = layout.column(align=True)
            col.scale_y = 1.5
            col.enabled = has_image   # scripts pass filepath=, so the operator's poll cannot check this
            col.operator("trellis.generate", icon="SHADERFX")
            row = layout.row()
            row.enabled = has_image
            row.operator("trellis.texture_selected", icon="TEXTURE")
            layout.operator("trellis.bake_voxel_textures", icon="IMAGE")   # imported O-Voxels / generated objects
            _draw_texture_selected(layout, context, settings)
            if not has_image:
                layout.label(text="Pick an input image first", icon="INFO")
            if st.last_duration > 0:
                layout.label(text=f"Last job: {st.last_duration:.1f} s", icon="TIME")


class TRELLIS_UL_history(bpy.types.UIList):
    """One row per job: thumbnail, kind/pipeline, seed, duration."""

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        thumb = _thumbnail(item.image_path)
        row = layout.row(align=True)
        text = f"{item.pipeline or item.kind} · seed {item.seed}"
        if thumb:
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
            box.label(text=item.name)
            box.label(text=f"{item.kind} · {item.pipeline} · seed {item.seed} · {item.created}")
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


def _draw_views_and_blockout(layout, context, settings) -> None:
    """Extra views (multi-view generation) and the blockout option."""
    header, body = layout.panel("trellis_views", default_closed=True)
    n = sum(v.image is not None for v in settings.views)
    header.label(text=f"Extra Views ({n})" if n else "Extra Views")
    if body is not None:
        row = body.row()
        row.template_list("TRELLIS_UL_views", "", settings, "views", settings, "views_index", rows=3)
        col = row.column(align=True)
        col.operator("trellis.view_add", text="", icon="ADD")
        col.operator("trellis.view_edit", text="", icon="REMOVE").action = "REMOVE"
        col.separator()
        col.operator("trellis.view_edit", text="", icon="TRIA_UP").action = "UP"
        col.operator("trellis.view_edit", text="", icon="TRIA_DOWN").action = "DOWN"
        if n:
            body.prop(settings, "multiview")
    header, body = layout.panel("trellis_blockout", default_closed=True)
    header.prop(settings, "use_blockout", text="")
    header.label(text="Blockout")
    if body is not None:
        body.active = settings.use_blockout
        body.prop(settings, "blockout_strength")
        body.prop(settings, "blockout_placement", expand=True)
        obj = context.active_object
        if settings.use_blockout and (obj is None or obj.type != "MESH"):
            body.label(text="Make the blockout mesh the active object", icon="ERROR")
        elif settings.use_blockout:
            body.label(text=f"Blockout: {obj.name}", icon="MESH_CUBE")


def _draw_texture_selected(layout, context, settings) -> None:
    """Texture Selected options, and which UV map the active mesh will be baked into."""
    header, body = layout.panel("trellis_texture_selected", default_closed=True)
    header.label(text="Texture Selected")
    if body is None:
        return
    body.prop(settings, "texture_resolution")
    body.prop(settings, "texture_slots")
    obj = context.active_object
    if obj is not None and obj.type == "MESH":
        me = obj.data
        if me.uv_layers.active is None:
            body.label(text=f"{obj.name}: a new UV map 'TRELLIS_UV' will be created", icon="INFO")
        else:
            body.label(text=f"{obj.name}: bakes into '{me.uv_layers.active.name}' if it lies inside 0–1",
                       icon="UV")


def _draw_background(col, context, settings) -> None:
    """Background policy, whether a removal model is set up, and the cut-out the model will see."""
    from .preferences import get_prefs

    col.separator()
    row = col.row(align=True)
    row.prop(settings, "background", expand=True)
    prefs = get_prefs(context)
    if settings.background != "KEEP" and not prefs.rembg_dir:
        box = col.box()
        box.label(text="No background-removal model: photos need BiRefNet", icon="INFO")
        box.label(text="(images with transparency or a plain background work)")
        box.operator("preferences.addon_show", text="Open Preferences", icon="PREFERENCES").module = __package__
    col.operator("trellis.preview_cutout", icon="IMAGE_RGB_ALPHA")
    if settings.cutout_image is not None:
        col.template_icon(icon_value=col.icon(settings.cutout_image), scale=5.0)
        col.label(text=settings.cutout_info or "Cut-out", icon="CHECKMARK")
        if settings.cutout_note:
            col.label(text=settings.cutout_note[:110], icon="INFO")


def draw_import_menu(self, context):
    self.layout.operator("trellis.import_ovoxel", text="O-Voxel (.npz/.vxz)")


CLASSES = (TRELLIS_PT_main, TRELLIS_UL_history, TRELLIS_PT_history, TRELLIS_MT_object)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_object.append(draw_object_menu)
    bpy.types.TOPBAR_MT_file_import.append(draw_import_menu)


def unregister() -> None:
    global _previews
    bpy.types.TOPBAR_MT_file_import.remove(draw_import_menu)
    bpy.types.VIEW3D_MT_object.remove(draw_object_menu)
    if _previews is not None:
        try:
            bpy.utils.previews.remove(_previews)
        except Exception:
            pass
        _previews = None
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
