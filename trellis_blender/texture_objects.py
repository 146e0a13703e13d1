"""Texture Selected, Blender side: what is sent for each mesh and how the baked textures come back.

* Each object is sent with its **world transform** (``arrays["matrix"]``): the backend textures the
  world-space (Z-up) shape, as the artist sees it, and bakes into the object's own UVs.
* The UV map to bake into: the active one if it is a usable bake target (inside 0–1, not stacked, see
  :func:`backend.ovoxel.uvbake.uv_layout_stats`), else the first other map that is, else a new
  ``TRELLIS_UV`` (Smart UV Project). The choice and the reason are reported.
* Materials: with **Per Slot** (default) every material slot the faces use gets its own new material
  (all sharing the two baked images), so the mesh keeps its part structure (selection by material,
  multi-material export); **One Material** puts every face on one new material. Old materials always
  keep their slots (nothing is deleted; the whole apply is one undo step).
* A bake that covered almost nothing of the texture is an error, never a silent success.
"""

from __future__ import annotations

from typing import Optional

import bpy
import numpy as np

from . import jobs, materials, mesh_import, mesh_read
from .backend.ovoxel.uvbake import uv_layout_stats

#: Below this fraction of texels covered by the mesh's UVs a bake result is refused.
MIN_BAKE_COVERAGE = 0.02


def choose_uv_map(obj: "bpy.types.Object", depsgraph) -> tuple[Optional[str], Optional[dict], list[str]]:
    """``(uv map name, triangulated arrays with that map's "uv", notes)``; name None = none is usable."""
    me = obj.data
    order = ([me.uv_layers.active] if me.uv_layers.active is not None else []) + \
        [layer for layer in me.uv_layers if layer != me.uv_layers.active]
    notes: list[str] = []
    for layer in order:
        arrays = mesh_read.triangulated_arrays(obj, depsgraph, uv_name=layer.name)
        problem = uv_layout_stats(arrays["uv"].reshape(-1, 3, 2)).problem()
        if problem is None:
            return layer.name, arrays, notes
        notes.append(f"UV map '{layer.name}' is not a bake target: {problem}")
    return None, None, notes


def texture_payload(context, obj: "bpy.types.Object", depsgraph) -> tuple[dict, dict, str]:
    """``(arrays, extra, report line)`` of one mesh for a texture job."""
    name, arrays, notes = choose_uv_map(obj, depsgraph)
    extra: dict = {"object": obj.name}
    if name is not None:
        extra["uv_map"] = name
        line = f"{obj.name}: baking into UV map '{name}'"
    else:
        loop_uv, arrays = mesh_read.smart_uv_corners(context, obj)
        extra["new_uv"] = loop_uv
        line = f"{obj.name}: a new UV map '{mesh_import.UV_NAME_NEW}' will be created"
    if notes:
        line += " (" + "; ".join(notes) + ")"
    if "uv" not in arrays:
        raise ValueError(f"{obj.name!r}: could not read UVs")
    out = {"vertices": arrays["vertices"], "faces": arrays["faces"],
           "uvs": np.ascontiguousarray(arrays.pop("uv").reshape(-1, 3, 2), dtype=np.float32),
           "matrix": np.ascontiguousarray(np.array(obj.matrix_world, dtype=np.float32))}
    extra["uv_note"] = line
    return out, extra, line


def _uv_map_for(me, rec: jobs.JobRecord) -> str:
    if rec.extra.get("new_uv") is None:
        return rec.extra.get("uv_map") or me.uv_layers.active.name
    name = mesh_import.UV_NAME_NEW
    if name in me.uv_layers:  # a previous run made it: never overwrite, pick a free name
        i = 1
        while f"{name}.{i:03d}" in me.uv_layers:
            i += 1
        name = f"{name}.{i:03d}"
    mesh_import.set_uv_map(me, name, rec.extra["new_uv"])
    return name


def apply_texture(context, rec: jobs.JobRecord, save_dir: Optional[str] = None) -> "bpy.types.Object":
    """Put a texture job's images on its object (new material(s), old ones kept in their slots)."""
    obj = bpy.data.objects.get(rec.extra["object"])
    if obj is None or obj.type != "MESH":
        raise ValueError(f"The object {rec.extra['object']!r} is gone")
    result = rec.result or {}
    arrays = dict(result.get("arrays") or {})
    meta = dict(result.get("meta") or {})
    bc = arrays.get("base_color", arrays.get("base_color_texture"))
    mr = arrays.get("metallic_roughness", arrays.get("metallic_roughness_texture"))
    if bc is None:
        raise ValueError("The texture result has no base colour image")
    coverage = meta.get("coverage")
    if coverage is not None and float(coverage) < MIN_BAKE_COVERAGE:
        raise ValueError(f"{obj.name}: the bake covered only {float(coverage):.1%} of the texture, so the UV map "
                         f"is not usable; nothing was changed. Give the mesh a UV map inside 0–1 (or remove its "
                         f"UV maps to let TRELLIS create one).")
    me = obj.data
    uv_name = _uv_map_for(me, rec)
    base = f"{obj.name}_TRELLIS"
    img_bc = materials.image_from_array(f"{base}_BaseColor", bc, save_dir=save_dir)
    img_mr = materials.image_from_array(f"{base}_MetallicRoughness", mr, non_color=True,
                                        save_dir=save_dir) if mr is not None else None
    bca = np.asarray(bc)
    blended = bca.ndim == 3 and bca.shape[2] == 4 and materials.alpha_varies(bca[:, :, 3])
    idx = np.zeros(len(me.polygons), dtype=np.int32)
    me.polygons.foreach_get("material_index", idx)
    slots = [int(s) for s in np.unique(idx)] if len(me.materials) else [0]
    per_slot = rec.extra.get("material_slots", "PER_SLOT") == "PER_SLOT" and len(slots) > 1
    new_index = np.zeros(max(slots) + 1, dtype=np.int32)
    for s in (slots if per_slot else [slots[0]]):
        old = me.materials[s] if s < len(me.materials) and me.materials[s] is not None else None
        name = f"{old.name}_TRELLIS" if per_slot and old is not None else base
        me.materials.append(materials.texture_material(name, img_bc, img_mr, uv_name, blended=blended))
        new_index[s] = len(me.materials) - 1
    if not per_slot:
        new_index[:] = len(me.materials) - 1
    me.polygons.foreach_set("material_index", new_index[np.clip(idx, 0, len(new_index) - 1)])
    me.update()
    obj["trellis2_texture_job"] = rec.job_id
    obj["trellis2_texture_uv_map"] = uv_name
    if rec.extra.get("image_hash"):
        obj["trellis2_texture_image_hash"] = rec.extra["image_hash"]
    return obj
