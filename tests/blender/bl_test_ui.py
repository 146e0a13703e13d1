"""Panel, menu, UIList and preferences draw code against an RNA-validating recording layout."""

from __future__ import annotations

import sys

import bpy
import pytest

from helpers import (FakeSelf, RecordingLayout, RNACallError, addon_module, draw_panel, our_class, prefs)


def test_recording_layout_catches_mistakes(addon):
    layout = RecordingLayout()
    scene = bpy.context.scene
    with pytest.raises(RNACallError):
        layout.prop(scene, "frame_start", txt="x")            # wrong keyword
    with pytest.raises(RNACallError):
        layout.prop(scene, "no_such_property")                 # unknown property
    with pytest.raises(RNACallError):
        layout.operator("trellis.no_such_operator")            # unknown operator
    with pytest.raises(RNACallError):
        layout.label(text="x", icon="NOT_AN_ICON")             # bad icon
    with pytest.raises(RNACallError):
        layout.no_such_method()
    with pytest.raises(RNACallError):
        layout.enabled_typo = False
    with pytest.raises(RNACallError):
        op = layout.operator("trellis.backend")
        op.action = "EXPLODE"                                   # bad enum on operator property
    layout.enabled = False
    layout.label(text="ok", icon="INFO")


def _state(addon):
    return bpy.context.window_manager.trellis2


def test_main_panel_draws_in_every_state(addon, clean_scene):
    panel = our_class(addon, "TRELLIS_PT_main")
    st = _state(addon)
    p = prefs(addon)
    old_python = p.backend_python
    try:
        p.backend_python = ""
        layout = draw_panel(panel)
        ops = layout.operators()
        assert "trellis.generate" in ops and "trellis.texture_selected" in ops
        assert any("Preferences" in t for t in layout.texts())
        assert "Pick an input image first" in layout.texts()
        nested = [c for c in layout.calls if c["fn"] == "panel"]
        assert len(nested) == 5, "views, blockout, sampling, output and texture-selected sub-panels (layout.panel)"

        # with an image, a running job, an error
        img = bpy.data.images.new("in", 8, 8)
        clean_scene.trellis2.image = img
        st.running, st.stage, st.progress = True, "Shape HR 3/12 · 0:41", 0.25
        st.error, st.error_hint, st.log_path = "Backend stopped (code 1)", "open the log", "/tmp/x.log"
        st.backend_state = "CRASHED"
        p.backend_python = "/nonexistent/python"
        layout = draw_panel(panel)
        fns = [c["fn"] for c in layout.calls]
        assert "progress" in fns and "template_ID" in fns and "template_icon" in fns
        ops = layout.operators()
        assert "trellis.cancel" in ops and "trellis.generate" not in ops
        assert "trellis.open_path" in ops and "trellis.clear_error" in ops
        st.backend_state = "READY"
        draw_panel(panel)
    finally:
        st.running, st.error, st.error_hint, st.log_path, st.backend_state = False, "", "", "", "STOPPED"
        p.backend_python = old_python


def test_history_panel_and_list(addon, clean_scene, tmp_path):
    st = _state(addon)
    st.history.clear()
    item = st.history.add()
    item.name, item.kind, item.pipeline, item.seed, item.duration = "generate-1", "generate", "512", 3, 12.5
    item.folder = str(tmp_path)
    st.history_index = 0
    try:
        layout = draw_panel(our_class(addon, "TRELLIS_PT_history"))
        assert any(c["fn"] == "template_list" for c in layout.calls)
        assert "trellis.history_reimport" in layout.operators()
        ul = our_class(addon, "TRELLIS_UL_history")
        row = RecordingLayout()
        ul.draw_item(FakeSelf(None, row), bpy.context, row, st, item, 0, st, "history_index", 0)
        assert any("seed 3" in t for t in row.texts())
    finally:
        st.history.clear()


def test_menus_draw(addon, clean_scene):
    ui = addon_module(addon, "ui")
    layout = draw_panel(our_class(addon, "TRELLIS_MT_object"))
    assert layout.operators() == ["trellis.upscale", "trellis.texture_selected"]
    fake = FakeSelf()
    ui.draw_object_menu(fake, bpy.context)
    assert [c["fn"] for c in fake.layout.calls] == ["separator", "menu"]
    fake = FakeSelf()
    ui.draw_import_menu(fake, bpy.context)
    assert fake.layout.operators() == ["trellis.import_ovoxel"]
    # our entries really are in Blender's menus
    assert ui.draw_object_menu in bpy.types.VIEW3D_MT_object._dyn_ui_initialize()
    assert ui.draw_import_menu in bpy.types.TOPBAR_MT_file_import._dyn_ui_initialize()


def test_preferences_draw(addon, tmp_path):
    p = prefs(addon)
    runtime = addon_module(addon, "runtime")
    tasks = addon_module(addon, "tasks")
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "pipeline.json").write_text("{}")
    (tmp_path / "ckpts" / "a.safetensors").write_bytes(b"0" * 16)
    old = p.model_dir
    p.model_dir = str(tmp_path)
    try:
        runtime.selftest_lines = ["python: 3.11", "torch: 2.13"]
        task = tasks.ProcessTask("Check backend", [["true"]], tmp_path / "log.txt").start()
        task.wait(10)
        runtime.selftest_task = runtime.env_task = runtime.download_task = task
        layout = draw_panel(type(p), wrapped=p)
        texts = layout.texts()
        assert any("TRELLIS.2-4B snapshot: 1 weight files" in t for t in texts), texts
        assert any("DINOv3 image encoder: not set" in t for t in texts)
        assert "python: 3.11" in texts
        assert "trellis.check_backend" in layout.operators() and "trellis.create_backend_env" in layout.operators()
        assert "trellis.download_models" in layout.operators()
        runtime.selftest_data = {"ok": False}
        running = tasks.ProcessTask("Create backend environment", [[sys.executable, "-c", "import time; time.sleep(20)"]],
                                    tmp_path / "log2.txt").start()
        runtime.env_task = running
        layout = draw_panel(type(p), wrapped=p)
        assert "progress" in [c["fn"] for c in layout.calls]
        assert "Backend check: problems found" in layout.texts()
        running.cancel()
    finally:
        p.model_dir = old
        runtime.selftest_lines = []
        runtime.selftest_task = runtime.env_task = runtime.download_task = runtime.selftest_data = None


def test_poll_messages(addon, clean_scene):
    """Disabled buttons explain themselves (poll_message_set) and the scripted call fails cleanly."""
    p = prefs(addon)
    old = p.backend_python
    p.backend_python = ""
    try:
        assert not bpy.ops.trellis.generate.poll()
        with pytest.raises(RuntimeError, match="backend Python"):
            bpy.ops.trellis.generate(filepath="/nonexistent.png")
        p.backend_python = "/bin/true"
        assert not bpy.ops.trellis.texture_selected.poll()       # nothing selected
        with pytest.raises(RuntimeError, match="Select one or more mesh objects"):
            bpy.ops.trellis.texture_selected()
        assert not bpy.ops.trellis.upscale.poll()
        assert not bpy.ops.trellis.cancel.poll()
    finally:
        p.backend_python = old
