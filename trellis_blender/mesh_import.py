"""Build Blender meshes from result arrays (bpy + numpy, no per-element loops; reading meshes back out
for the backend is ``mesh_read``).

The fast path is Blender's attribute API (measured ≈ 1 s per million triangles, see
``shared/spec/blender-addon.md`` §A.1): contiguous ``<f4`` positions into ``position``, ``<i4`` corner
vertices into ``.corner_vert``, ``loop_start`` for polygons, then ``update(calc_edges=True)``.
``Mesh.validate()`` is avoided; :func:`check_mesh_arrays` does cheap numpy checks instead.

Result arrays (any subset; names as sent by the backend or read from an O-Voxel file):

* ``vertices`` (N, 3) float, Z-up, and ``faces`` (M, 3) int — required;
* ``normals`` (N, 3) — optional custom split normals;
* vertex PBR: ``attrs`` (N, 6) = base colour RGB (sRGB), metallic, roughness, alpha (official channel
  order), or separate ``base_color`` (N, 3|4), ``metallic``, ``roughness``, ``alpha`` (N,);
* textures: ``uv`` (N, 2) per vertex or (3M, 2) per corner, ``base_color_texture`` (H, W, 3|4) and
  ``metallic_roughness_texture`` (H, W, 3|4, glTF packing), top-down rows.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import bpy
import numpy as np

from . import materials

UV_NAME_NEW = "TRELLIS_UV"
MAX_UV_MAPS = 8

# Accepted alternative names for result arrays → canonical name.
_ALIASES = {
    "verts": "vertices", "vertex": "vertices", "positions": "vertices",
    "faces_idx": "faces", "triangles": "faces", "indices": "faces",
    "vertex_normals": "normals",
    "base_color_tex": "base_color_texture", "basecolor_texture": "base_color_texture",
    "mr_texture": "metallic_roughness_texture", "metallic_roughness_tex": "metallic_roughness_texture",
    "uvs": "uv", "corner_uv": "uv",
}


def canonical_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Result arrays under their canonical names (see module docstring)."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if value is None:
            continue
        value = np.asarray(value)
        if key in ("base_color", "metallic_roughness") and value.ndim == 3:  # images, not per-vertex
            key = f"{key}_texture"
        out[_ALIASES.get(key, key)] = value
    return out


def check_mesh_arrays(vertices: np.ndarray, faces: np.ndarray) -> None:
    """Raise ``ValueError`` unless the arrays describe a valid triangle mesh (vectorised checks)."""
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be (N, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be (M, 3) triangles, got {faces.shape}")
    if len(faces) == 0 or len(vertices) == 0:
        raise ValueError("the mesh is empty (0 faces)")
    if not np.isfinite(vertices).all():
        raise ValueError("vertices contain NaN or infinite values")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError(f"face indices out of range [0, {len(vertices)})")
    if ((faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])).any():
        raise ValueError("faces repeat a vertex index")


def _keep_mask(faces: np.ndarray) -> np.ndarray:
    return ~((faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2]))


def drop_degenerate_faces(faces: np.ndarray) -> tuple[np.ndarray, int]:
    """Faces without repeated vertex indices, and how many were dropped."""
    keep = _keep_mask(faces)
    dropped = int(len(faces) - keep.sum())
    return (faces if dropped == 0 else np.ascontiguousarray(faces[keep])), dropped


def build_mesh(name: str, vertices: np.ndarray, faces: np.ndarray, *,
               normals: Optional[np.ndarray] = None, smooth: bool = True) -> "bpy.types.Mesh":
    """A new mesh datablock from (N, 3) vertices and (M, 3) triangles via the attribute API."""
    v = np.ascontiguousarray(vertices, dtype=np.float32)
    f = np.ascontiguousarray(faces, dtype=np.int32)
    check_mesh_arrays(v, f)
    nv, nf = len(v), len(f)
    me = bpy.data.meshes.new(name)
    me.vertices.add(nv)
    me.loops.add(3 * nf)
    me.polygons.add(nf)
    me.attributes["position"].data.foreach_set("vector", v.ravel())
    corner = me.attributes.get(".corner_vert")
    if corner is not None:
        corner.data.foreach_set("value", f.ravel())
    else:  # fallback for builds without the internal attribute name
        me.loops.foreach_set("vertex_index", f.ravel())
    me.polygons.foreach_set("loop_start", np.arange(0, 3 * nf, 3, dtype=np.int32))
    me.update(calc_edges=True)
    if smooth:
        me.shade_smooth()
    if normals is not None:
        n = np.ascontiguousarray(normals, dtype=np.float32)
        if n.shape == v.shape and np.isfinite(n).all():
            me.normals_split_custom_set_from_vertices(n)
    return me


def add_point_float(me: "bpy.types.Mesh", name: str, values: np.ndarray) -> None:
    """A FLOAT point attribute (replaced if present)."""
    if name in me.attributes:
        me.attributes.remove(me.attributes[name])
    attr = me.attributes.new(name, "FLOAT", "POINT")
    attr.data.foreach_set("value", np.ascontiguousarray(values, dtype=np.float32).ravel())


def add_point_color(me: "bpy.types.Mesh", name: str, rgb_srgb: np.ndarray, alpha: Optional[np.ndarray] = None) -> None:
    """A FLOAT_COLOR point attribute from sRGB values (stored linear, as Blender expects)."""
    rgb = np.asarray(rgb_srgb)
    if rgb.dtype == np.uint8:
        rgb = rgb.astype(np.float32) / 255.0
    rgba = np.ones((len(rgb), 4), dtype=np.float32)
    rgba[:, :3] = materials.srgb_to_linear(rgb[:, :3])
    if alpha is not None:
        rgba[:, 3] = np.asarray(alpha, dtype=np.float32).ravel()
    elif rgb.shape[1] == 4:
        rgba[:, 3] = rgb[:, 3]
    col = me.color_attributes.new(name, "FLOAT_COLOR", "POINT")
    col.data.foreach_set("color", rgba.ravel())
    me.color_attributes.active_color = col


def vertex_pbr(arrays: Mapping[str, np.ndarray], n_vertices: int) -> Optional[dict[str, np.ndarray]]:
    """``{base_color (N,3) sRGB float, metallic, roughness, alpha}`` from the result arrays, if present."""
    a = arrays
    if "attrs" in a:
        attrs = np.asarray(a["attrs"], dtype=np.float32)
        if attrs.dtype == np.uint8:
            attrs = attrs / 255.0
        if attrs.ndim != 2 or attrs.shape[0] != n_vertices or attrs.shape[1] < 3:
            raise ValueError(f"attrs must be (N, 6) with N = {n_vertices}, got {attrs.shape}")
        pad = np.ones((n_vertices, 6), dtype=np.float32)
        pad[:, 3] = 0.0  # metallic default
        pad[:, 4] = 0.5  # roughness default
        pad[:, : attrs.shape[1]] = attrs[:, :6]
        return {"base_color": pad[:, :3], "metallic": pad[:, 3], "roughness": pad[:, 4], "alpha": pad[:, 5]}
    if "base_color" not in a:
        return None
    bc = np.asarray(a["base_color"])
    bc = bc.astype(np.float32) / 255.0 if bc.dtype == np.uint8 else bc.astype(np.float32)
    if bc.shape[0] != n_vertices:
        raise ValueError(f"base_color has {bc.shape[0]} rows for {n_vertices} vertices")

    def scalar(key: str, default: float) -> np.ndarray:
        if key in a:
            return np.asarray(a[key], dtype=np.float32).reshape(n_vertices)
        return np.full(n_vertices, default, dtype=np.float32)

    alpha = scalar("alpha", 1.0) if ("alpha" in a or bc.shape[1] < 4) else bc[:, 3]
    return {"base_color": bc[:, :3], "metallic": scalar("metallic", 0.0),
            "roughness": scalar("roughness", 0.5), "alpha": alpha}


def voxel_attrs_at(points: np.ndarray, coords: np.ndarray, attrs: np.ndarray, resolution: int,
                   aabb=((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))) -> np.ndarray:
    """Per-point attributes from a sparse voxel grid: trilinear via the O-Voxel codec when it is
    bundled (the nearest present voxel for points with none around them, never zeros), else the
    attributes of the voxel containing each point (mean of all for points outside every voxel).
    Vectorised; ``points`` (P, 3) in the grid's world frame."""
    try:
        from .backend.ovoxel import sample_attributes  # numpy-only codec shipped with the extension

        out = sample_attributes(np.asarray(coords), np.asarray(attrs, dtype=np.float32), int(resolution),
                                np.asarray(aabb, dtype=np.float64), np.asarray(points, dtype=np.float32),
                                fallback="nearest")
        out = np.asarray(out, dtype=np.float32)
        if out.shape == (len(points), attrs.shape[1]) and np.isfinite(out).all():
            return out
    except Exception:  # codec absent or a different signature: nearest voxel below
        pass
    lo = np.asarray(aabb[0], dtype=np.float64)
    size = (np.asarray(aabb[1], dtype=np.float64) - lo) / resolution
    r = np.int64(resolution)
    c = np.asarray(coords, dtype=np.int64)
    keys = (c[:, 0] * r + c[:, 1]) * r + c[:, 2]
    order = np.argsort(keys, kind="stable")
    skeys = keys[order]
    ijk = np.clip(np.floor((np.asarray(points, dtype=np.float64) - lo) / size), 0, resolution - 1).astype(np.int64)
    q = (ijk[:, 0] * r + ijk[:, 1]) * r + ijk[:, 2]
    pos = np.clip(np.searchsorted(skeys, q), 0, len(skeys) - 1)
    found = skeys[pos] == q
    a = np.asarray(attrs, dtype=np.float32)
    out = np.empty((len(points), a.shape[1]), dtype=np.float32)
    out[:] = a.mean(axis=0)
    out[found] = a[order[pos[found]]]
    return out


