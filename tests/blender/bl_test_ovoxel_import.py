"""File › Import O-Voxel with real assets: the source frame, size and location come back (Y-up glTF →
Blender Z-up, like Blender's own glTF importer), or the unit cube with Import Normalised."""

from __future__ import annotations

import bpy
import numpy as np
import pytest


def _world_points(objs) -> np.ndarray:
    pts = []
    for o in objs:
        me = o.data
        co = np.empty(len(me.vertices) * 3, np.float32)
        me.vertices.foreach_get("co", co)
        co = co.reshape(-1, 3).astype(np.float64)
        M = np.array(o.matrix_world)
        pts.append(co @ M[:3, :3].T + M[:3, 3])
    return np.concatenate(pts)


def _bbox(objs):
    p = _world_points(objs)
    return p.min(0), p.max(0)


@pytest.fixture
def barrel_ovoxel(shared_dir, tmp_path):
    from backend import ovoxel
    from backend.mesh_io import load_mesh

    src = shared_dir / "assets" / "meshes" / "barrel" / "barrel.glb"
    ov = ovoxel.encode_mesh(load_mesh(str(src)), 96, normalize=True)
    path = tmp_path / "barrel.npz"
    ovoxel.save(str(path), ov)
    return src, path


def test_ovoxel_of_yup_gltf_imports_upright_at_source_bbox(addon, clean_scene, barrel_ovoxel):
    src, path = barrel_ovoxel
    assert bpy.ops.import_scene.gltf(filepath=str(src)) == {"FINISHED"}
    ref = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    lo_ref, hi_ref = _bbox(ref)
    diag = float(np.linalg.norm(hi_ref - lo_ref))
    assert (hi_ref - lo_ref)[2] > 1.1 * (hi_ref - lo_ref)[0]           # the barrel stands along Z
    bpy.context.scene.cursor.location = (5.0, -3.0, 2.0)                 # restored: not at the cursor
    assert bpy.ops.trellis.import_ovoxel(filepath=str(path)) == {"FINISHED"}
    obj = bpy.context.active_object
    lo, hi = _bbox([obj])
    err = max(np.abs(lo - lo_ref).max(), np.abs(hi - hi_ref).max()) / diag
    print(f"O-Voxel import bbox error vs Blender's glTF import: {100 * err:.4f} % of the diagonal")
    assert err < 0.02, (lo, hi, lo_ref, hi_ref)
    # outward normals: the barrel's faces point away from its axis on average
    me = obj.data
    n = np.empty(len(me.polygons) * 3, np.float32)
    me.polygons.foreach_get("normal", n)
    c = np.empty(len(me.polygons) * 3, np.float32)
    me.polygons.foreach_get("center", c)
    rel = c.reshape(-1, 3) - (lo + hi) / 2
    assert (np.einsum("ij,ij->i", n.reshape(-1, 3), rel) > 0).mean() > 0.9


def test_import_normalised_keeps_unit_cube_at_cursor(addon, clean_scene, barrel_ovoxel):
    _, path = barrel_ovoxel
    bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
    assert bpy.ops.trellis.import_ovoxel(filepath=str(path), normalized=True) == {"FINISHED"}
    obj = bpy.context.active_object
    lo, hi = _bbox([obj])
    assert np.allclose(obj.location, (1.0, 2.0, 3.0))
    assert abs(float((hi - lo).max()) - 1.0) < 0.03
    assert (hi - lo)[2] == pytest.approx((hi - lo).max())                # upright (Y-up → Z-up) here too


def _export_gltf_json(tmp_path, obj, name: str):
    import json

    for o in bpy.context.view_layer.objects:
        o.select_set(o == obj)
    out = tmp_path / f"{name}.glb"
    assert bpy.ops.export_scene.gltf(filepath=str(out), export_format="GLB", use_selection=True) == {"FINISHED"}
    raw = out.read_bytes()
    n = int.from_bytes(raw[12:16], "little")
    return json.loads(raw[20:20 + n]), raw


def _png_of(gl, raw, tex_index):
    import io

    from PIL import Image

    img = gl["images"][gl["textures"][tex_index]["source"]]
    view = gl["bufferViews"][img["bufferView"]]
    n = int.from_bytes(raw[12:16], "little")
    bin_start = 20 + n + 8
    data = raw[bin_start + view.get("byteOffset", 0): bin_start + view.get("byteOffset", 0) + view["byteLength"]]
    return np.asarray(Image.open(io.BytesIO(data)))


