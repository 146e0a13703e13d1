"""Precision / max-tokens preferences: drawn, sent with every job request, and the NaN/Inf
("numerical") error's one-click fix (Use FP32 [and Retry]).

The fake runner cannot raise a numerical error, so the tests turn a job's first progress message into
the error frame the real backend sends (built by the backend's own ``classify_error``).
"""

from __future__ import annotations

import pytest

import bpy

from helpers import (addon_module, build_plain_mesh, draw_panel, our_class, prefs, stop_backend,
                     use_fake_backend, write_png)

NAN_MESSAGE = "The shape slat model produced NaN/Inf values (computing in float16)."


@pytest.fixture
def saved_prefs(addon):
    p = prefs(addon)
    old = (p.precision, p.max_tokens)
    yield p
    p.precision, p.max_tokens = old


@pytest.fixture
def fake(addon, clean_scene, tmp_path, saved_prefs):
    manager = use_fake_backend(addon, tmp_path / "cache")
    yield manager
    stop_backend(addon)


def _requests(manager, kind):
    return [r.request for r in manager.jobs.values() if r.kind == kind]


def test_precision_and_max_tokens_preferences(addon, saved_prefs):
    p = saved_prefs
    rna = type(p).bl_rna.properties
    prec = rna["precision"]
    assert [i.identifier for i in prec.enum_items] == ["AUTO", "BF16", "FP16", "FP32"]
    assert prec.default == "AUTO"
    assert all(i.description for i in prec.enum_items)
    assert "2×" in prec.enum_items["FP32"].description
    tok = rna["max_tokens"]
    assert (tok.default, tok.hard_min, tok.hard_max) == (49152, 1024, 262144)
    assert "49152" in tok.description and "GB" in tok.description
    p.max_tokens = 10
    assert p.max_tokens == 1024                       # clamped to the backend's minimum
    layout = draw_panel(type(p), wrapped=p)          # RNA-checked layout
    drawn = [c["args"]["property"] for c in layout.calls if c["fn"] == "prop"]
    i = drawn.index("low_vram")
    assert drawn[i + 1:i + 3] == ["precision", "max_tokens"]


def test_every_job_request_carries_precision_and_max_tokens(addon, fake, tmp_path, saved_prefs):
    ops = addon_module(addon, "operators")
    p = saved_prefs
    p.precision, p.max_tokens = "AUTO", 49152
    assert ops._common_request(bpy.context)["precision"] == "auto"
    png = write_png(tmp_path / "a.png")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=3) == {"FINISHED"}
    req = _requests(fake, "generate")[-1]
    assert (req["precision"], req["max_tokens"]) == ("auto", 49152)   # always sent, also at the default

    p.precision, p.max_tokens = "FP16", 32768
    assert bpy.ops.trellis.upscale() == {"FINISHED"}, bpy.context.window_manager.trellis2.error
    req = _requests(fake, "upscale")[-1]
    assert (req["precision"], req["max_tokens"]) == ("fp16", 32768)

    p.precision, p.max_tokens = "BF16", 24576
    obj = build_plain_mesh("Tex")
    obj.data.uv_layers.new(name="UVMap")
    assert bpy.ops.trellis.texture_selected(filepath=png, texture_size=16) == {"FINISHED"}
    req = _requests(fake, "texture")[-1]
    assert (req["precision"], req["max_tokens"]) == ("bf16", 24576)

    p.precision, p.max_tokens = "FP32", 16384
    st = bpy.context.window_manager.trellis2
    ops.refresh_history()
    st.history_index = [h.kind for h in st.history].index("generate")
    before = len(_requests(fake, "generate"))
    assert bpy.ops.trellis.history_rerun() == {"FINISHED"}
    reqs = _requests(fake, "generate")
    assert len(reqs) == before + 1
    assert (reqs[-1]["precision"], reqs[-1]["max_tokens"]) == ("fp32", 16384)


def _numerical_error_for_next_job(manager, monkeypatch, exc=None):
    """Make the next job fail as the real backend does on NaN/Inf (its later messages are dropped)."""
    from backend import errors
    from backend.server import classify_error

    kind, message, advice = classify_error(exc or errors.NumericalError(NAN_MESSAGE, stage="shape_slat"))
    real = manager._handle
    failed = set()

    def handle(msg):
        job = msg.get("job")
        if job in failed:
            return
        if msg.get("type") == "progress" and not failed:
            failed.add(job)
            msg = {"type": "error", "job": job, "kind": kind, "message": message, "advice": advice}
        real(msg)

    monkeypatch.setattr(manager, "_handle", handle)
    return advice


