"""Texture-only pipeline on tiny checkpoints: bakes into the mesh's own UVs, creates UVs only when
missing, rejects bad meshes; plus the UV rasteriser and dilation."""

from __future__ import annotations

import numpy as np
import pytest

from backend.errors import BadInput
from backend.pipelines import load_pipeline
from backend.ovoxel.uvbake import fill_empty_texels, rasterize_uv

from _pipeline_helpers import object_rgba


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from backend.pipelines.tiny import write_tiny_pipeline

    d = write_tiny_pipeline(tmp_path_factory.mktemp("tinytex") / "m", seed=1)
    return load_pipeline(d, device="cpu", texturing_only=True)


def _box_with_uvs():
    import trimesh

    m = trimesh.creation.box(extents=(2.0, 1.0, 0.6))
    v = np.asarray(m.vertices, np.float64) + [3.0, -1.0, 0.5]
    f = np.asarray(m.faces, np.int64)
    # per-corner UVs: each face gets its own small cell of a 4x4 atlas
    uv = np.zeros((len(f), 3, 2))
    for i in range(len(f)):
        cx, cy = (i % 4) / 4, (i // 4) / 4
        uv[i] = [[cx + 0.02, cy + 0.02], [cx + 0.23, cy + 0.02], [cx + 0.02, cy + 0.23]]
    return v, f, uv


def test_texture_keeps_vertices_and_uvs(pipe):
    v, f, uv = _box_with_uvs()
    m = np.eye(4)
    m[:3, :3] *= 2.0
    res = pipe.texture(v, f, object_rgba(), uvs=uv, transform=m, seed=3, resolution=256, texture_size=64)
    assert not res.uv_created
    assert res.vertices.shape == v.shape and np.allclose(res.vertices, v)
    assert np.array_equal(res.faces, f) and np.allclose(res.uvs, uv)
    assert res.base_color.shape == (64, 64, 4) and res.base_color.dtype == np.uint8
    assert res.metallic_roughness.shape == (64, 64, 3) and (res.metallic_roughness[..., 0] == 0).all()
    assert 0.05 < res.coverage < 1.0
    # texture voxels are the shape voxels of the mesh (one attribute row per voxel), inside the grid
    assert res.attrs.shape == (len(res.coords), 6) and res.coords.max() < res.resolution
    c, s = res.normalization
    unit = (v @ m[:3, :3].T - c) * s
    assert np.abs(unit).max() <= 0.5
    # deterministic
    again = pipe.texture(v, f, object_rgba(), uvs=uv, transform=m, seed=3, resolution=256, texture_size=64)
    assert np.array_equal(again.base_color, res.base_color)


def test_texture_creates_uvs_when_missing(pipe):
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=1)
    res = pipe.texture(np.asarray(m.vertices), np.asarray(m.faces), object_rgba(), seed=0, resolution=256,
                       texture_size=32)
    assert res.uv_created and len(res.faces) == len(m.faces)
    assert res.uvs.shape == (len(m.faces), 3, 2) and res.uvs.min() >= 0 and res.uvs.max() <= 1


@pytest.mark.parametrize("verts,faces,msg", [
    (np.zeros((0, 3)), np.zeros((0, 3), int), "no vertices"),
    (np.eye(3), np.zeros((0, 3), int), "no triangles"),
    (np.array([[0, 0, 0], [1, 0, 0], [np.nan, 1, 0]]), np.array([[0, 1, 2]]), "NaN"),
    (np.eye(3), np.array([[0, 1, 5]]), "out of range"),
])
def test_bad_meshes(pipe, verts, faces, msg):
    with pytest.raises(BadInput, match=msg):
        pipe.texture(verts, faces, object_rgba(), texture_size=32)


def test_bad_texture_arguments(pipe):
    v, f, uv = _box_with_uvs()
    with pytest.raises(BadInput, match="resolution"):
        pipe.texture(v, f, object_rgba(), uvs=uv, resolution=500)
    with pytest.raises(BadInput, match="UVs must be"):
        pipe.texture(v, f, object_rgba(), uvs=uv[:, :2], resolution=256, texture_size=32)


