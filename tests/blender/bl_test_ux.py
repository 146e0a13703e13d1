"""Issue 16 UX: setup status and folder validation, error boxes offering only useful actions, the
selected-object section, presets, history names and stale jobs, token-budget note, whole-job ETA."""

from __future__ import annotations

import json
import os
import sys
import time

import bpy
import pytest

from helpers import (addon_module, build_plain_mesh, draw_panel, our_class, prefs, stop_backend, use_fake_backend,
                     write_png)


def _model_folder(root):
    """A folder passing the add-on's TRELLIS.2-4B check (pipeline.json + ckpts/*.safetensors)."""
    (root / "ckpts").mkdir(parents=True)
    (root / "pipeline.json").write_text("{}")
    (root / "ckpts" / "a.safetensors").write_bytes(b"0" * 16)
    return root


@pytest.fixture
def saved_prefs(addon):
    p = prefs(addon)
    keep = {k: getattr(p, k) for k in ("backend_python", "model_dir", "dinov3_dir", "rembg_dir", "cache_dir",
                                       "low_vram")}
    yield p
    for k, v in keep.items():
        setattr(p, k, v)
    p.presets.clear()
    st = bpy.context.window_manager.trellis2
    st.error = st.error_hint = st.error_kind = st.error_job = st.result_note = ""
    st.running, st.backend_state, st.log_path = False, "STOPPED", ""


@pytest.fixture
def fake(addon, clean_scene, tmp_path, saved_prefs):
    manager = use_fake_backend(addon, tmp_path / "cache")
    yield manager
    stop_backend(addon)


def _main(addon):
    return our_class(addon, "TRELLIS_PT_main")


def test_panel_nothing_configured_then_ready(addon, clean_scene, saved_prefs, tmp_path):
    p = saved_prefs
    p.backend_python = p.model_dir = p.dinov3_dir = p.rembg_dir = ""
    layout = draw_panel(_main(addon))
    texts = layout.texts()
    assert "Setup incomplete:" in texts
    assert "Backend Python: not set" in texts
    assert any(t.startswith("TRELLIS.2-4B snapshot: not set") for t in texts), texts
    shows = [c for c in layout.calls if c["fn"] == "operator" and c["args"]["operator"] == "preferences.addon_show"]
    assert any(c["args"].get("text") == "Open Preferences" and c["set"]["module"] == addon for c in shows)

    # ready: Python found, a valid model folder: no setup section
    p.backend_python = sys.executable
    p.model_dir = str(_model_folder(tmp_path / "TRELLIS.2-4B"))
    layout = draw_panel(_main(addon))
    assert "Setup incomplete:" not in layout.texts()
    assert "trellis.generate" in layout.operators()


def test_model_folder_validated_when_set(addon, clean_scene, saved_prefs, tmp_path):
    p = saved_prefs
    real = _model_folder(tmp_path / "models" / "TRELLIS.2-4B")
    (tmp_path / "models" / "notes").mkdir()
    p.model_dir = str(tmp_path / "models")                # the folder holding the download
    assert p.model_dir == str(real)                        # corrected at once
    hf = tmp_path / "hub" / "models--microsoft--TRELLIS.2-4B" / "snapshots"
    snap = _model_folder(hf / "abc123")
    p.model_dir = str(tmp_path / "hub" / "models--microsoft--TRELLIS.2-4B")   # a Hugging Face cache repo
    assert p.model_dir == str(snap)

    # a set folder that is not a model: Generate refuses before starting anything, pointing at Preferences
    p.backend_python = sys.executable
    p.model_dir = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    assert p.model_dir == str(tmp_path / "empty")         # nothing to correct it to: kept, reported
    layout = draw_panel(_main(addon))
    assert "TRELLIS.2-4B snapshot: missing pipeline.json" in layout.texts()
    runtime = addon_module(addon, "runtime")
    stop_backend(addon)
    png = write_png(tmp_path / "x.png")
    assert bpy.ops.trellis.generate(filepath=png) == {"CANCELLED"}
    st = bpy.context.window_manager.trellis2
    assert "missing pipeline.json" in st.error and "Preferences" in st.error
    assert st.error_kind == "not_configured"
    assert runtime.manager is None                        # no backend was started
    ops = draw_panel(_main(addon)).operators()
    assert "preferences.addon_show" in ops and "trellis.backend" in ops   # backend row keeps Start
    err_ops = _error_ops(addon)
    assert "preferences.addon_show" in err_ops and ("trellis.backend", "RESTART") not in err_ops
    # starting the backend by hand meets the same check: a setup error, not a backend failure
    assert bpy.ops.trellis.backend(action="START") == {"CANCELLED"}
    assert "missing pipeline.json" in st.error and st.error_kind == "not_configured" and runtime.manager is None
    assert "model folders" in st.error_hint
    assert ("trellis.backend", "RESTART") not in _error_ops(addon)


