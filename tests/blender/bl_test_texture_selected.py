"""Texture Selected with real assets and the real backend (tiny checkpoints): world transform, UV map
choice, panel settings, multi-material slots, refusal of a bake that covers nothing."""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np
import pytest

from bl_test_e2e import _object_png, real_backend  # noqa: F401  (fixture)
from helpers import addon_module, draw_panel, load_spot, our_class


def _world_vertices(obj) -> np.ndarray:
    v = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", v)
    m = np.array(obj.matrix_world)
    return v.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]


def _last(runtime, kind="texture"):
    return [r for r in runtime.manager.jobs.values() if r.kind == kind][-1]


def test_rotated_obj_is_textured_in_world_orientation(addon, real_backend, tmp_path, shared_dir):  # noqa: F811
    runtime = addon_module(addon, "runtime")
    st = bpy.context.scene.trellis2
    st.tex_steps, st.texture_resolution = 3, "512"
    spot = load_spot(shared_dir)
    spot.location = (2.0, -1.0, 0.5)
    spot.scale = (1.5, 1.5, 1.5)
    bpy.context.view_layer.update()
    assert abs(spot.rotation_euler.x) > 1.0            # the OBJ importer's Y-up → Z-up object rotation
    res = bpy.ops.trellis.texture_selected(filepath=_object_png(tmp_path / "img.png"), texture_size=64)
    assert res == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    rec = _last(runtime)
    stored = np.load(Path(rec.result["folder"]) / "input" / "mesh.npz")     # what the backend job received
    m = stored["matrix"].astype(np.float64)
    assert np.allclose(m, np.array(spot.matrix_world), atol=1e-6)
    world = _world_vertices(spot)
    assert np.allclose(stored["vertices"] @ m[:3, :3].T + m[:3, 3], world, atol=1e-4)
    lo, hi = world.min(0), world.max(0)
    norm = rec.result["meta"]["normalization"]
    assert np.allclose(norm["center"], (lo + hi) / 2, atol=1e-4)            # the world-space shape was textured
    assert norm["scale"] == pytest.approx(0.99999 / float((hi - lo).max()), rel=1e-5)
    # the panel's texture settings were sent
    assert rec.request["stage_params"]["tex_slat"]["steps"] == 3 and rec.request["resolution"] == 512
    assert spot["trellis2_texture_uv_map"] == "UVMap" or spot["trellis2_texture_uv_map"] in spot.data.uv_layers


def test_tiling_uv_map_is_skipped_for_a_proper_one(addon, real_backend, tmp_path, shared_dir):  # noqa: F811
    runtime = addon_module(addon, "runtime")
    spot = load_spot(shared_dir)
    me = spot.data
    good = me.uv_layers.active.name
    tiled = me.uv_layers.new(name="Tiled")
    uv = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers[good].data.foreach_get("uv", uv)
    tiled.data.foreach_set("uv", uv * 9.0)              # a tiling material's layout: mostly outside 0-1
    me.uv_layers.active = tiled
    names = [l.name for l in me.uv_layers]
    res = bpy.ops.trellis.texture_selected(filepath=_object_png(tmp_path / "img.png"), texture_size=64)
    assert res == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    rec = _last(runtime)
    assert rec.extra["uv_map"] == good and "Tiled" in rec.extra["uv_note"] and "outside 0–1" in rec.extra["uv_note"]
    assert rec.result["meta"]["coverage"] >= 0.3
    assert [l.name for l in me.uv_layers] == names and spot["trellis2_texture_uv_map"] == good
    # only a tiling map: a new TRELLIS_UV is unwrapped and baked with real coverage
    me.uv_layers.remove(me.uv_layers[good])
    res = bpy.ops.trellis.texture_selected(filepath=_object_png(tmp_path / "img.png"), texture_size=64)
    assert res == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    rec = _last(runtime)
    assert "new_uv" in rec.extra and rec.result["meta"]["coverage"] >= 0.3
    assert "TRELLIS_UV" in me.uv_layers and "Tiled" in me.uv_layers


def test_multi_material_slots_are_kept(addon, real_backend, tmp_path, shared_dir):  # noqa: F811
    runtime = addon_module(addon, "runtime")
    st = bpy.context.scene.trellis2
    spot = load_spot(shared_dir)
    me = spot.data
    me.materials.append(bpy.data.materials.new("Body"))
    me.materials.append(bpy.data.materials.new("Horns"))
    idx = (np.arange(len(me.polygons)) % 3 == 0).astype(np.int32)
    me.polygons.foreach_set("material_index", idx)
    st.texture_slots = "PER_SLOT"
    assert bpy.ops.trellis.texture_selected(filepath=_object_png(tmp_path / "i.png"), texture_size=32) == {"FINISHED"}
    assert [m.name for m in me.materials] == ["Body", "Horns", "Body_TRELLIS", "Horns_TRELLIS"]
    got = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("material_index", got)
    assert np.array_equal(got, idx + 2)                  # each part on its own new material
    imgs = {n.image.name for m in me.materials[2:] for n in m.node_tree.nodes if n.bl_idname == "ShaderNodeTexImage"}
    assert len(imgs) == 2                                # both share the one baked texture set
    st.texture_slots = "ONE"
    assert bpy.ops.trellis.texture_selected(filepath=_object_png(tmp_path / "i.png"), texture_size=32) == {"FINISHED"}
    me.polygons.foreach_get("material_index", got)
    assert len(me.materials) == 5 and (got == 4).all()
    # a result whose bake covered almost nothing is refused and changes nothing
    rec = _last(runtime)
    rec.result["meta"]["coverage"] = 0.004
    texture_objects = addon_module(addon, "texture_objects")
    with pytest.raises(ValueError, match="covered only 0.4%"):
        texture_objects.apply_texture(bpy.context, rec)
    assert len(me.materials) == 5


def test_panel_says_which_uv_map(addon, clean_scene, shared_dir):
    panel = our_class(addon, "TRELLIS_PT_main")
    spot = load_spot(shared_dir)
    assert any("bakes into 'UVMap'" in t or "bakes into" in t for t in draw_panel(panel).texts())
    spot.data.uv_layers.remove(spot.data.uv_layers.active)
    assert any("new UV map 'TRELLIS_UV'" in t for t in draw_panel(panel).texts())