def test_rasterize_and_fill():
    uv = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    face, bary = rasterize_uv(uv, 16)
    cov = face >= 0
    assert 0.4 < cov.mean() < 0.65
    assert np.allclose(bary[cov].sum(-1), 1, atol=1e-5) and (bary[cov] >= -1e-6).all()
    # bottom-left texel (v≈0, u≈0) is covered, top-right is not
    assert cov[15, 0] and not cov[0, 15]
    img = np.zeros((16, 16, 1), np.float32)
    img[cov] = 1.0
    filled = fill_empty_texels(img, cov)
    assert (filled == 1.0).all()


def test_fill_without_scipy_matches_nearest(monkeypatch):
    """Inside Blender (no scipy) the dilation fill copies a nearest covered texel, bounded by margin."""
    import builtins

    from backend.ovoxel import uvbake

    rng = np.random.default_rng(0)
    cov = rng.random((24, 24)) < 0.05
    img = rng.random((24, 24, 3)).astype(np.float32)
    real_import = builtins.__import__

    def no_scipy(name, *a, **k):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    out = uvbake.fill_empty_texels(img, cov)
    ys, xs = np.nonzero(cov)
    for y, x in [(0, 0), (23, 23), (11, 5)]:
        d = np.maximum(abs(ys - y), abs(xs - x))            # chessboard distance to covered texels
        near = np.flatnonzero(d == d.min())
        assert any(np.array_equal(out[y, x], img[ys[i], xs[i]]) for i in near)
    assert np.array_equal(out[cov], img[cov])
    part = uvbake.fill_empty_texels(img, cov, margin=1)
    gy, gx = np.mgrid[:24, :24]
    dist = np.maximum(abs(gy[..., None] - ys), abs(gx[..., None] - xs)).min(-1)
    assert np.array_equal(part[dist > 1], img[dist > 1])          # beyond the margin: untouched
    assert np.array_equal(part[dist <= 1], out[dist <= 1])


def test_cli_texture_writes_glb(tmp_path):
    import trimesh
    from PIL import Image

    from backend.cli import main
    from backend.pipelines.tiny import write_tiny_pipeline

    model = write_tiny_pipeline(tmp_path / "m", seed=2)
    mesh = tmp_path / "box.glb"
    trimesh.creation.box(extents=(1.0, 0.5, 0.3)).export(mesh)
    img = tmp_path / "img.png"
    Image.fromarray(object_rgba(), "RGBA").save(img)
    out = tmp_path / "tex.glb"
    rc = main(["texture", str(mesh), str(img), "-o", str(out), "--model", str(model), "--resolution", "256",
               "--texture-size", "32", "--device", "cpu", "-q"])
    assert rc == 0
    loaded = next(iter(trimesh.load(out).geometry.values()))
    assert loaded.visual.material.baseColorTexture is not None
    assert np.allclose(loaded.bounds, trimesh.load(mesh).bounds, atol=1e-5)   # the input's own frame and scale
    rc = main(["texture", str(tmp_path / "absent.glb"), str(img), "-o", str(tmp_path / "x.glb"), "--model",
               str(model), "--device", "cpu", "-q"])
    assert rc == 1 and not (tmp_path / "x.glb").exists()


def test_texture_encode_uses_the_gpu_port_with_a_safe_fallback(monkeypatch, caplog):
    """The texture pipeline's mesh → O-Voxel step: the torch port (what runs on CUDA; here forced on the
    CPU with TRELLIS_KERNELS=triton) gives the codec's voxels; an unexpected failure of the port falls
    back to the codec with a warning; bad geometry is an error either way."""
    import logging

    import trimesh

    from backend import ovoxel
    from backend.pipelines.texturing import encode_mesh_shape
    from kernels import ovoxel_encode

    m = trimesh.creation.icosphere(3, 0.4)
    v, f = np.asarray(m.vertices, np.float32), np.asarray(m.faces)
    ref = ovoxel.encode_shape(v, f, 64, outside="clip")
    assert ovoxel_encode.select_encoder("cpu") == "numpy"             # default on a CPU: the codec
    monkeypatch.setenv("TRELLIS_KERNELS", "triton")
    assert ovoxel_encode.select_encoder("cpu") == "torch"
    calls = []
    real = ovoxel_encode.encode_shape_torch
    monkeypatch.setattr(ovoxel_encode, "encode_shape_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    port = encode_mesh_shape(v, f, 64, "cpu")
    assert calls == [1]                                                # the port really ran
    np.testing.assert_array_equal(port.coords, ref.coords)
    np.testing.assert_array_equal(port.intersected, ref.intersected)
    np.testing.assert_allclose(port.dual_vertices, ref.dual_vertices, atol=1e-5)

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ovoxel_encode, "encode_shape_torch", broken)
    with caplog.at_level(logging.WARNING, logger="backend.pipelines.texturing"):
        back = encode_mesh_shape(v, f, 64, "cpu")
    np.testing.assert_array_equal(back.coords, ref.coords)
    assert "encoding on the CPU instead" in caplog.text

    def bad(*a, **k):
        raise ovoxel.OVoxelError("no finite vertex")

    monkeypatch.setattr(ovoxel_encode, "encode_shape_torch", bad)
    with pytest.raises(ovoxel.OVoxelError):
        encode_mesh_shape(v, f, 64, "cpu")