def _error_ops(addon) -> list:
    """Operators drawn inside the error box (``trellis.backend`` with its action)."""
    layout = draw_panel(_main(addon))
    calls = layout.calls
    start = next(i for i, c in enumerate(calls) if c["fn"] == "label" and c["args"].get("icon") == "ERROR"
                 and c["args"].get("text") == bpy.context.window_manager.trellis2.error[:120])
    end = next(i for i in range(start, len(calls)) if calls[i]["fn"] == "operator"
               and calls[i]["args"]["operator"] == "trellis.clear_error")
    out = []
    for c in calls[start:end + 1]:
        if c["fn"] == "operator":
            op = c["args"]["operator"]
            out.append((op, c["set"]["action"]) if op == "trellis.backend" else op)
        elif c["fn"] in ("prop", "prop_enum"):
            out.append(("prop", c["args"]["property"]))
    return out


@pytest.mark.parametrize("kind, offers, never", [
    ("bad_input", ["trellis.clear_error"], [("trellis.backend", "RESTART"), "trellis.open_path"]),
    ("crashed", ["trellis.open_path", ("trellis.backend", "RESTART")], []),
    ("missing_weights", ["preferences.addon_show", "trellis.open_path"], [("trellis.backend", "RESTART")]),
    ("missing_dependency", ["preferences.addon_show", "trellis.check_backend"], [("trellis.backend", "RESTART")]),
    ("oom", [("prop", "low_vram"), ("prop_enum", None), "trellis.open_path"], [("trellis.backend", "RESTART")]),
    ("internal", ["trellis.open_path"], [("trellis.backend", "RESTART")]),
])
def test_error_box_offers_only_useful_actions(addon, clean_scene, saved_prefs, kind, offers, never):
    saved_prefs.backend_python = sys.executable
    clean_scene.trellis2.pipeline = "1536_cascade"
    st = bpy.context.window_manager.trellis2
    st.error, st.error_hint, st.error_kind, st.log_path = f"Something failed ({kind})", "hint", kind, "/tmp/x.log"
    st.backend_state = "CRASHED" if kind == "crashed" else "READY"
    ops = _error_ops(addon)
    for want in offers:
        if want == ("prop_enum", None):   # out of memory on 1536: one click to the 1024 cascade
            assert ("prop", "pipeline") in ops, ops
        else:
            assert want in ops, (kind, ops)
    for bad in never:
        assert bad not in ops, (kind, ops)
    assert ops[-1] == "trellis.clear_error"


def test_backend_failure_from_operator_offers_restart(addon, clean_scene, saved_prefs, tmp_path):
    """A job whose backend dies at once: the error box offers Restart; bad input never does."""
    png = write_png(tmp_path / "ok.png")
    use_fake_backend(addon, tmp_path / "cache", python="/bin/false")
    try:
        assert bpy.ops.trellis.generate(filepath=png) == {"CANCELLED"}
        assert ("trellis.backend", "RESTART") in _error_ops(addon)
        assert bpy.ops.trellis.generate(filepath=str(tmp_path / "missing.png")) == {"CANCELLED"}
        st = bpy.context.window_manager.trellis2
        assert st.error_kind == "bad_input" and "not found" in st.error
        assert ("trellis.backend", "RESTART") not in _error_ops(addon)
    finally:
        stop_backend(addon)