def test_imported_ovoxel_decimated_baked_exports_complete_pbr(addon, clean_scene, barrel_ovoxel, tmp_path):
    from backend import ovoxel

    _, path = barrel_ovoxel
    assert bpy.ops.trellis.import_ovoxel(filepath=str(path), decimate=6000, bake_textures=True,
                                         texture_size=256) == {"FINISHED"}
    obj = bpy.context.active_object
    assert len(obj.data.polygons) <= 6600 and [l.name for l in obj.data.uv_layers] == ["UVMap"]
    gl, raw = _export_gltf_json(tmp_path, obj, "imported")
    pbr = gl["materials"][0]["pbrMetallicRoughness"]
    assert "baseColorTexture" in pbr and "metallicRoughnessTexture" in pbr
    # every face's texel (at its UV centroid) holds the O-Voxel's attributes at that face's centre
    ov = ovoxel.load(str(path))
    me = obj.data
    nf = len(me.polygons)
    centre = np.empty(nf * 3, np.float32)
    me.polygons.foreach_get("center", centre)
    uv = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers["UVMap"].data.foreach_get("uv", uv)
    starts = np.empty(nf, np.int32)
    me.polygons.foreach_get("loop_start", starts)
    uvc = uv.reshape(-1, 2)[starts[:, None] + np.arange(3)].mean(1)
    grid = ovoxel.grid_points(centre.reshape(-1, 3), up_axis=ovoxel.source_up_axis(ov.meta),
                              normalization=ov.meta["normalization"], aabb=ov.aabb, restored=True)
    expect = ovoxel.sample_attributes(ov.coords, ov.attrs, ov.resolution, ov.aabb, grid, fallback="nearest")
    base = _png_of(gl, raw, pbr["baseColorTexture"]["index"])
    mr = _png_of(gl, raw, pbr["metallicRoughnessTexture"]["index"])
    H, W = base.shape[:2]
    px = np.clip((uvc[:, 0] * W).astype(int), 0, W - 1)
    py = np.clip(((1 - uvc[:, 1]) * H).astype(int), 0, H - 1)          # PNG rows top-down
    err_base = np.abs(base[py, px, :3] / 255.0 - expect[:, :3])
    err_rough = np.abs(mr[py, px, 1] / 255.0 - expect[:, 4])
    print(f"baked texel vs O-Voxel: base colour median {np.median(err_base):.4f}, roughness {np.median(err_rough):.4f}")
    assert np.median(err_base) < 0.03 and np.median(err_rough) < 0.03


def test_generated_object_exports_complete_pbr(addon, clean_scene, tmp_path):
    from helpers import addon_module, sphere_arrays

    ops = addon_module(addon, "operators")
    jobs = addon_module(addon, "jobs")
    v, f = sphere_arrays(12, 24)
    res = 32
    coords = np.unique(np.clip(np.floor((v + 0.5) * res), 0, res - 1).astype(np.int32), axis=0)
    attrs = np.tile(np.array([0.8, 0.4, 0.2, 0.6, 0.3, 1.0], np.float32), (len(coords), 1))
    rec = jobs.JobRecord("generate-export", "generate", {"seed": 1, "pipeline_type": "512", "texture_size": 64},
                         {"name": "gen", "material_mode": "TEXTURES"})
    rec.status = "done"
    rec.result = {"arrays": {"vertices": v, "faces": f, "coords": coords, "attrs": attrs},
                  "meta": {"resolution": res, "seed": 1, "pipeline_type": "512"}}
    obj = ops.apply_generate(bpy.context, rec)
    gl, raw = _export_gltf_json(tmp_path, obj, "generated")
    pbr = gl["materials"][0]["pbrMetallicRoughness"]
    assert "baseColorTexture" in pbr and "metallicRoughnessTexture" in pbr
    mr = _png_of(gl, raw, pbr["metallicRoughnessTexture"]["index"])
    assert abs(np.median(mr[..., 2]) - 0.6 * 255) <= 2 and abs(np.median(mr[..., 1]) - 0.3 * 255) <= 2