def test_texture_reads_only_texturing_pipeline_json(tmp_path):
    """Sampler and latent normalisations of a texture-only job come from texturing_pipeline.json, as in the
    official Trellis2TexturingPipeline: editing pipeline.json changes nothing, editing it changes the result."""
    import json
    import shutil

    from backend.pipelines.tiny import write_tiny_pipeline

    base = write_tiny_pipeline(tmp_path / "base", seed=1)
    v, f, uv = _box_with_uvs()

    def run(folder):
        totals = {}
        res = load_pipeline(folder, device="cpu").texture(
            v, f, object_rgba(), uvs=uv, seed=3, resolution=256, texture_size=32,
            progress=lambda stage, step, total, el: totals.__setitem__(stage, total))
        return res.base_color, totals["tex_slat"]

    def variant(name, file, edit):
        d = tmp_path / name
        shutil.copytree(base, d)
        cfg = json.loads((d / file).read_text())
        edit(cfg["args"])
        (d / file).write_text(json.dumps(cfg))
        return d

    def scale_norm(args):
        args["tex_slat_normalization"]["std"] = [s * 3 for s in args["tex_slat_normalization"]["std"]]
        args["tex_slat_sampler"]["params"]["steps"] = 3

    ref, steps = run(base)
    assert steps == 2
    same, steps_p = run(variant("p", "pipeline.json", scale_norm))
    assert steps_p == 2 and np.array_equal(same, ref)
    diff, steps_t = run(variant("t", "texturing_pipeline.json", scale_norm))
    assert steps_t == 3 and not np.array_equal(diff, ref)


def test_uv_layout_stats_tell_tiling_and_stacked_layouts():
    from backend.ovoxel.uvbake import uv_layout_stats

    _, _, uv = _box_with_uvs()
    good = uv_layout_stats(uv)
    assert good.in_range == 1.0 and good.overlap < 0.05 and 0.1 < good.coverage < 0.6 and good.problem() is None
    tiled = uv_layout_stats(uv * 12.0)                       # a tiling material: UVs far outside 0-1
    assert tiled.in_range < 0.2 and "outside 0–1" in tiled.problem()
    stacked = uv_layout_stats(np.broadcast_to(uv[:1], uv.shape))   # every face on the same cell
    assert stacked.in_range == 1.0 and stacked.overlap > 0.9 and "overlapping" in stacked.problem()


def test_texture_job_cancel_is_honoured_inside_the_bake(pipe, monkeypatch):
    """The bake is chunked: a cancel that arrives mid-bake stops it at the next chunk (it used to be
    seen only when the whole bake had finished)."""
    import threading

    from backend.errors import Cancelled

    monkeypatch.setattr("backend.pipelines.bake.BAKE_CHUNK", 1 << 10)
    v, f, uv = _box_with_uvs()
    cancel, seen = threading.Event(), []

    def progress(stage, step, total, elapsed):
        seen.append((stage, step, total))
        if stage == "bake" and step == 2:
            cancel.set()

    with pytest.raises(Cancelled) as info:
        pipe.texture(v, f, object_rgba(), uvs=uv, seed=3, resolution=256, texture_size=128,
                     progress=progress, cancel=cancel)
    assert info.value.stage == "bake" and seen[-1][:2] == ("bake", 2) and seen[-1][2] > 4