def test_selected_trellis_object_section_and_actions(addon, fake, tmp_path):
    panel = our_class(addon, "TRELLIS_PT_object")
    png = write_png(tmp_path / "teapot.png")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="1024_cascade", seed=5) == {"FINISHED"}
    obj = bpy.context.active_object
    obj["trellis2_resolution"] = 1024
    layout = draw_panel(panel)
    texts = layout.texts()
    assert f"{obj.name}: seed 5 · 1024_cascade" in texts, texts
    assert "Resolution: 1024³ voxels" in texts and f"Job: {obj['trellis2_job']}" in texts
    ops = layout.operators()
    for op in ("trellis.upscale", "trellis.object_retexture", "trellis.object_rerun", "trellis.object_use_settings"):
        assert op in ops
    assert bpy.ops.trellis.object_retexture.poll() and bpy.ops.trellis.object_rerun.poll()

    # Re-texture: a texture job on the active object (selected for it) from the job's stored image
    obj.select_set(False)
    assert bpy.ops.trellis.object_retexture() == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    tex = [r for r in fake.jobs.values() if r.kind == "texture"]
    assert len(tex) == 1 and tex[0].status == "done" and obj["trellis2_job"] in tex[0].request["image"]
    assert obj.get("trellis2_texture_job") == tex[0].job_id and obj.select_get()
    # Re-run: the job's stored image, same pipeline, a new seed, a new object
    first = obj["trellis2_job"]
    assert bpy.ops.trellis.object_rerun() == {"FINISHED"}
    new = bpy.context.active_object
    assert new != obj and new["trellis2_job"] != first and new["trellis2_pipeline"] == "1024_cascade"
    rec = fake.jobs[new["trellis2_job"]]
    assert rec.request["image"].endswith("image.png") and first in rec.request["image"]
    assert bpy.ops.trellis.object_rerun(new_seed=False) == {"FINISHED"}
    assert bpy.context.active_object["trellis2_seed"] == new["trellis2_seed"]
    # Use Its Seed and Pipeline
    settings = bpy.context.scene.trellis2
    settings.pipeline, settings.seed = "512", 1
    bpy.context.view_layer.objects.active = obj
    assert bpy.ops.trellis.object_use_settings() == {"FINISHED"}
    assert settings.seed == 5 and settings.pipeline == "1024_cascade"


def test_selected_mesh_without_uvs(addon, clean_scene, saved_prefs):
    saved_prefs.backend_python = sys.executable
    obj = build_plain_mesh("Plain")
    layout = draw_panel(our_class(addon, "TRELLIS_PT_object"))
    texts = layout.texts()
    assert "Plain: not made by TRELLIS" in texts
    obj["trellis2_texture_job"] = "texture-x"          # textured by TRELLIS: Re-texture, but no Re-run
    ops = draw_panel(our_class(addon, "TRELLIS_PT_object")).operators()
    assert "trellis.object_retexture" in ops and "trellis.object_rerun" not in ops
    assert not bpy.ops.trellis.object_rerun.poll()
    del obj["trellis2_texture_job"]
    assert "No UV map: Texture Selected will create 'TRELLIS_UV'" in texts
    ops = layout.operators()
    assert "trellis.texture_selected" in ops and "trellis.object_rerun" not in ops and "trellis.upscale" not in ops
    obj.data.uv_layers.new(name="UVMap")
    assert not any("No UV map" in t for t in draw_panel(our_class(addon, "TRELLIS_PT_object")).texts())
    bpy.context.view_layer.objects.active = None
    assert draw_panel(our_class(addon, "TRELLIS_PT_object")).calls == []   # poll: no mesh, no section


