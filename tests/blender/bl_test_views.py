"""Multi-view generation from the panel's Extra Views list and blockout-guided generation from the active
mesh, in real Blender with the real backend on tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np

from bl_test_e2e import _object_png, real_backend  # noqa: F401  (fixture)
from helpers import addon_module, draw_panel, our_class


def _world_bbox(obj) -> tuple[np.ndarray, np.ndarray]:
    v = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", v)
    m = np.array(obj.matrix_world)
    w = v.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
    return w.min(0), w.max(0)


def _results(runtime):
    return [r for r in runtime.manager.jobs.values() if r.kind == "generate"]


def test_extra_views_list_and_multiview_generation(addon, real_backend, tmp_path):  # noqa: F811
    runtime = addon_module(addon, "runtime")
    st = bpy.context.scene.trellis2
    st.ss_steps = st.shape_steps = st.tex_steps = 2
    st.material_mode = "VERTEX"
    front = _object_png(tmp_path / "front.png")
    side = _object_png(tmp_path / "side.png", size=48)
    st.views.clear()
    for p in (side, front):
        st.views.add().image = bpy.data.images.load(p)
    st.views_index = 1
    assert bpy.ops.trellis.view_edit(action="UP") == {"FINISHED"}
    assert [Path(v.image.filepath).name for v in st.views] == ["front.png", "side.png"]
    assert bpy.ops.trellis.view_edit(action="REMOVE") == {"FINISHED"} and len(st.views) == 1
    layout = draw_panel(our_class(addon, "TRELLIS_PT_main"))
    assert any("Extra Views (1)" in t for t in layout.texts())
    assert "trellis.view_add" in layout.operators()
    st.multiview = "MULTIDIFFUSION"
    assert bpy.ops.trellis.generate(filepath=front, pipeline="512", seed=3) == {"FINISHED"}, \
        bpy.context.window_manager.trellis2.error
    rec = _results(runtime)[-1]
    assert rec.request["multiview"] == "multidiffusion" and len(rec.request["images"]) == 2
    assert rec.result["meta"]["views"] == 2
    assert (Path(rec.result["folder"]) / "input" / "view_1.png").is_file()
    # an upscale of the multi-view object reuses both views' conditioning
    assert bpy.ops.trellis.upscale() == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    st.views.clear()


def test_blockout_from_the_active_mesh(addon, real_backend, tmp_path):  # noqa: F811
    runtime = addon_module(addon, "runtime")
    st = bpy.context.scene.trellis2
    st.ss_steps = st.shape_steps = st.tex_steps = 2
    st.material_mode = "VERTEX"
    st.views.clear()
    bpy.ops.mesh.primitive_cube_add(location=(3.0, -1.0, 2.0))
    cube = bpy.context.active_object
    cube.scale = (1.5, 0.6, 0.4)
    bpy.context.view_layer.update()
    lo_b, hi_b = _world_bbox(cube)
    st.use_blockout, st.blockout_strength, st.blockout_placement = True, 1.0, "REPLACE"
    try:
        png = _object_png(tmp_path / "img.png")
        assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=2) == {"FINISHED"}, \
            bpy.context.window_manager.trellis2.error
        rec = _results(runtime)[-1]
        guide = rec.result["meta"]["guide"]
        assert np.allclose(guide["center"], (lo_b + hi_b) / 2, atol=1e-4) and guide["strength"] == 1.0
        obj = bpy.data.objects[[o.name for o in bpy.data.objects if o.get("trellis2_job") == rec.job_id][0]]
        lo, hi = _world_bbox(obj)
        slack = 2 * 4 / guide["scale"] / 16      # a latent voxel of the tiny SS grid, in world units
        assert (lo >= lo_b - slack).all() and (hi <= hi_b + slack).all(), (lo, hi, lo_b, hi_b)
        assert cube.name in bpy.data.objects and cube.hide_get()          # replaced: hidden, not deleted
        # Beside: the blockout stays visible, the result sits next to it
        cube.hide_set(False)
        bpy.context.view_layer.objects.active = cube
        st.blockout_placement = "BESIDE"
        assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=2) == {"FINISHED"}
        rec2 = _results(runtime)[-1]
        obj2 = [o for o in bpy.data.objects if o.get("trellis2_job") == rec2.job_id][0]
        lo2, _ = _world_bbox(obj2)
        assert not cube.hide_get() and lo2[0] > hi_b[0] - slack
        # no mesh active: a clear error, nothing submitted
        bpy.context.view_layer.objects.active = None
        n = len(runtime.manager.jobs)
        assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=2) == {"CANCELLED"}
        assert "active" in bpy.context.window_manager.trellis2.error and len(runtime.manager.jobs) == n
    finally:
        st.use_blockout = False
