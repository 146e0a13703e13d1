"""Multi-view conditioning and blockout-guided generation on tiny checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.errors import BadInput, MissingWeights
from backend.pipelines import JobState, load_pipeline
from backend.pipelines.guide import prepare_guide
from backend.pipelines.sampler import MultiViewCond

from _pipeline_helpers import object_rgba

FAST = {k: {"steps": 3} for k in ("sparse_structure", "shape_slat", "tex_slat")}


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_pipeline(tiny_dir, device="cpu")


def _side_view() -> np.ndarray:
    img = object_rgba(160, 160)
    img[..., 0], img[..., 2] = img[..., 2], 220 - img[..., 0] // 2     # another colouring and silhouette
    img[:40, :, 3] = 0
    return img


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k))
               for k in ("coords", "dual_vertices", "attrs", "vertices", "faces"))


def _box(extents=(1.0, 0.5, 0.3)):
    import trimesh

    m = trimesh.creation.box(extents=extents)
    return np.asarray(m.vertices), np.asarray(m.faces)


# ------------------------------------------------------------------------------------------ multi-view


def test_one_view_list_is_the_single_image_path_bit_for_bit(pipe):
    a = pipe.generate(object_rgba(), "512", seed=5, stage_params=FAST)
    for mode in ("stochastic", "multidiffusion"):
        b = pipe.generate([object_rgba()], "512", seed=5, stage_params=FAST, multiview=mode)
        assert _same(a, b) and b.state.multiview is None and b.state.cond_512.shape[0] == 1


@pytest.mark.parametrize("mode", ["stochastic", "multidiffusion"])
def test_two_views_change_the_result_and_are_deterministic(pipe, mode):
    one = pipe.generate(object_rgba(), "512", seed=5, stage_params=FAST)
    two = pipe.generate([object_rgba(), _side_view()], "512", seed=5, stage_params=FAST, multiview=mode)
    again = pipe.generate([object_rgba(), _side_view()], "512", seed=5, stage_params=FAST, multiview=mode)
    assert not _same(one, two) and _same(two, again)
    assert two.state.cond_512.shape[0] == 2 and two.state.multiview == mode
    assert len(two.preprocess_info["views"]) == 2


def test_modes_differ_and_stochastic_cycles_a_seeded_order():
    mv = MultiViewCond(torch.zeros(3, 4, 8), "stochastic", seed=11)
    order = mv.order(7)
    assert sorted(order[:3]) == [0, 1, 2] and order[3:6] == order[:3] and order[6] == order[0]
    assert order == MultiViewCond(torch.zeros(3, 4, 8), "stochastic", seed=11).order(7)
    with pytest.raises(ValueError):
        MultiViewCond(torch.zeros(2, 4, 8), "average")


def test_multidiffusion_averages_per_view_guided_velocities():
    """Sampler level: the multidiffusion velocity is the mean of the single-view guided velocities."""
    from backend.pipelines.sampler import FlowEulerGuidanceIntervalSampler, SamplerParams

    views = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t, cond, **kw):   # a toy 'network' whose velocity depends on the conditioning
        return x * 0.5 + cond.mean() * torch.ones_like(x) + t.view(-1, 1) * 1e-3

    s = FlowEulerGuidanceIntervalSampler()
    p = SamplerParams(steps=4, guidance_strength=3.0, guidance_rescale=0.5, guidance_interval=(0.0, 1.0))
    x = torch.randn(1, 5, generator=torch.Generator().manual_seed(1))
    neg = torch.zeros(1, 3, 4)
    one_step = SamplerParams(steps=1, guidance_strength=3.0, guidance_rescale=0.5, guidance_interval=(0.0, 1.0),
                             rescale_t=1.0)
    per_view = [s.velocity(model, x, 1.0, views[k:k + 1], neg, p, {}) for k in range(2)]
    assert not torch.allclose(per_view[0], per_view[1])
    out = s.sample(model, x, MultiViewCond(views, "multidiffusion"), neg, one_step)
    assert torch.allclose(out, x - (per_view[0] + per_view[1]) / 2, atol=1e-6)   # one Euler step from t=1 to 0
    first = s.sample(model, x, MultiViewCond(views, "stochastic", seed=0), neg, one_step)
    k = MultiViewCond(views, "stochastic", seed=0).order(1)[0]
    assert torch.allclose(first, x - per_view[k], atol=1e-6)


def test_multiview_cascade_and_upscale_reuse_every_view(pipe, tmp_path):
    views = [object_rgba(), _side_view()]
    res = pipe.generate(views, "1024_cascade", seed=2, stage_params=FAST, multiview="multidiffusion")
    assert res.state.cond_1024.shape[0] == 2 and len(res.faces) > 0
    low = pipe.generate(views, "512", seed=2, stage_params=FAST, multiview="multidiffusion")
    low.state.save(tmp_path / "job")
    state = JobState.load(tmp_path / "job")
    assert state.multiview == "multidiffusion" and state.cond_512.shape[0] == 2
    up = pipe.upscale(state, stage_params=FAST)
    fresh = pipe.generate(views, "1536_cascade", seed=2, stage_params=FAST, multiview="multidiffusion")
    assert _same(up, fresh)


# ------------------------------------------------------------------------------------------ blockout


def _occ(coords) -> set:
    return set(map(tuple, np.asarray(coords)[:, 1:].tolist()))


def test_blockout_strength_one_is_the_structure(pipe):
    v, f = _box()
    m = np.eye(4)
    m[:3, 3] = (4.0, -2.0, 1.0)
    m[:3, :3] *= 3.0
    g = prepare_guide(v, f, 1.0, transform=m)
    grid = pipe._ss_grid()
    blk = set(map(tuple, g.occupancy(grid).tolist()))
    stages = []
    res = pipe.generate(object_rgba(), "512", seed=4, stage_params=FAST, guide=g,
                        progress=lambda st, *a: stages.append(st))
    assert _occ(res.state.ss_coords) == blk                      # exactly the voxelised blockout
    # every output voxel lies inside the blockout occupancy dilated by one latent (512-model) voxel
    ratio = res.resolution // (grid // 2)
    lat = {(x // 2, y // 2, z // 2) for x, y, z in blk}
    dil = {(x + dx, y + dy, z + dz) for x, y, z in lat for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)}
    out_lat = {tuple(c) for c in (np.asarray(res.coords) // ratio).tolist()}
    assert out_lat <= dil and len(res.faces) > 0
    # back in the blockout's frame: the result's bounding box sits on the blockout's (3 m long box at (4,-2,1))
    world = g.to_world(res.vertices)
    assert np.allclose((world.min(0) + world.max(0)) / 2, (4.0, -2.0, 1.0), atol=0.25)
    assert "sparse_structure" in stages


def test_blockout_sdedit_moves_the_structure_towards_the_blockout(pipe):
    """Strength s < 1: the occupancy's SS-encoder latent, noised to s, denoised with the image. With random tiny
    weights the VAE cannot reproduce a box, so closeness is measured against what the VAE makes of the blockout
    (decoder(encoder(blockout))): the IoU grows as s falls; s = 1 is the unguided run."""
    v, f = _box()
    grid = pipe._ss_grid()
    unguided = pipe.generate(object_rgba(), "512", seed=3, stage_params=FAST)
    with torch.no_grad():
        g = prepare_guide(v, f, 0.5)
        x0 = pipe._encode_occupancy(g.occupancy(grid), grid)
        recon = _occ(torch.argwhere(pipe.models.get("sparse_structure_decoder")(x0) > 0)[:, [0, 2, 3, 4]])

    def iou(coords) -> float:
        a = _occ(coords)
        return len(a & recon) / len(a | recon)

    ious = {}
    for s in (0.5, 0.1):
        steps = []
        r = pipe.generate(object_rgba(), "512", seed=3, stage_params=FAST, guide=prepare_guide(v, f, s),
                          progress=lambda st, step, total, el: steps.append((st, total)))
        ious[s] = iou(r.state.ss_coords)
        assert {t for st, t in steps if st == "sparse_structure"} == {1}      # only the end of the 3-step schedule
    base = iou(unguided.state.ss_coords)
    print(f"\nIoU with the VAE's blockout: unguided {base:.3f}, s=0.5 {ious[0.5]:.3f}, s=0.1 {ious[0.1]:.3f}")
    assert ious[0.5] > base + 0.03 and ious[0.1] > ious[0.5]
    again = pipe.generate(object_rgba(), "512", seed=3, stage_params=FAST, guide=prepare_guide(v, f, 0.5))
    assert iou(again.state.ss_coords) == ious[0.5]                # deterministic per seed


def test_blockout_with_cascade_and_multiview(pipe):
    v, f = _box()
    res = pipe.generate([object_rgba(), _side_view()], "1024_cascade", seed=1, stage_params=FAST,
                        guide=prepare_guide(v, f, 1.0), multiview="stochastic")
    assert len(res.faces) > 0 and res.state.cond_1024.shape[0] == 2


def test_bad_guides_are_clear_errors(pipe, tiny_dir, tmp_path):
    import shutil

    v, f = _box()
    with pytest.raises(BadInput, match="guide mesh: the mesh has no vertices"):
        prepare_guide(np.zeros((0, 3)), np.zeros((0, 3), int))
    bad = v.copy()
    bad[0, 0] = np.nan
    with pytest.raises(BadInput, match="NaN"):
        prepare_guide(bad, f)
    with pytest.raises(BadInput, match="outside the generation frame"):
        prepare_guide(v * 3, f, frame="unit")
    with pytest.raises(BadInput, match="strength"):
        prepare_guide(v, f, 0.0)
    with pytest.raises(BadInput, match="strength"):
        prepare_guide(v, f, "strong")
    with pytest.raises(BadInput, match="multiview"):
        pipe.generate([object_rgba(), object_rgba()], "512", multiview="average")
    assert prepare_guide(v * 0.4, f, frame="unit").scale == 1.0        # already in the frame: kept as is
    # no SS encoder next to the decoder: strength < 1 is a missing-weights error, strength 1 still works
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    for ext in (".json", ".safetensors"):
        (bare / "ckpts" / f"ss_enc_conv3d_16l8_fp16{ext}").unlink()
    p2 = load_pipeline(bare, device="cpu")
    with pytest.raises(MissingWeights, match="ss_enc_conv3d_16l8_fp16"):
        p2.generate(object_rgba(), "512", seed=1, stage_params=FAST, guide=prepare_guide(v, f, 0.5))
    assert len(p2.generate(object_rgba(), "512", seed=1, stage_params=FAST, guide=prepare_guide(v, f, 1.0)).faces)


def test_ss_encoder_loads_strictly_from_the_official_manifest(shared_dir, tmp_path):
    from safetensors.torch import save_file

    from backend.models import CheckpointError, from_pretrained

    root = shared_dir / "official_state_dict"
    entry = json.loads((root / "_summary.json").read_text())["ss_enc_conv3d_16l8_fp16"]
    manifest = json.loads((root / "ss_enc_conv3d_16l8_fp16.json").read_text())
    sd = {k: torch.zeros(shape, dtype=getattr(torch, dt)) for k, (shape, dt) in manifest.items()}
    stem = tmp_path / "ss_enc_conv3d_16l8_fp16"
    (tmp_path / f"{stem.name}.json").write_text(json.dumps({"name": entry["cls"], "args": entry["args"]}))
    save_file(sd, f"{stem}.safetensors")
    model = from_pretrained(stem)
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    sd["out_layer.2.weight"] = torch.zeros(16, 512, 3, 3, 2, dtype=torch.float32)
    save_file(sd, f"{stem}.safetensors")
    with pytest.raises(CheckpointError, match="out_layer.2.weight"):
        from_pretrained(stem)


def test_cli_multiview_and_blockout(tiny_dir, tmp_path, capsys):
    import trimesh
    from PIL import Image

    from backend.cli import main

    a, b = tmp_path / "front.png", tmp_path / "side.png"
    Image.fromarray(object_rgba(), "RGBA").save(a)
    Image.fromarray(_side_view(), "RGBA").save(b)
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.6))
    box.apply_translation((3.0, 0.5, -1.0))
    box.export(tmp_path / "blockout.obj")
    base = ["generate", str(a), str(b), "--model", str(tiny_dir), "--pipeline", "512", "--device", "cpu", "-q",
            "--texture-size", "32", "--sparse-structure-steps", "2", "--shape-slat-steps", "2", "--tex-slat-steps", "2",
            "--multiview", "multidiffusion", "--guide-mesh", str(tmp_path / "blockout.obj")]
    out = tmp_path / "o.glb"
    assert main(base + ["-o", str(out)]) == 0
    got = trimesh.load(out, force="mesh")
    lo, hi = got.bounds
    assert np.allclose((lo + hi) / 2, (3.0, 0.5, -1.0), atol=0.3)        # written on the blockout, its frame
    assert np.allclose(hi - lo, (2.0, 1.0, 0.6), atol=0.35)
    capsys.readouterr()
    assert main(base + ["-o", str(tmp_path / "never.glb"), "--guide-strength", "2"]) == 1
    err = capsys.readouterr().err
    assert "--guide-strength" in err and "Traceback" not in err and not (tmp_path / "never.glb").exists()
    assert main(["generate", str(a), "--model", str(tiny_dir), "-o", str(tmp_path / "n.glb"), "--device", "cpu",
                 "-q", "--guide-mesh", str(tmp_path / "missing.obj")]) == 1
    assert "missing.obj" in capsys.readouterr().err


def test_golden_harness_runs_an_ss_encoder_case(tmp_path, tiny_dir):
    """A case built like the shipped golden cases (model pair + inputs + outputs), dispatched by its call."""
    import shutil

    from safetensors.torch import save_file

    from backend.golden import run_case
    from backend.models import from_pretrained

    stem = tiny_dir / "ckpts" / "ss_enc_conv3d_16l8_fp16"
    for ext in (".json", ".safetensors"):
        shutil.copy(f"{stem}{ext}", tmp_path / f"model_ss_enc_tiny{ext}")
    x = (torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.8).float()
    with torch.no_grad():
        _, mean, logvar = from_pretrained(stem)(x, return_raw=True)
    mean, logvar = mean.contiguous(), logvar.contiguous()
    save_file({"in.x": x, "out.z": mean.clone(), "out.mean": mean, "out.logvar": logvar},
              str(tmp_path / "case_enc2.safetensors"))
    (tmp_path / "case_enc2.json").write_text(json.dumps({
        "model": "ss_enc_tiny", "call": "z, mean, logvar = model(x, sample_posterior=False, return_raw=True)",
        "tolerances": {k: {"atol": 1e-5, "rtol": 1e-4} for k in ("out.z", "out.mean", "out.logvar")}}))
    rep = run_case(tmp_path, "enc2")     # a differently named case: found by its call
    assert rep.passed and not rep.missing_handler, rep.errors
    save_file({"in.x": x, "out.z": mean + 1, "out.mean": mean, "out.logvar": logvar},
              str(tmp_path / "case_enc2.safetensors"))
    assert not run_case(tmp_path, "enc2").passed
