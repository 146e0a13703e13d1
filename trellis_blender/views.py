"""Multi-view inputs and blockout guidance, Blender side: the extra-view list operators, what a generate
request carries for them, and placing a guided result on its blockout."""

from __future__ import annotations

from typing import Optional

import bpy
import numpy as np
from bpy.props import EnumProperty, StringProperty
from bpy_extras.io_utils import ImportHelper
from mathutils import Matrix, Vector

from . import mesh_read


def view_images(settings) -> list["bpy.types.Image"]:
    """The extra views that hold an image, in list order."""
    return [v.image for v in settings.views if v.image is not None]


def guide_request(context, settings) -> tuple[dict, dict, Optional[str]]:
    """``(request fields, arrays, error)`` for "Use Selected Mesh as Blockout": the active mesh in object space
    with its world matrix (the backend normalises it like the texturing path)."""
    obj = context.active_object
    if obj is None or obj.type != "MESH":
        return {}, {}, "Use Selected Mesh as Blockout: make a mesh object active first"
    try:
        arrays = mesh_read.triangulated_arrays(obj, context.evaluated_depsgraph_get())
    except ValueError as exc:
        return {}, {}, f"Blockout: {exc}"
    fields = {"guide_strength": float(settings.blockout_strength), "guide_frame": "fit"}
    data = {"guide_vertices": np.ascontiguousarray(arrays["vertices"], np.float32),
            "guide_faces": np.ascontiguousarray(arrays["faces"], np.int32),
            "guide_matrix": np.ascontiguousarray(np.array(obj.matrix_world, dtype=np.float32))}
    return fields, data, None


def place_on_guide(obj: "bpy.types.Object", guide: dict, blockout: Optional["bpy.types.Object"],
                   placement: str) -> None:
    """Put a guided result (unit-cube mesh) onto its blockout: ``world = unit / scale + center``."""
    center = Vector([float(c) for c in guide["center"]])
    scale = float(guide["scale"])
    obj.matrix_world = Matrix.Translation(center) @ Matrix.Scale(1.0 / scale, 4)
    if blockout is None or blockout.name not in bpy.data.objects:
        return
    if placement == "BESIDE":
        width = 1.0 / scale
        obj.matrix_world = Matrix.Translation((1.1 * width, 0.0, 0.0)) @ obj.matrix_world
    else:
        blockout.hide_set(True)
        blockout.hide_render = True


class TRELLIS_OT_view_add(bpy.types.Operator, ImportHelper):
    """Add images of other views of the object (side, back…)"""

    bl_idname = "trellis.view_add"
    bl_label = "Add Views"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default="*.png;*.jpg;*.jpeg;*.webp;*.tif;*.tiff;*.bmp", options={"HIDDEN"})
    files: bpy.props.CollectionProperty(type=bpy.types.OperatorFileListElement, options={"HIDDEN", "SKIP_SAVE"})
    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN", "SKIP_SAVE"})

    def execute(self, context):
        import os

        settings = context.scene.trellis2
        names = [f.name for f in self.files if f.name] or [os.path.basename(self.filepath)]
        folder = self.directory or os.path.dirname(self.filepath)
        added = 0
        for name in names:
            path = os.path.join(folder, name)
            try:
                img = bpy.data.images.load(path, check_existing=True)
            except RuntimeError as exc:
                self.report({"WARNING"}, f"Cannot load {name}: {exc}")
                continue
            settings.views.add().image = img
            added += 1
        settings.views_index = len(settings.views) - 1
        return {"FINISHED"} if added else {"CANCELLED"}


class TRELLIS_OT_view_edit(bpy.types.Operator):
    """Remove the selected view or move it up / down"""

    bl_idname = "trellis.view_edit"
    bl_label = "Edit Views"
    bl_options = {"REGISTER", "UNDO"}

    action: EnumProperty(items=(("REMOVE", "Remove", ""), ("UP", "Up", ""), ("DOWN", "Down", ""),
                                ("CLEAR", "Clear", "")))

    @classmethod
    def poll(cls, context):
        return len(context.scene.trellis2.views) > 0

    def execute(self, context):
        st = context.scene.trellis2
        i = st.views_index
        if self.action == "CLEAR":
            st.views.clear()
            st.views_index = 0
        elif not 0 <= i < len(st.views):
            return {"CANCELLED"}
        elif self.action == "REMOVE":
            st.views.remove(i)
            st.views_index = min(i, len(st.views) - 1)
        else:
            j = i - 1 if self.action == "UP" else i + 1
            if not 0 <= j < len(st.views):
                return {"CANCELLED"}
            st.views.move(i, j)
            st.views_index = j
        return {"FINISHED"}


class TRELLIS_UL_views(bpy.types.UIList):
    """One row per extra view: thumbnail and image name."""

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        if item.image is not None:
            layout.label(text=item.image.name, icon_value=layout.icon(item.image))
        else:
            layout.label(text="(no image)", icon="IMAGE_DATA")


CLASSES = (TRELLIS_OT_view_add, TRELLIS_OT_view_edit, TRELLIS_UL_views)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
