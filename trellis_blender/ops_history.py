"""O-Voxel import, voxel texture baking and the job history operators (refresh, re-import, re-run, folder)."""

from __future__ import annotations

import os

import bpy
from bpy.props import BoolProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from . import jobs, mesh_import
from .backend.jobs import Job
from .ops_jobs import JobOperator, poll_common, regenerate
from .scene_results import (OVOXEL_PROP, VoxelSource, _read_json, apply_generate, load_ovoxel_arrays,
                            load_voxel_source, voxel_source_path)
from .session import refresh_history

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
        if item is None or not Job(item.folder).result_path.is_file():
            cls.poll_message_set("Select a finished job with a stored result")
            return False
        return True

    def execute(self, context):
        item = _history_item(context)
        folder = item.folder
        try:
            arrays, _ = load_ovoxel_arrays(str(Job(folder).result_path))
            rec = jobs.JobRecord(item.name, item.kind or "generate",
                                 {"seed": item.seed, "pipeline_type": item.pipeline},
                                 {"name": item.name})
            rec.result = {"arrays": arrays, "meta": _read_json(str(Job(folder).result_meta_path)),
                          "folder": folder}
            rec.status = "done"
            if rec.kind == "texture":
                raise ValueError("Texture jobs are re-applied with Texture Selected")
            apply_generate(context, rec)
        except Exception as exc:
            self.report({"ERROR"}, f"Re-import failed: {exc}")
            return {"CANCELLED"}
        return {"FINISHED"}




class TRELLIS_OT_history_rerun(JobOperator, bpy.types.Operator):
    """Run the selected job again with a new random seed"""

    bl_idname = "trellis.history_rerun"
    bl_label = "Re-run with New Seed"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if not poll_common(cls, context):
            return False
        item = _history_item(context)
        if item is None or item.kind not in ("generate", "upscale") or not item.image_path:
            cls.poll_message_set("Select a generate job whose input image is stored")
            return False
        return True

    def execute(self, context):
        item = _history_item(context)
        return regenerate(context, item.image_path, item.pipeline)


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


CLASSES = (TRELLIS_OT_import_ovoxel, TRELLIS_OT_bake_voxel_textures, TRELLIS_OT_history_refresh,
           TRELLIS_OT_history_reimport, TRELLIS_OT_history_rerun, TRELLIS_OT_history_open_folder)
