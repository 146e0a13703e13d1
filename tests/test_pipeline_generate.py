"""End-to-end image→3D on tiny random checkpoints (CPU, seconds): every pipeline type, cascade token
stepping, determinism, upscale, progress/cancel, missing weights, GLB export."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from backend.errors import BadInput, Cancelled, MissingWeights
from backend.pipelines import JobState, load_pipeline

from _pipeline_helpers import object_rgba


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_pipeline(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def image():
    return object_rgba()


_CACHE: dict = {}


@pytest.fixture(scope="module")
def gen(pipe, image):
    """Cached ``generate(image, pipeline_type, seed)`` (each tiny run costs a few seconds)."""
    _CACHE.clear()

    def run(pt: str, seed: int):
        if (pt, seed) not in _CACHE:
            _CACHE[(pt, seed)] = pipe.generate(image, pt, seed=seed)
        return _CACHE[(pt, seed)]

    return run


def _check_result(res, res_expected):
    assert res.resolution == res_expected
    n = res.coords.shape[0]
    assert n > 0
    assert res.coords.dtype == np.int32 and res.coords.shape == (n, 3)
    assert res.coords.min() >= 0 and res.coords.max() < res.resolution
    assert res.dual_vertices.shape == (n, 3) and res.intersected.shape == (n, 3) and res.intersected.dtype == bool
    assert res.split_weight.shape == (n, 1) and (res.split_weight >= 0).all()
    # texture voxels equal the shape voxels: one attribute row per shape voxel
    assert res.attrs.shape == (n, 6) and np.isfinite(res.attrs).all()
    assert len(np.unique(res.coords, axis=0)) == n
    # outputs inside the unit cube
    assert res.faces.shape[0] > 0
    assert res.vertices.min() >= -0.5 - 1e-6 and res.vertices.max() <= 0.5 + 1e-6
    assert res.faces.max() < len(res.vertices)


@pytest.mark.parametrize("pt,res", [("512", 128), ("1024", 256), ("1024_cascade", 256), ("1536_cascade", 384)])
def test_every_pipeline_type(pipe, image, gen, pt, res):
    stages = []
    out = pipe.generate(image, pt, seed=3, progress=lambda s, i, n, t: stages.append((s, i, n)))
    _check_result(out, res)
    _CACHE[(pt, 3)] = out  # reused by the tests below
    names = {s for s, _, _ in stages}
    assert {"preprocess", "cond", "sparse_structure", "tex_slat", "decode"} <= names
    assert ("shape_slat_hr" in names) == pt.endswith("cascade")
    assert out.state.pipeline_type == pt and out.state.hr_feats.shape[0] == out.state.hr_coords.shape[0]


def test_same_seed_identical_other_seed_differs(pipe, image, gen):
    a = gen("1024_cascade", 3)
    b = pipe.generate(image, "1024_cascade", seed=3)
    c = pipe.generate(image, "1024_cascade", seed=12)
    for k in ("coords", "dual_vertices", "intersected", "split_weight", "attrs", "vertices", "faces"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert not (a.coords.shape == c.coords.shape and np.array_equal(a.attrs, c.attrs))


def test_1536_token_budget_steps_down(pipe, image, gen):
    full = gen("1536_cascade", 3)
    n_tokens = full.state.hr_coords.shape[0]
    assert full.resolution == 384
    try:
        pipe.max_num_tokens = n_tokens          # not below the budget any more: 1536 → 1408 → ...
        stepped = pipe.generate(image, "1536_cascade", seed=3)
    finally:
        pipe.max_num_tokens = 49152
    assert stepped.resolution < 384 and stepped.resolution % 32 == 0 and stepped.resolution >= 256
    assert stepped.state.hr_coords.shape[0] < n_tokens or stepped.resolution == 256
    try:
        pipe.max_num_tokens = 1                 # never satisfiable: stops at 1024 (grid 256 here)
        floor = pipe.generate(image, "1536_cascade", seed=3)
    finally:
        pipe.max_num_tokens = 49152
    assert floor.resolution == 256


def test_upscale_equals_fresh_1536_run(pipe, image, gen, tmp_path):
    base = gen("1024_cascade", 3)
    base.state.save(tmp_path / "job")
    state = JobState.load(tmp_path / "job")
    up = pipe.upscale(state)
    fresh = gen("1536_cascade", 3)
    assert up.resolution == fresh.resolution == 384
    for k in ("coords", "attrs", "faces"):
        assert np.array_equal(getattr(up, k), getattr(fresh, k)), k
    # from a non-cascade job (no LR latent saved) it still matches
    up2 = pipe.upscale(gen("1024", 3).state)
    assert np.array_equal(up2.coords, fresh.coords) and np.array_equal(up2.attrs, fresh.attrs)


def test_cancel_and_progress(pipe, image):
    ev = threading.Event()
    seen = []

    def progress(stage, step, total, elapsed):
        seen.append(stage)
        if stage == "shape_slat" and step == 1:
            ev.set()

    with pytest.raises(Cancelled) as ei:
        pipe.generate(image, "512", seed=1, progress=progress, cancel=ev)
    assert ei.value.stage == "shape_slat"
    assert "tex_slat" not in seen


def test_bad_arguments(pipe, image):
    with pytest.raises(BadInput, match="pipeline type"):
        pipe.generate(image, "2048")
    with pytest.raises(BadInput, match="stage"):
        pipe.generate(image, "512", stage_params={"shape": {"steps": 2}})
    with pytest.raises(BadInput, match="sampler parameter"):
        pipe.generate(image, "512", stage_params={"shape_slat": {"stepz": 2}})
    with pytest.raises(BadInput, match="transparent"):
        pipe.generate(np.zeros((40, 40, 4), np.uint8), "512")


def test_stage_params_override(pipe, image):
    calls = []
    pipe.generate(image, "512", seed=2, stage_params={"shape_slat": {"steps": 3}},
                  progress=lambda s, i, n, t: calls.append((s, n)))
    assert ("shape_slat", 3) in calls and ("sparse_structure", 2) in calls


def test_missing_weights_lists_everything(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "ckpts" / "shape_dec_next_dc_f16c32_fp16.safetensors").unlink()
    (broken / "ckpts" / "ss_dec_conv3d_16l8_fp16.json").unlink()
    shutil.rmtree(broken / "dinov3")
    with pytest.raises(MissingWeights) as ei:
        load_pipeline(broken, device="cpu")
    msg = str(ei.value)
    assert "shape_slat_decoder" in msg and "sparse_structure_decoder" in msg and "DINOv3" in msg
    assert len(ei.value.missing) == 3
    with pytest.raises(MissingWeights, match="not found"):
        load_pipeline(tmp_path / "nothing", device="cpu")


def test_glb_export_reloads_with_material(gen, tmp_path):
    import trimesh

    from backend.pipelines.export import generation_to_textured_mesh, write_glb

    res = gen("512", 3)
    v, f, uv, base, mr = generation_to_textured_mesh(res, texture_size=64)
    out = write_glb(tmp_path / "out.glb", v, f, uv, base, mr)
    scene = trimesh.load(out)
    mesh = next(iter(scene.geometry.values()))
    mat = mesh.visual.material
    assert mat.baseColorTexture is not None and mat.metallicRoughnessTexture is not None
    assert mat.baseColorTexture.size == (64, 64)
    assert len(mesh.faces) == len(f)
    # Z-up → Y-up: glTF y is our z
    lo, hi = mesh.bounds
    assert np.isclose(lo[1], v[:, 2].min(), atol=1e-5) and np.isclose(hi[2], -v[:, 1].min(), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["out.glb"]  # no temp leftovers


def test_decimation_reaches_target_and_keeps_the_shape(gen):
    from backend.pipelines.export import generation_to_textured_mesh

    res = gen("512", 3)
    n_faces = len(res.faces)
    target = n_faces // 4
    v, f, uv, base, mr = generation_to_textured_mesh(res, texture_size=32, decimate=target)
    assert 0 < len(f) <= target
    # decimation must not move the surface out of the original's bounding box (beyond a voxel)
    lo, hi = np.asarray(res.vertices).min(0), np.asarray(res.vertices).max(0)
    voxel = 1.0 / res.resolution
    assert (v.min(0) >= lo - voxel).all() and (v.max(0) <= hi + voxel).all()
    assert uv.shape == (len(f), 3, 2) and np.isfinite(uv).all()


def test_cli_generate_and_no_partial_output(tiny_dir, tmp_path):
    from PIL import Image

    from backend.cli import main

    img = tmp_path / "in.png"
    Image.fromarray(object_rgba(), "RGBA").save(img)
    out = tmp_path / "o.glb"
    rc = main(["generate", str(img), "-o", str(out), "--model", str(tiny_dir), "--pipeline", "512", "--seed", "1",
               "--texture-size", "64", "--device", "cpu", "-q", "--save-job", str(tmp_path / "job")])
    assert rc == 0 and out.is_file() and (tmp_path / "job" / "job.json").is_file()
    rc = main(["upscale", str(tmp_path / "job"), "-o", str(tmp_path / "up.glb"), "--model", str(tiny_dir),
               "--texture-size", "32", "--device", "cpu", "-q", "--precision", "fp32", "--max-tokens", "4096"])
    assert rc == 0 and (tmp_path / "up.glb").is_file()
    rc = main(["upscale", str(tmp_path / "job"), "-o", str(tmp_path / "never.glb"), "--model", str(tiny_dir),
               "--device", "cpu", "-q", "--max-tokens", "100"])
    assert rc == 1 and not (tmp_path / "never.glb").exists()     # budget below 1024: clear error, no file
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    rc = main(["generate", str(bad), "-o", str(tmp_path / "never.glb"), "--model", str(tiny_dir), "--device", "cpu",
               "-q"])
    assert rc == 1 and not (tmp_path / "never.glb").exists()
    assert main(["make-tiny", str(tmp_path / "t2")]) == 0 and (tmp_path / "t2" / "pipeline.json").is_file()


def test_damaged_checkpoint_is_missing_weights(tiny_dir, tmp_path, image):
    import shutil

    broken = tmp_path / "damaged"
    shutil.copytree(tiny_dir, broken)
    f = broken / "ckpts" / "ss_flow_img_dit_1_3B_64_bf16.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    p = load_pipeline(broken, device="cpu")
    with pytest.raises(MissingWeights, match="cannot be used"):
        p.generate(image, "512")


def test_no_tensor_leaks_across_repeated_jobs(pipe, image):
    """A long Blender session runs many jobs in one backend: after a warm-up round, the live tensors
    (count and bytes: the models plus nothing else) must not grow from job to job (spec: VRAM creep
    across repeated generations is a top user complaint of other frontends)."""
    import gc
    import warnings

    import torch
    import trimesh

    sphere = trimesh.creation.icosphere(2, 0.3)

    def round_():
        res = pipe.generate(image, "1024_cascade", seed=5)
        tex = pipe.texture(np.asarray(sphere.vertices), np.asarray(sphere.faces), image, seed=0, resolution=256,
                           texture_size=32)
        del res, tex

    def live():
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = [o for o in gc.get_objects() if torch.is_tensor(o)]
        return len(ts), sum(t.numel() * t.element_size() for t in ts if not t.is_meta)

    round_()
    before = live()
    round_()
    round_()
    assert live() == before


def test_cancel_is_honoured_while_a_checkpoint_loads(tiny_dir, image):
    """Models load lazily inside their stage: a cancel that arrives as the stage starts stops the
    checkpoint load itself (tensor by tensor), and the half-loaded model is not kept."""
    p = load_pipeline(tiny_dir, device="cpu")
    cancel = threading.Event()

    def progress(stage, step, total, elapsed):
        if stage == "sparse_structure" and step == 0:
            cancel.set()

    with pytest.raises(Cancelled) as info:
        p.generate(image, "512", seed=1, progress=progress, cancel=cancel)
    assert info.value.stage == "sparse_structure"
    assert "sparse_structure_flow_model" not in p.models.models
    cancel.clear()
    assert p.generate(image, "512", seed=1, stage_params={k: {"steps": 1} for k in
                                                          ("sparse_structure", "shape_slat", "tex_slat")}).num_voxels


def test_cpu_mesh_extraction_in_a_killable_child(monkeypatch):
    """Big CPU outputs are meshed in a child when a cancel check is given: identical mesh, and a
    raising check kills the child (the 'mesh' stage no longer ignores a cancel for seconds)."""
    import subprocess

    import trimesh

    import backend.killable as K
    from backend import ovoxel
    from backend.pipelines import pipeline as PL

    m = trimesh.creation.icosphere(3, 0.4)
    enc = ovoxel.encode_shape(np.asarray(m.vertices, np.float32), np.asarray(m.faces), 64)
    split = np.ones((len(enc.coords), 1), np.float32)
    args = (enc.coords, enc.dual_vertices, enc.intersected, split, 64)
    ref_v, ref_f = PL.fdg_to_mesh(*args)
    monkeypatch.setattr(PL, "MESH_CHILD_VOXELS", 0)
    v, f = PL.fdg_to_mesh(*args, tick=lambda: None)
    assert np.array_equal(v, ref_v) and np.array_equal(f, ref_f) and len(f) > 100
    children = []
    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: children.append(real(*a, **k)) or children[-1])
    real_run = K.run_killable
    monkeypatch.setattr(K, "run_killable", lambda argv, tick, log, poll_s=0.05: real_run(argv, tick, log, 0.0))

    def cancel():
        raise Cancelled(stage="mesh")

    with pytest.raises(Cancelled):
        PL.fdg_to_mesh(*args, tick=cancel)
    assert len(children) == 1 and children[0].poll() is not None


def test_token_budget_step_down_reaches_the_addon_as_a_warning(pipe, image, caplog):
    """The step-down is logged at WARNING (the server forwards WARNING+ as ``log`` frames) in the words
    the add-on parses into the result's note."""
    import logging

    from trellis_blender import core

    try:
        pipe.max_num_tokens = 1
        with caplog.at_level(logging.WARNING):
            pipe.generate(image, "1536_cascade", seed=3)
    finally:
        pipe.max_num_tokens = 49152
    notes = [core.token_budget_note(r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert {"max_tokens": 1, "resolution": 1024} in notes