def test_numerical_error_offers_fp32_and_retries(addon, fake, tmp_path, saved_prefs, monkeypatch):
    p = saved_prefs
    p.precision = "FP16"
    st = bpy.context.window_manager.trellis2
    panel = our_class(addon, "TRELLIS_PT_main")
    png = write_png(tmp_path / "n.png")
    advice = _numerical_error_for_next_job(fake, monkeypatch)
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=11) == {"CANCELLED"}
    assert st.error == NAN_MESSAGE and st.error_hint == advice and "fp32" in advice
    assert st.error_kind == "numerical"
    failed = fake.jobs[st.error_job]
    assert failed.status == "failed" and failed.request["precision"] == "fp16"
    assert not [o for o in bpy.data.objects if o.type == "MESH"]

    layout = draw_panel(panel)
    assert NAN_MESSAGE in layout.texts() and advice in layout.texts()
    fixes = [c for c in layout.calls if c["fn"] == "operator" and c["args"]["operator"] == "trellis.use_fp32"]
    assert [c["args"]["text"] for c in fixes] == ["Use FP32 and Retry", "Use FP32"]
    assert fixes[0].get("set") == {"retry": True}

    # the retry runs normally (only the failed job's late frames are still dropped)
    assert bpy.ops.trellis.use_fp32(retry=True) == {"FINISHED"}, st.error
    assert p.precision == "FP32" and st.error == "" and st.error_kind == ""
    retried = [r for r in fake.jobs.values() if r.kind == "generate" and r.job_id != failed.job_id]
    assert len(retried) == 1 and retried[0].status == "done"
    req = retried[0].request
    assert req["precision"] == "fp32" and req["seed"] == 11 and req["image"] == failed.request["image"]
    objs = [o for o in bpy.data.objects if o.type == "MESH"]
    assert len(objs) == 1 and objs[0]["trellis2_job"] == retried[0].job_id
    assert "trellis.use_fp32" not in draw_panel(panel).operators()   # error gone


def test_numerical_error_in_ui_timer_and_plain_fp32_action(addon, fake, tmp_path, saved_prefs, monkeypatch):
    """The UI path (job timer) keeps the error kind too; a texture job cannot be re-sent, so only
    'Use FP32' is offered, and it just switches the preference."""
    ops = addon_module(addon, "operators")
    jobs = addon_module(addon, "jobs")
    p = saved_prefs
    p.precision = "AUTO"
    st = bpy.context.window_manager.trellis2
    rec = jobs.JobRecord("texture-x", "texture", {"precision": "auto"}, {"object": "gone"})
    fake.jobs[rec.job_id] = rec
    fake._handle({"type": "error", "job": rec.job_id, "kind": "numerical", "message": NAN_MESSAGE, "advice": ""})
    ops._job_timer()
    assert st.error == NAN_MESSAGE and st.error_kind == "numerical" and st.error_job == rec.job_id
    assert st.error_hint == jobs.ERROR_HINTS["numerical"]    # the add-on's own advice when none came
    layout = draw_panel(our_class(addon, "TRELLIS_PT_main"))
    fixes = [c["args"]["text"] for c in layout.calls
             if c["fn"] == "operator" and c["args"]["operator"] == "trellis.use_fp32"]
    assert fixes == ["Use FP32"]
    assert bpy.ops.trellis.use_fp32() == {"FINISHED"}
    assert p.precision == "FP32" and st.error == ""
    assert len(fake.jobs) == 1                                 # nothing re-sent
    st.error, st.error_kind = NAN_MESSAGE, "numerical"
    layout = draw_panel(our_class(addon, "TRELLIS_PT_main"))    # already fp32: no button, a pointer
    assert "trellis.use_fp32" not in layout.operators()
    assert any("already fp32" in t for t in layout.texts())
    ops.set_error(bpy.context.window_manager, "", "")


def test_nan_in_fp32_offers_no_fp32_fix(addon, fake, tmp_path, saved_prefs, monkeypatch):
    """NaN/Inf although the model already computed in fp32 (AUTO on a CPU) is not a precision
    problem: no 'Use FP32 [and Retry]' (it would only repeat the failure); the backend's advice shows."""
    from backend import errors

    saved_prefs.precision = "AUTO"
    st = bpy.context.window_manager.trellis2
    message = "The shape slat model produced NaN/Inf values (computing in float32)."
    exc = errors.NumericalError(message, stage="shape_slat", precision_related=False)
    advice = _numerical_error_for_next_job(fake, monkeypatch, exc)
    png = write_png(tmp_path / "n32.png")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=3) == {"CANCELLED"}
    assert st.error == message and st.error_hint == advice and st.error_kind != "numerical"
    layout = draw_panel(our_class(addon, "TRELLIS_PT_main"))
    assert "trellis.use_fp32" not in layout.operators()
    assert advice in layout.texts() and "not a precision problem" in advice
