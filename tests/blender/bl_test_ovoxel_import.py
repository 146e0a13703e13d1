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
    print(f"O-Voxel import bbox error vs Blender's glTF import: {100 * err:.3f} % of the diagonal")
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