def test_chunked_bake_is_identical_to_the_one_shot_bake(monkeypatch):
    from backend import ovoxel
    from backend.ovoxel.uvbake import bake_attributes
    from backend.pipelines import bake

    rng = np.random.default_rng(0)
    n = 3000
    uv = rng.random((n, 1, 2)) * 0.95 + (rng.random((n, 3, 2)) - 0.5) * 0.05   # overlapping triangles
    v = rng.random((n * 3, 3)) - 0.5
    f = np.arange(n * 3).reshape(n, 3)
    coords = np.unique(rng.integers(0, 32, (2000, 3)), axis=0)
    attrs = rng.random((len(coords), 6), dtype=np.float32)
    monkeypatch.setattr(bake, "BAKE_CHUNK", 1 << 11)
    steps = []
    got = bake.bake_pbr(v, f, uv, coords, attrs, 32, 256, progress=lambda s, t: steps.append((s, t)))
    ref = bake_attributes(v, f, uv, 256, lambda p: ovoxel.sample_attributes(coords, attrs, 32, ovoxel.DEFAULT_AABB, p))
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]) and got[2] == ref[2]
    assert len(steps) > 10 and [s for s, _ in steps] == list(range(1, len(steps) + 1))
    assert steps[-1][0] == steps[-1][1]


def test_codec_encode_in_a_killable_child_is_identical_and_cancellable(monkeypatch):
    """With a cancel check (texture jobs), the CPU codec's encode runs in a child process: same
    voxels as in-process, bad geometry still an OVoxelError, and a raising check kills it."""
    import subprocess

    import trimesh

    from backend import ovoxel
    from backend.pipelines.texturing import encode_mesh_shape

    monkeypatch.setattr("backend.pipelines.texturing.ENCODE_CHILD_RESOLUTION", 64)
    m = trimesh.creation.icosphere(3, 0.4)
    v, f = np.asarray(m.vertices, np.float32), np.asarray(m.faces)
    ref = ovoxel.encode_shape(v, f, 64, outside="clip")
    got = encode_mesh_shape(v, f, 64, "cpu", tick=lambda: None)
    for name in ("coords", "dual_vertices", "intersected"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
    bad = f.copy()
    bad[0, 0] = 10 ** 6
    with pytest.raises(ovoxel.OVoxelError, match="out of range"):
        encode_mesh_shape(v, bad, 64, "cpu", tick=lambda: None)
    children = []
    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: children.append(real(*a, **k)) or children[-1])

    class Stop(Exception):
        pass

    def cancel():
        raise Stop

    import backend.killable as K

    real_run = K.run_killable
    monkeypatch.setattr(K, "run_killable", lambda argv, tick, log, poll_s=0.05: real_run(argv, tick, log, 0.0))
    with pytest.raises(Stop):
        encode_mesh_shape(v, f, 64, "cpu", tick=cancel)
    assert len(children) == 1 and children[0].poll() is not None


def test_cancel_while_the_bake_fill_runs(monkeypatch):
    """The nearest-texel distance transform (one long scipy call) runs in a helper thread: a cancel
    while it runs is seen by the 50 ms check, without waiting for it to finish."""
    import threading

    from scipy import ndimage

    from backend.pipelines import bake

    rng = np.random.default_rng(0)
    uv = rng.random((200, 1, 2)) * 0.9 + (rng.random((200, 3, 2)) - 0.5) * 0.05
    v, f = rng.random((600, 3)) - 0.5, np.arange(600).reshape(200, 3)
    coords = np.unique(rng.integers(0, 16, (300, 3)), axis=0)
    attrs = rng.random((len(coords), 6), dtype=np.float32)
    entered, release = threading.Event(), threading.Event()
    real = ndimage.distance_transform_edt

    def slow_edt(*a, **k):                      # stands for a multi-second transform at 4096²
        entered.set()
        assert release.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(ndimage, "distance_transform_edt", slow_edt)

    class Stop(Exception):
        pass

    def check():
        if entered.is_set():
            raise Stop

    try:
        with pytest.raises(Stop):
            bake.bake_pbr(v, f, uv, coords, attrs, 16, 64, check=check)
    finally:
        release.set()
    assert entered.is_set()
    base, mr, cov = bake.bake_pbr(v, f, uv, coords, attrs, 16, 64, check=lambda: None)    # unchanged otherwise
    ref = bake.bake_pbr(v, f, uv, coords, attrs, 16, 64)
    assert np.array_equal(base, ref[0]) and np.array_equal(mr, ref[1]) and cov == ref[2]