def corner_uvs(arrays: Mapping[str, np.ndarray], faces: np.ndarray) -> Optional[np.ndarray]:
    """(3M, 2) per-corner UVs from per-vertex (N, 2) or per-corner UVs, or None."""
    if "uv" not in arrays:
        return None
    uv = np.asarray(arrays["uv"], dtype=np.float32).reshape(-1, 2)
    if len(uv) == 3 * len(faces):
        return np.ascontiguousarray(uv)
    if len(uv) > int(faces.max()):
        return np.ascontiguousarray(uv[faces.ravel()])
    raise ValueError(f"uv has {len(uv)} rows: neither per vertex nor per corner")


def set_uv_map(me: "bpy.types.Mesh", name: str, uv_corner: np.ndarray) -> "bpy.types.MeshUVLoopLayer":
    """A new UV map holding (3M, 2) per-corner UVs (never overwrites an existing map)."""
    if name in me.uv_layers:
        raise ValueError(f"UV map {name!r} already exists")
    if len(me.uv_layers) >= MAX_UV_MAPS:
        raise ValueError(f"the mesh already has {MAX_UV_MAPS} UV maps (Blender's limit)")
    layer = me.uv_layers.new(name=name, do_init=False)
    layer.data.foreach_set("uv", np.ascontiguousarray(uv_corner, dtype=np.float32).ravel())
    return layer


