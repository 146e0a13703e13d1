"""Sidebar panel (View3D › Sidebar › TRELLIS) and the File › Import entry; the panel's sections, the
selected-object and history sub-panels and the Object menu are in ``ui_sections``."""

from __future__ import annotations

import bpy

from . import ui_sections as sections
from .ui_sections import draw_object_menu

STATE_ICONS = {"STOPPED": "RADIOBUT_OFF", "STARTING": "SORTTIME", "READY": "CHECKMARK", "BUSY": "SORTTIME",
               "CRASHED": "ERROR"}


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
        sections.draw_remote(box, context)
        sections.draw_setup(box, context)

        # Error box: only the actions that can help with this error
        if st.error:
            sections.draw_error(layout, context, st)

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
        sections.draw_presets(col, context)
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
        if st.running:   # one bar for the whole job; its text: the stage's steps and the job's ETA
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
            if st.result_note:
                layout.label(text=st.result_note[:140], icon="INFO")


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


CLASSES = (TRELLIS_PT_main, *sections.CLASSES)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_object.append(draw_object_menu)
    bpy.types.TOPBAR_MT_file_import.append(draw_import_menu)


def unregister() -> None:
    bpy.types.TOPBAR_MT_file_import.remove(draw_import_menu)
    bpy.types.VIEW3D_MT_object.remove(draw_object_menu)
    sections.free_previews()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