def test_presets_round_trip(addon, clean_scene, saved_prefs):
    core = addon_module(addon, "core")
    ops_object = addon_module(addon, "ops_object")
    settings = clean_scene.trellis2
    assert bpy.ops.trellis.preset_apply(name="Draft") == {"FINISHED"}
    assert core.preset_values(settings) == core.BUILTIN_PRESETS["Draft"]
    assert ops_object.current_preset(bpy.context) == "Draft"
    assert bpy.ops.trellis.preset_apply(name="Best") == {"FINISHED"}
    assert settings.pipeline == "1536_cascade" and ops_object.current_preset(bpy.context) == "Best"

    settings.pipeline, settings.shape_steps, settings.tex_guidance, settings.texture_size = "1024", 30, 2.5, "512"
    mine = core.preset_values(settings)
    assert ops_object.current_preset(bpy.context) == ""
    assert bpy.ops.trellis.preset_save(name="Mine") == {"FINISHED"}
    stored = saved_prefs.presets
    assert [p.name for p in stored] == ["Mine"] and json.loads(stored[0].data)["shape_steps"] == 30
    with pytest.raises(RuntimeError, match="other than Draft"):              # built-in names are taken
        bpy.ops.trellis.preset_save(name="Draft")
    bpy.ops.trellis.preset_apply(name="Standard")
    assert settings.shape_steps == 12
    assert bpy.ops.trellis.preset_apply(name="Mine") == {"FINISHED"}
    now = core.preset_values(settings)
    assert all(core._same(now[k], v) for k, v in mine.items()), (now, mine)
    assert ops_object.current_preset(bpy.context) == "Mine"
    # the panel's menu button names the preset; the menu lists built-ins and the user's own
    layout = draw_panel(_main(addon))
    menus = [c for c in layout.calls if c["fn"] == "menu"]
    assert menus and menus[0]["args"]["menu"] == "TRELLIS_MT_presets" and menus[0]["args"]["text"] == "Mine"
    assert "trellis.preset_save" in layout.operators()
    menu = draw_panel(our_class(addon, "TRELLIS_MT_presets"))
    applied = [c["set"]["name"] for c in menu.calls if c["fn"] == "operator"
               and c["args"]["operator"] == "trellis.preset_apply"]
    assert applied == ["Draft", "Standard", "Best", "Mine"]
    # the preferences list them (rename / delete there)
    layout = draw_panel(type(saved_prefs), wrapped=saved_prefs)
    names = [c for c in layout.calls if c["fn"] == "prop" and c["args"]["property"] == "name"]
    assert len(names) == 1 and names[0]["args"]["data"] == stored[0]
    assert any(c["fn"] == "operator" and c["args"]["operator"] == "trellis.preset_remove"
               and c["set"]["name"] == "Mine" for c in layout.calls)
    # saving again under the same name replaces; remove deletes
    settings.shape_steps = 31
    assert bpy.ops.trellis.preset_save(name="Mine") == {"FINISHED"}
    assert len(stored) == 1 and json.loads(stored[0].data)["shape_steps"] == 31
    assert bpy.ops.trellis.preset_remove(name="Mine") == {"FINISHED"} and len(stored) == 0
    with pytest.raises(RuntimeError, match="No preset named 'Mine'"):
        bpy.ops.trellis.preset_apply(name="Mine")


def test_history_named_after_image_and_stale_job_failed_after_kill(addon, fake, tmp_path):
    session = addon_module(addon, "session")
    st = bpy.context.window_manager.trellis2
    png = write_png(tmp_path / "red_chair.png")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=2) == {"FINISHED"}
    done_job = bpy.context.active_object["trellis2_job"]
    rec = fake.submit("generate", {"image": png, "seed": 3, "pipeline_type": "512", "steps": 400, "step_s": 0.05},
                      {"name": "slow"})
    end = time.monotonic() + 20
    while rec.status != "running" and time.monotonic() < end:
        fake.poll()
        time.sleep(0.02)
    assert rec.status == "running"
    job_json = tmp_path / "cache" / "jobs" / rec.job_id / "job.json"
    assert json.loads(job_json.read_text())["status"] == "running"
    session.refresh_history()                        # live: left alone
    assert json.loads(job_json.read_text())["status"] == "running"
    fake.client.proc.kill()                          # the backend is killed mid-job
    fake.client.proc.wait(timeout=10)
    end = time.monotonic() + 10
    while fake.backend_state != "CRASHED" and time.monotonic() < end:
        fake.poll()
        time.sleep(0.02)
    stop_backend(addon)                              # as after a restart: no backend owns the job
    session.refresh_history()
    meta = json.loads(job_json.read_text())
    assert meta["status"] == "failed" and meta["error"]["kind"] == "interrupted"
    items = {h.name: h for h in st.history}
    assert items[rec.job_id].status == "failed" and "stopped" in items[rec.job_id].error
    assert items[done_job].status == "done" and items[done_job].title == "red_chair"
    st.history_index = list(items).index(rec.job_id)
    layout = draw_panel(our_class(addon, "TRELLIS_PT_history"))
    assert "red_chair" in layout.texts() and any("stopped before the job finished" in t for t in layout.texts())
    row = addon_module(addon, "ui_sections")
    from helpers import FakeSelf, RecordingLayout

    out = RecordingLayout()
    row.TRELLIS_UL_history.draw_item(FakeSelf(None, out), bpy.context, out, st, items[done_job], 0, st,
                                     "history_index", 0)
    assert "red_chair · 512 · seed 2" in out.texts()

    # the thumbnail is the job's stored input image (bpy's previews give no icons in background mode:
    # a stand-in collection records what is loaded and hands out an icon id)
    class _Preview:
        icon_id = 77

    class _Previews(dict):
        def load(self, name, path, kind):
            assert kind == "IMAGE" and os.path.isfile(path)
            self[name] = _Preview()

    old_previews = row._previews
    row._previews = _Previews()
    try:
        out = RecordingLayout()
        row.TRELLIS_UL_history.draw_item(FakeSelf(None, out), bpy.context, out, st, items[done_job], 0, st,
                                         "history_index", 0)
        assert list(row._previews) == [items[done_job].image_path]
        assert items[done_job].image_path.endswith(os.path.join(done_job, "input", "image.png"))
        assert [c["args"].get("icon_value") for c in out.calls if c["args"].get("text", "").startswith("red_chair")] == [77]
    finally:
        row._previews = old_previews


