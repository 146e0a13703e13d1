"""Background removal from the panel, in real Blender with the real backend on tiny checkpoints: the
Background setting and the preferences' BiRefNet folder reach the backend (a cluttered photo is refused
without the model and cut out with it), the cut-out preview, and the panel's setup hint."""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np
import pytest
from PIL import Image

from bl_test_e2e import _tiny_models, real_backend  # noqa: F401  (fixture)
from helpers import addon_module, draw_panel, our_class, prefs


def _photo(path: Path, size: int = 160) -> str:
    """A photo-like RGB image: an object on a noisy, striped, cluttered background (no alpha)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:size, :size]
    bg = np.stack([128 + 90 * np.sin(xx / 5.0), 128 + 90 * np.sin((xx + yy) / 9.0), 128 + 90 * np.cos(yy / 4.0)], -1)
    img = bg + rng.normal(0, 25, bg.shape)
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.3) ** 2
    img[disc] = (210, 60, 40)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(path)
    return str(path)


def test_panel_hints_when_no_background_model(addon, clean_scene):
    panel = our_class(addon, "TRELLIS_PT_main")
    p = prefs(addon)
    old = p.rembg_dir
    try:
        p.rembg_dir = ""
        layout = draw_panel(panel)
        assert any("No background-removal model" in t for t in layout.texts())
        assert "trellis.preview_cutout" in layout.operators() and "preferences.addon_show" in layout.operators()
        clean_scene.trellis2.background = "KEEP"
        assert not any("No background-removal model" in t for t in draw_panel(panel).texts())
        clean_scene.trellis2.background = "AUTO"
        p.rembg_dir = "/models/BiRefNet"
        assert not any("No background-removal model" in t for t in draw_panel(panel).texts())
    finally:
        p.rembg_dir = old


def test_background_model_from_preferences_reaches_the_backend(addon, real_backend, tmp_path):  # noqa: F811
    runtime = addon_module(addon, "runtime")
    p = prefs(addon)
    scene = bpy.context.scene
    st = scene.trellis2
    photo = _photo(tmp_path / "photo.png")
    st.ss_steps = st.shape_steps = st.tex_steps = 2
    st.material_mode = "VERTEX"
    st.background = "AUTO"
    p.rembg_dir = ""
    try:
        # no model configured: the photo cannot be cut out; the error names the preference
        assert bpy.ops.trellis.preview_cutout(filepath=photo) == {"CANCELLED"}
        err = bpy.context.window_manager.trellis2.error + bpy.context.window_manager.trellis2.error_hint
        assert "Background removal" in err or "background-removal model" in err, err
        # with the preferences' BiRefNet folder: the preview shows the model's cut-out
        p.rembg_dir = str(real_backend / "birefnet")
        assert bpy.ops.trellis.preview_cutout(filepath=photo) == {"FINISHED"}, bpy.context.window_manager.trellis2.error
        img = st.cutout_image
        assert img is not None and img.size[0] == img.size[1] > 8
        assert "background-removal model" in st.cutout_info
        rec = [r for r in runtime.manager.jobs.values() if r.kind == "cutout"][-1]
        assert rec.request["background"] == "auto" and rec.request["rembg_dir"] == p.rembg_dir
        assert tuple(img.size) == rec.result["arrays"]["preprocessed"].shape[1::-1]
        # generate from the photo: the object is made from the model's cut-out, shown in the panel
        assert bpy.ops.trellis.generate(filepath=photo, pipeline="512", seed=2) == {"FINISHED"}
        gen = [r for r in runtime.manager.jobs.values() if r.kind == "generate"][-1]
        assert gen.result["meta"]["background"]["background"] == "model"
        assert len([o for o in bpy.data.objects if o.type == "MESH"]) == 1
        assert np.array_equal(gen.result["arrays"]["preprocessed"], rec.result["arrays"]["preprocessed"])
        # Keep: no cut-out at all
        st.background = "KEEP"
        assert bpy.ops.trellis.preview_cutout(filepath=photo) == {"FINISHED"}
        assert "not cut out" in st.cutout_info and st.cutout_image.size[0] >= 150
    finally:
        p.rembg_dir = ""
        st.background = "AUTO"
