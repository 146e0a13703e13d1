"""Job operators through the real backend subprocess (fake runner: protocol-exact, torch-free, fast).

Covers the scripting API (blocking in background mode), texture-selected UV rules on the spot asset,
upscale keeping the transform, undo after each, and bad input leaving the file unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

import bpy

from helpers import (addon_module, build_plain_mesh, load_spot, render_png, stop_backend, use_fake_backend,
                     write_png)


@pytest.fixture
def fake(addon, clean_scene, tmp_path):
    manager = use_fake_backend(addon, tmp_path / "cache")
    yield manager
    stop_backend(addon)


def _scene_fingerprint():
    return (sorted(o.name for o in bpy.data.objects), sorted(m.name for m in bpy.data.meshes),
            sorted(m.name for m in bpy.data.materials), sorted(i.name for i in bpy.data.images),
            sorted((o.name, tuple(l.name for l in o.data.uv_layers)) for o in bpy.data.objects if o.type == "MESH"))


def test_generate_blocks_and_imports(addon, fake, tmp_path):
    from backend.fake_runner import fake_mesh

    mats = addon_module(addon, "materials")
    png = write_png(tmp_path / "chair.png")
    bpy.ops.ed.undo_push(message="before generate")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=5) == {"FINISHED"}
    objs = [o for o in bpy.data.objects if o.type == "MESH"]
    assert len(objs) == 1
    obj = objs[0]
    ref = fake_mesh(5, 1000)
    f = ref["faces"]
    keep = ~((f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2]))
    assert len(obj.data.vertices) == len(ref["vertices"])
    assert len(obj.data.polygons) == int(keep.sum())
    assert obj["trellis2_seed"] == 5 and obj["trellis2_pipeline"] == "512"
    assert str(obj["trellis2_job"]).startswith("generate-")
    assert len(obj["trellis2_image_hash"]) == 16
    links = mats.bsdf_links(obj.data.materials[0])
    assert set(links) == {"Base Color", "Metallic", "Roughness", "Alpha"}
    st = bpy.context.window_manager.trellis2
    assert not st.running and st.error == ""
    assert any(h.name == obj["trellis2_job"] for h in st.history)
    name = obj.name
    bpy.ops.ed.undo_push(message="after")  # scripted calls push no undo step by themselves
    bpy.ops.ed.undo()
    assert name not in bpy.data.objects


def test_texture_selected_keeps_uvs_and_material(addon, fake, tmp_path, shared_dir, artifacts_dir):
    obj = load_spot(shared_dir)
    old = bpy.data.materials.new("Old")
    obj.data.materials.append(old)
    me = obj.data
    uv_names = [l.name for l in me.uv_layers]
    assert uv_names, "spot has UVs"
    uv_before = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers[0].data.foreach_get("uv", uv_before)
    nv = len(me.vertices)
    bpy.ops.ed.undo_push(message="before texture")
    png = write_png(tmp_path / "wood.png", seed=3)
    assert bpy.ops.trellis.texture_selected(filepath=png, texture_size=64) == {"FINISHED"}
    obj = bpy.data.objects[obj.name]
    me = obj.data
    assert [l.name for l in me.uv_layers] == uv_names        # no new map, nothing renamed
    uv_after = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers[0].data.foreach_get("uv", uv_after)
    assert np.array_equal(uv_before, uv_after)
    assert len(me.vertices) == nv
    assert [m.name for m in me.materials][0] == "Old" and len(me.materials) == 2
    new = me.materials[1]
    imgs = [n.image for n in new.node_tree.nodes if n.bl_idname == "ShaderNodeTexImage"]
    assert len(imgs) == 2 and all(tuple(i.size) == (64, 64) for i in imgs)
    uvnode = [n for n in new.node_tree.nodes if n.bl_idname == "ShaderNodeUVMap"][0]
    assert uvnode.uv_map == uv_names[0]
    mi = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("material_index", mi)
    assert (mi == 1).all()
    render_png(obj, artifacts_dir / "textured_spot_fake_backend.png")
    name = obj.name
    bpy.ops.ed.undo_push(message="after")  # scripted calls push no undo step by themselves
    bpy.ops.ed.undo()
    obj = bpy.data.objects[name]
    assert [m.name for m in obj.data.materials] == ["Old"]


def test_texture_selected_without_uvs_adds_trellis_uv(addon, fake, tmp_path, shared_dir):
    spot = load_spot(shared_dir)                  # selected too: its UVs must stay untouched
    spot_uv = np.empty(len(spot.data.loops) * 2, np.float32)
    spot.data.uv_layers[0].data.foreach_get("uv", spot_uv)
    obj = build_plain_mesh("NoUV")
    # an artist's mesh has been in edit mode (bpy 5.0.1 crashes writing edge flags of a mesh fresh
    # from from_pydata that never was)
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.object.mode_set(mode="OBJECT")
    spot.select_set(True)
    assert len(obj.data.uv_layers) == 0
    # a partial edit-mode selection, hidden faces, an active face and edge select mode: all kept
    pattern = {}
    for coll, attr, rule in (("vertices", "select", lambda i: i % 3 == 0), ("edges", "select", lambda i: i % 2 == 0),
                             ("polygons", "select", lambda i: i % 4 == 1), ("polygons", "hide", lambda i: i % 5 == 2),
                             ("vertices", "hide", lambda i: i == 7), ("edges", "hide", lambda i: i == 4)):
        items = getattr(obj.data, coll)
        pattern[coll, attr] = np.array([rule(i) for i in range(len(items))])
        items.foreach_set(attr, pattern[coll, attr])
    obj.data.polygons.active = 5
    bpy.context.scene.tool_settings.mesh_select_mode = (False, True, False)
    png = write_png(tmp_path / "a.png")
    assert bpy.ops.trellis.texture_selected(filepath=png, texture_size=32) == {"FINISHED"}
    me = bpy.data.objects["NoUV"].data
    for (coll, attr), expected in pattern.items():
        got = np.zeros(len(expected), bool)
        getattr(me, coll).foreach_get(attr, got)
        assert np.array_equal(got, expected), (coll, attr)
    assert me.polygons.active == 5
    assert tuple(bpy.context.scene.tool_settings.mesh_select_mode) == (False, True, False)
    spot = bpy.data.objects[spot.name]
    after = np.empty(len(spot.data.loops) * 2, np.float32)
    spot.data.uv_layers[0].data.foreach_get("uv", after)
    assert np.array_equal(spot_uv, after) and len(spot.data.uv_layers) == 1
    assert len(spot.data.materials) == 1              # spot got its own new material
    me = bpy.data.objects["NoUV"].data
    assert [l.name for l in me.uv_layers] == ["TRELLIS_UV"]
    uv = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers["TRELLIS_UV"].data.foreach_get("uv", uv)
    assert uv.min() >= 0.0 and uv.max() <= 1.0 and np.ptp(uv) > 0.1
    uv = uv.reshape(-1, 2)
    for poly in me.polygons:  # hidden faces were unwrapped too: no face collapses to a point
        corners = uv[poly.loop_start:poly.loop_start + poly.loop_total]
        assert np.ptp(corners, axis=0).min() > 0, poly.index
    mat = me.materials[0]
    uvnode = [n for n in mat.node_tree.nodes if n.bl_idname == "ShaderNodeUVMap"][0]
    assert uvnode.uv_map == "TRELLIS_UV"


def test_upscale_keeps_transform_and_undo(addon, fake, tmp_path):
    png = write_png(tmp_path / "c.png")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="1024_cascade", seed=9) == {"FINISHED"}
    obj = bpy.context.active_object
    obj.location = (1, 2, 3)
    obj.rotation_euler = (0.1, 0.2, 0.3)
    obj.scale = (2, 2, 2)
    bpy.context.view_layer.update()
    matrix = [list(r) for r in obj.matrix_world]
    old_mesh = obj.data.name
    src = obj["trellis2_job"]
    assert bpy.ops.trellis.upscale.poll()
    bpy.ops.ed.undo_push(message="before upscale")
    assert bpy.ops.trellis.upscale() == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    obj = bpy.data.objects[obj.name]
    assert obj.data.name != old_mesh
    bpy.context.view_layer.update()
    assert [list(r) for r in obj.matrix_world] == matrix
    assert obj["trellis2_upscaled_from"] == src and obj["trellis2_job"] != src
    assert len([o for o in bpy.data.objects if o.type == "MESH"]) == 1
    name = obj.name
    bpy.ops.ed.undo_push(message="after")  # scripted calls push no undo step by themselves
    bpy.ops.ed.undo()
    assert bpy.data.objects[name].data.name == old_mesh


# --- bad input: a message, nothing in the file changed ------------------------------------------------


def _expect_cancel(op, **kwargs) -> str:
    before = _scene_fingerprint()
    assert op(**kwargs) == {"CANCELLED"}
    assert _scene_fingerprint() == before
    err = bpy.context.window_manager.trellis2.error
    assert err
    return err


def test_bad_inputs(addon, fake, tmp_path):
    st = bpy.context.window_manager.trellis2
    # no image
    assert "No input image" in _expect_cancel(bpy.ops.trellis.generate)
    # unreadable image
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    assert "Not a supported image" in _expect_cancel(bpy.ops.trellis.generate, filepath=str(bad))
    assert "not found" in _expect_cancel(bpy.ops.trellis.generate, filepath=str(tmp_path / "missing.png"))
    png = write_png(tmp_path / "ok.png")
    # a non-mesh selected
    empty = bpy.data.objects.new("Empty", None)
    bpy.context.collection.objects.link(empty)
    empty.select_set(True)
    assert "not a mesh" in _expect_cancel(bpy.ops.trellis.texture_selected, filepath=png)
    empty.select_set(False)
    # a mesh with 0 faces
    me = bpy.data.meshes.new("Points")
    me.vertices.add(3)
    pts = bpy.data.objects.new("Points", me)
    bpy.context.collection.objects.link(pts)
    pts.select_set(True)
    assert "no faces" in _expect_cancel(bpy.ops.trellis.texture_selected, filepath=png)
    st.error = ""


def test_backend_missing_and_crashed(addon, clean_scene, tmp_path):
    png = write_png(tmp_path / "ok.png")
    use_fake_backend(addon, tmp_path / "cache", python=str(tmp_path / "no" / "python"))
    try:
        assert "not found" in _expect_cancel(bpy.ops.trellis.generate, filepath=png)
        # an interpreter that dies at once: reported as a crash, scene unchanged
        use_fake_backend(addon, tmp_path / "cache", python="/bin/false")
        err = _expect_cancel(bpy.ops.trellis.generate, filepath=png)
        assert "stopped" in err.lower() or "code" in err.lower(), err
        assert bpy.context.window_manager.trellis2.backend_state == "CRASHED"
        assert bpy.context.window_manager.trellis2.log_path
    finally:
        stop_backend(addon)


def test_ui_flow_timer_applies_result(addon, fake, tmp_path):
    """The non-blocking UI path: submit, then the job timer polls and applies via trellis.apply_result."""
    ops = addon_module(addon, "operators")
    png = write_png(tmp_path / "ui.png")
    rec = fake.submit("generate", {"image": png, "seed": 2, "pipeline_type": "512"},
                      {"name": "ui", "image_hash": "x", "material_mode": "VERTEX"})
    st = bpy.context.window_manager.trellis2
    import time

    seen_running = False
    end = time.monotonic() + 30
    while not rec.applied and time.monotonic() < end:
        ops._job_timer()
        seen_running |= st.running and st.progress >= 0.0
        time.sleep(0.02)
    assert rec.applied and rec.status == "done"
    assert seen_running
    assert not st.running
    objs = [o for o in bpy.data.objects if o.type == "MESH"]
    assert len(objs) == 1 and objs[0]["trellis2_job"] == rec.job_id
    assert any(h.name == rec.job_id for h in st.history)


def test_cancel_running_job(addon, fake, tmp_path):
    png = write_png(tmp_path / "c.png")
    rec = fake.submit("generate", {"image": png, "seed": 1, "pipeline_type": "512", "steps": 50, "step_s": 0.05},
                      {"name": "c"})
    import time

    end = time.monotonic() + 20
    while rec.status != "running" and time.monotonic() < end:
        fake.poll()
        time.sleep(0.02)
    assert bpy.ops.trellis.cancel.poll()
    assert bpy.ops.trellis.cancel() == {"FINISHED"}
    fake.wait(rec, timeout=20)
    assert rec.status == "cancelled"
    assert not [o for o in bpy.data.objects if o.type == "MESH"]


def test_import_result_npz_and_history_reimport(addon, fake, tmp_path):
    png = write_png(tmp_path / "h.png")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=4) == {"FINISHED"}
    job = bpy.context.active_object["trellis2_job"]
    result = tmp_path / "cache" / "jobs" / job / "result" / "result.npz"
    assert result.is_file()
    assert bpy.ops.trellis.import_ovoxel(filepath=str(result)) == {"FINISHED"}
    assert len([o for o in bpy.data.objects if o.type == "MESH"]) == 2
    st = bpy.context.window_manager.trellis2
    st.history_index = [h.name for h in st.history].index(job)
    assert bpy.ops.trellis.history_reimport() == {"FINISHED"}
    assert len([o for o in bpy.data.objects if o.type == "MESH"]) == 3
    assert bpy.ops.trellis.history_open_folder() == {"FINISHED"}


def test_import_ovoxel_file_with_codec(addon, clean_scene, tmp_path):
    from backend import ovoxel
    from helpers import sphere_arrays

    v, f = sphere_arrays(24, 48)
    ov = ovoxel.encode_shape(v, f, 32)
    path = tmp_path / "sphere.npz"
    ovoxel.save(str(path), ov)
    assert bpy.ops.trellis.import_ovoxel(filepath=str(path)) == {"FINISHED"}
    obj = bpy.context.active_object
    dv, df = ovoxel.decode_ovoxel(ovoxel.load(str(path)))
    assert len(obj.data.vertices) == len(dv) and len(obj.data.polygons) == len(df)   # closed: nothing to fill
    # knock out voxels: the decoded surface gets holes; the official hole filling closes the short ones
    # (at R = 160 one missing voxel leaves a hole of ~4 × 1/160 < 0.03)
    fine = ovoxel.encode_shape(v, f, 160)
    keep = np.ones(len(fine.coords), bool)
    keep[::997] = False
    holed = ovoxel.OVoxel(resolution=fine.resolution, aabb=fine.aabb, coords=fine.coords[keep],
                          dual_vertices=fine.dual_vertices[keep], intersected=fine.intersected[keep])
    ovoxel.save(str(tmp_path / "holed.npz"), holed)
    hv, hf = ovoxel.decode_ovoxel(holed)
    counts = {}
    for fill in (False, True):
        assert bpy.ops.trellis.import_ovoxel(filepath=str(tmp_path / "holed.npz"), fill_holes=fill) == {"FINISHED"}
        counts[fill] = len(bpy.context.active_object.data.polygons)
    assert counts[False] == len(hf) < counts[True]


def test_generate_from_blender_image_with_random_seed(addon, fake, tmp_path):
    """A Blender-internal (generated, unsaved) image is written to the cache as PNG and used."""
    img = bpy.data.images.new("painted", 16, 8, alpha=True)
    px = np.zeros((8, 16, 4), np.float32)
    px[..., 0] = 1.0
    px[..., 3] = 1.0
    img.pixels.foreach_set(px.ravel())
    settings = bpy.context.scene.trellis2
    settings.image = img
    settings.randomize_seed = True
    settings.seed = 1
    assert bpy.ops.trellis.generate() == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    obj = bpy.context.active_object
    assert obj["trellis2_seed"] == settings.seed
    written = tmp_path / "cache" / "inputs" / "painted.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    job_image = tmp_path / "cache" / "jobs" / obj["trellis2_job"] / "input" / "image.png"
    assert job_image.is_file()


def test_disabling_the_addon_stops_the_backend(addon, fake):
    import addon_utils

    client = fake.ensure_started()
    proc = client.proc
    assert proc is not None and proc.poll() is None
    addon_utils.disable(addon, default_set=True)
    try:
        assert proc.wait(timeout=10) is not None        # stopped by unregister, no orphan left
    finally:
        addon_utils.enable(addon, default_set=True)
    assert addon_utils.check(addon)[1]
