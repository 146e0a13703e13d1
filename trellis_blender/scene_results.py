"""Scene conversion: finished job results and O-Voxel files into Blender objects (meshes, UVs,
baked PBR textures), and the voxel sources objects can be (re)baked from. Called inside UNDO
operators; no operators here.
"""

from __future__ import annotations

import os
from typing import Optional

import bpy
import numpy as np

from . import cutout, jobs, materials, mesh_import, mesh_read, texture_objects, views
from .prefs_access import job_folder

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
    loop_uv, tri = mesh_read.smart_uv_corners(context, obj)
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
        folder = job_folder(str(job))
        if folder is not None and folder.result_path.is_file():
            return str(folder.result_path)
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



def _read_json(path: str) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}