def make_result_material(me: "bpy.types.Mesh", arrays: Mapping[str, np.ndarray], name: str, *,
                         material_mode: str = "AUTO", save_dir: Optional[str] = None) -> Optional["bpy.types.Material"]:
    """Add PBR data from ``arrays`` to ``me`` and return a matching material (None if no PBR data).

    ``material_mode``: ``TEXTURES`` (image textures on a UV map), ``VERTEX`` (point attributes) or
    ``AUTO`` (textures when the result has them, else vertex attributes).
    """
    faces = np.asarray(arrays["faces"]).reshape(-1, 3)
    has_tex = "base_color_texture" in arrays and "uv" in arrays
    pbr = vertex_pbr(arrays, len(me.vertices))
    use_tex = has_tex and (material_mode in ("TEXTURES", "AUTO") or pbr is None)
    if use_tex:
        uv_name = "UVMap" if "UVMap" not in me.uv_layers else UV_NAME_NEW
        set_uv_map(me, uv_name, corner_uvs(arrays, faces))
        bc = np.asarray(arrays["base_color_texture"])
        blended = bc.ndim == 3 and bc.shape[2] == 4 and materials.alpha_varies(bc[:, :, 3])
        img_bc = materials.image_from_array(f"{name}_BaseColor", bc, save_dir=save_dir)
        img_mr = None
        if "metallic_roughness_texture" in arrays:
            img_mr = materials.image_from_array(f"{name}_MetallicRoughness", arrays["metallic_roughness_texture"],
                                                non_color=True, save_dir=save_dir)
        return materials.texture_material(name, img_bc, img_mr, uv_name, blended=blended)
    if pbr is None:
        return None
    add_point_color(me, "base_color", pbr["base_color"])
    for key in ("metallic", "roughness", "alpha"):
        add_point_float(me, key, pbr[key])
    return materials.vertex_attribute_material(name, blended=materials.alpha_varies(pbr["alpha"]))