def test_token_budget_note_and_learned_job_eta(addon, fake, tmp_path):
    session = addon_module(addon, "session")
    st = bpy.context.window_manager.trellis2
    png = write_png(tmp_path / "tall.png")
    req = {"image": png, "seed": 1, "pipeline_type": "1536_cascade", "steps": 6, "step_s": 0.03}
    # first run: the backend's cascade step-down warning arrives while it runs
    rec = fake.submit("generate", dict(req), {"name": "tall", "material_mode": "VERTEX"})
    fake._handle({"type": "log", "level": "warning",
                  "text": "Due to the limited number of tokens (32768 allowed), the resolution is reduced to 1280."})
    fake.wait(rec, timeout=30)
    assert rec.status == "done" and len(rec.stage_times) == 3
    assert not rec.result.get("meta", {}).get("token_budget")
    session.apply_record(bpy.context, rec)
    assert "1536 → 1280" in st.result_note and "Max Tokens (32768)" in st.result_note
    assert bpy.context.active_object["trellis2_note"] == st.result_note
    assert any("1536 → 1280" in t for t in draw_panel(_main(addon)).texts())
    timings = json.loads((tmp_path / "cache" / "timings.json").read_text())
    assert len(timings) == 1 and list(timings.values())[0]["order"] == ["sparse_structure", "shape_slat", "decode"]

    # second run: one bar for the whole job, with the learned ETA, rising across stages
    rec2 = fake.submit("generate", dict(req), {"name": "tall", "material_mode": "VERTEX"})
    seen = []
    end = time.monotonic() + 30
    while not rec2.done and time.monotonic() < end:
        fake.poll()
        session.sync_state()
        if st.running and rec2.status == "running":
            seen.append((rec2.stage, st.progress, st.job_eta, st.stage))
        time.sleep(0.01)
    assert rec2.status == "done" and seen
    stages = [s[0] for s in seen]
    assert "decode" in stages and "sparse_structure" in stages
    assert all(s[2] >= 0 and s[3].endswith(" left") for s in seen), seen[:3]
    assert any(s[3].startswith("3/3 ") for s in seen)
    first_decode = next(s[1] for s in seen if s[0] == "decode")
    last_ss = [s[1] for s in seen if s[0] == "sparse_structure"][-1]
    assert first_decode > last_ss and first_decode > 0.5     # overall, not restarted per stage
    # drawn as one bar
    st.running, st.progress, st.stage = True, seen[-1][1], seen[-1][3]
    bars = [c for c in draw_panel(_main(addon)).calls if c["fn"] == "progress"]
    assert len(bars) == 1 and bars[0]["args"]["text"].endswith(" left")
    st.running = False
