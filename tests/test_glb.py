"""The one GLB writer (backend/glb.py) behind both exports: what it writes reads back exactly through our
own glTF reader (backend.mesh_io.load_mesh) and through trimesh."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from backend.mesh_io import load_mesh, save_mesh, srgb_to_linear
from backend.pipelines.export import write_glb


def _chunks(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    magic, version, total = struct.unpack("<4sII", data[:12])
    assert (magic, version, total) == (b"glTF", 2, len(data))
    n_js, kind = struct.unpack("<II", data[12:20])
    assert kind == 0x4E4F534A and n_js % 4 == 0
    n_bin, kind = struct.unpack("<II", data[20 + n_js:28 + n_js])
    assert kind == 0x004E4942 and 28 + n_js + n_bin == len(data)
    return json.loads(data[20:20 + n_js]), data[28 + n_js:]


def _textured(rng):
    v = rng.normal(size=(5, 3)).astype(np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3], [1, 4, 2]], np.int32)
    uv = rng.uniform(0, 1, size=(3, 3, 2)).astype(np.float32)
    base = rng.integers(0, 256, size=(8, 16, 4), dtype=np.uint8)
    mr = rng.integers(0, 256, size=(8, 16, 3), dtype=np.uint8)
    return v, f, uv, base, mr


def test_textured_export_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(3)
    v, f, uv, base, mr = _textured(rng)
    base[..., 3] = 255
    out = write_glb(tmp_path / "a.glb", v, f, uv, base, mr)
    gl, blob = _chunks(out)
    for view in gl["bufferViews"]:
        assert view["byteOffset"] % 4 == 0 and view["byteOffset"] + view["byteLength"] <= len(blob)
    mat = gl["materials"][0]
    assert mat["alphaMode"] == "OPAQUE" and mat["doubleSided"] is False

    mesh = load_mesh(out)
    # every corner: the same position (Z-up → glTF Y-up) and the same UV (glTF: v flipped)
    corners = mesh.vertices[mesh.faces].reshape(-1, 3)
    want = v[f].reshape(-1, 3)
    np.testing.assert_allclose(corners, np.stack([want[:, 0], want[:, 2], -want[:, 1]], 1), atol=1e-6)
    got_uv = mesh.uvs[mesh.faces].reshape(-1, 2)
    np.testing.assert_allclose(got_uv, np.stack([uv[..., 0], 1 - uv[..., 1]], -1).reshape(-1, 2), atol=1e-6)
    m = mesh.materials[0]
    np.testing.assert_array_equal(m.base_color_texture.image, base)
    np.testing.assert_array_equal(m.metallic_roughness_texture.image, mr)
    assert (m.metallic_factor, m.roughness_factor) == (1.0, 1.0)

    import trimesh

    tm = next(iter(trimesh.load(out).geometry.values()))
    assert tm.visual.material.baseColorTexture.size == (16, 8)
    np.testing.assert_allclose(tm.visual.uv[mesh.faces].reshape(-1, 2), uv.reshape(-1, 2), atol=1e-6)


def test_alpha_decides_blend_and_big_meshes_use_uint32(tmp_path):
    rng = np.random.default_rng(4)
    v, f, uv, base, mr = _textured(rng)
    base[..., 3] = 255
    base[0, 0, 3] = 10
    gl, _ = _chunks(write_glb(tmp_path / "b.glb", v, f, uv, base, mr))
    assert gl["materials"][0]["alphaMode"] == "BLEND"
    assert gl["accessors"][gl["meshes"][0]["primitives"][0]["indices"]]["componentType"] == 5123

    n = 70000
    big_v = rng.normal(size=(n, 3)).astype(np.float32)
    big_f = np.stack([np.arange(n - 2), np.arange(1, n - 1), np.arange(2, n)], 1)
    save_mesh(tmp_path / "c.glb", big_v, big_f)
    gl, _ = _chunks(tmp_path / "c.glb")
    assert gl["accessors"][gl["meshes"][0]["primitives"][0]["indices"]]["componentType"] == 5125
    back = load_mesh(tmp_path / "c.glb")
    np.testing.assert_array_equal(back.faces, big_f)
    np.testing.assert_allclose(back.vertices, big_v)


@pytest.mark.parametrize("with_mr", [False, True])
def test_vertex_colour_export_reads_back(tmp_path, with_mr):
    rng = np.random.default_rng(5)
    v = rng.normal(size=(4, 3)).astype(np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]])
    col = rng.uniform(0, 1, size=(4, 4))
    col[:, 3] = 1.0
    mr = rng.uniform(0, 1, size=(4, 2)) if with_mr else None
    save_mesh(tmp_path / "d.glb", v, f, col, metallic_roughness=mr)
    gl, _ = _chunks(tmp_path / "d.glb")
    back = load_mesh(tmp_path / "d.glb")
    np.testing.assert_allclose(back.vertices, v)       # written as given: no axis conversion
    np.testing.assert_allclose(back.vertex_colors[:, :3], srgb_to_linear(col[:, :3]), atol=1e-6)
    mat = gl["materials"][0]
    assert mat["alphaMode"] == "OPAQUE" and mat["doubleSided"] is True
    if with_mr:
        assert mat["pbrMetallicRoughness"]["metallicFactor"] == pytest.approx(float(np.median(mr[:, 0])), abs=1e-6)
        assert {"_METALLIC", "_ROUGHNESS"} <= set(gl["meshes"][0]["primitives"][0]["attributes"])
    else:
        assert mat["pbrMetallicRoughness"]["roughnessFactor"] == 0.8


def test_split_corner_uvs_matches_the_unique_rows():
    """Per-corner UVs → per-vertex: exactly numpy's unique rows of (vertex, u, v) rounded to 1e-7
    (so seams split, shared corners merge, and -0.0 is 0.0)."""
    from backend.pipelines.export import split_corner_uvs

    rng = np.random.default_rng(7)
    f = rng.integers(0, 40, size=(3000, 3))
    uv = np.round(rng.uniform(-1, 2, size=(3000, 3, 2)), 1)
    uv[0, 0], uv[1, 0] = (-0.0, 0.5), (0.0, 0.5 + 1e-9)
    f[1, 0] = f[0, 0]
    vmap, f2, uvv = split_corner_uvs(f, uv)
    key = np.concatenate([f.reshape(-1, 1).astype(np.float64), np.round(uv.reshape(-1, 2), 7) + 0.0], 1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    np.testing.assert_array_equal(vmap, uniq[:, 0].astype(np.int64))
    np.testing.assert_array_equal(uvv, uniq[:, 1:])
    np.testing.assert_array_equal(f2.reshape(-1), inv.reshape(-1))
    assert f2[0, 0] == f2[1, 0] and len(vmap) < f.size        # the two corners merged; duplicates merged
    np.testing.assert_array_equal(vmap[f2], f)                  # every corner keeps its vertex
    np.testing.assert_allclose(uvv[f2], np.round(uv, 7) + 0.0)  # ... and its UV


def test_empty_or_non_finite_meshes_are_refused_before_writing(tmp_path):
    """Both would be invalid glTF (empty accessors, NaN in the JSON): a clear error and no file."""
    with pytest.raises(ValueError, match="nothing to write"):
        save_mesh(tmp_path / "e.glb", np.zeros((0, 3)), np.zeros((0, 3), int))
    v = np.array([[0, 0, 0], [1, 0, 0], [0, np.nan, 0]], np.float32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_mesh(tmp_path / "n.glb", v, np.array([[0, 1, 2]]))
    uv = np.zeros((1, 3, 2), np.float32)
    uv[0, 1, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_glb(tmp_path / "t.glb", v[[0, 1, 0]], np.array([[0, 1, 2]]), uv, np.zeros((4, 4, 4), np.uint8),
                  np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