def build_result_mesh(arrays: Mapping[str, Any], *, name: str = "TRELLIS", meta: Optional[Mapping[str, Any]] = None,
                      material_mode: str = "AUTO", save_dir: Optional[str] = None) -> "bpy.types.Mesh":
    """A mesh datablock (with its material) from result arrays; nothing is linked to the scene.

    All checks run before any datablock is created, so a bad result leaves the file unchanged.
    Faces repeating a vertex index are dropped (counted in ``trellis2_degenerate_faces_dropped``).
    """
    a = canonical_arrays(arrays)
    if "vertices" not in a or "faces" not in a:
        raise ValueError("the result has no mesh (vertices/faces)")
    v = np.asarray(a["vertices"], dtype=np.float32)
    f_all = np.asarray(a["faces"]).astype(np.int32)
    if v.ndim != 2 or v.shape[1] != 3 or f_all.ndim != 2 or f_all.shape[1] != 3:
        raise ValueError(f"expected vertices (N, 3) and faces (M, 3), got {v.shape} and {f_all.shape}")
    f, dropped = drop_degenerate_faces(f_all)
    check_mesh_arrays(v, f)
    a["faces"] = f
    if dropped and "uv" in a and len(a["uv"]) == 3 * len(f_all):  # per-corner UVs follow the kept faces
        a["uv"] = np.asarray(a["uv"])[np.repeat(_keep_mask(f_all), 3)]
    if "attrs" in a and "coords" in a and len(a["attrs"]) != len(v):  # per-voxel PBR → per-vertex
        res = int((meta or {}).get("resolution") or (int(np.asarray(a["coords"]).max()) + 1))
        a["attrs"] = voxel_attrs_at(v, a["coords"], np.asarray(a["attrs"], dtype=np.float32), res)
    me = build_mesh(name, v, f, normals=a.get("normals"))
    if dropped:
        me["trellis2_degenerate_faces_dropped"] = dropped
    try:
        mat = make_result_material(me, a, name, material_mode=material_mode, save_dir=save_dir)
    except Exception:
        bpy.data.meshes.remove(me)
        raise
    if mat is not None:
        me.materials.append(mat)
    return me


def import_result(context: "bpy.types.Context", arrays: Mapping[str, Any], *, name: str = "TRELLIS",
                  meta: Optional[Mapping[str, Any]] = None, material_mode: str = "AUTO",
                  save_dir: Optional[str] = None, location=None) -> "bpy.types.Object":
    """Create one mesh object (with material) from result arrays at the 3D cursor, selected and
    active; returns it. A bad result raises ``ValueError`` and leaves the file unchanged."""
    me = build_result_mesh(arrays, name=name, meta=meta, material_mode=material_mode, save_dir=save_dir)
    obj = bpy.data.objects.new(name, me)
    obj.location = context.scene.cursor.location if location is None else location
    set_job_properties(obj, meta or {})
    collection = context.collection or context.scene.collection
    collection.objects.link(obj)
    for other in context.view_layer.objects:
        if other.select_get():
            other.select_set(False)
    obj.select_set(True)
    context.view_layer.objects.active = obj
    return obj


def decimate_object(obj: "bpy.types.Object", target_faces: int) -> int:
    """Collapse-decimate ``obj``'s mesh to about ``target_faces`` triangles (Blender's Decimate
    modifier, applied through the evaluated mesh; attributes are interpolated). Returns the new face
    count; nothing happens when the mesh already has at most ``target_faces``."""
    me = obj.data
    n = len(me.polygons)
    if target_faces <= 0 or n <= target_faces:
        return n
    mod = obj.modifiers.new("TRELLIS_Decimate", "DECIMATE")
    mod.decimate_type = "COLLAPSE"
    mod.ratio = float(target_faces) / n
    mod.use_collapse_triangulate = True
    try:
        depsgraph = bpy.context.evaluated_depsgraph_get()
        new = bpy.data.meshes.new_from_object(obj.evaluated_get(depsgraph), preserve_all_data_layers=True,
                                              depsgraph=depsgraph)
    finally:
        obj.modifiers.remove(mod)
    new.name = me.name
    for mat in me.materials:
        if mat is not None and mat.name not in [m.name for m in new.materials if m is not None]:
            new.materials.append(mat)
    for key in me.keys():
        new[key] = me[key]
    obj.data = new
    if me.users == 0:
        bpy.data.meshes.remove(me)
    return len(new.polygons)


def set_job_properties(obj: "bpy.types.Object", meta: Mapping[str, Any]) -> None:
    """Custom properties identifying the TRELLIS job that produced ``obj``."""
    if not meta:
        return
    for key in ("job", "seed", "pipeline", "image_hash"):
        if meta.get(key) is not None:
            value = meta[key]
            obj[f"trellis2_{key}"] = value if isinstance(value, (int, float)) else str(value)
    settings = meta.get("settings")
    if settings is not None:
        obj["trellis2_settings"] = json.dumps(settings, sort_keys=True, default=str)
