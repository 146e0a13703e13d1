"""Decoded orientation: closed components outward (cavities inward), open sheets on their source side
(stored by the encoder) or by the documented rule without it; the same in ``ovoxel decode``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend import ovoxel as ox
from backend.ovoxel import shapes
from backend.ovoxel.decode import _components
from backend.ovoxel.meshutil import signed_volume

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "meshes"


def _grid_sheet(n: int = 20, z: float = 0.1):
    g = np.linspace(-0.4, 0.4, n + 1)
    X, Y = np.meshgrid(g, g, indexing="ij")
    v = np.stack([X, Y, np.full_like(X, z)], -1).reshape(-1, 3)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    f = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return v.astype(np.float32), f.astype(np.int32)   # normals +z


def _normals(v, f):
    return np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])


def _frac_along(v, f, ref) -> float:
    """Fraction of faces whose normal has a positive dot with ``ref(centres)``."""
    return float((np.einsum("ij,ij->i", _normals(v, f), ref(v[f].mean(1))) > 0).mean())


def _component_volumes(v, f):
    lab = _components(v.shape[0], f.reshape(-1), f[:, [1, 2, 0]].reshape(-1))[f[:, 0]]
    vols = [signed_volume(v, f[lab == lb]) for lb in np.unique(lab)]
    return sorted(vols, key=abs, reverse=True)


@pytest.mark.parametrize("sign", [1, -1])
def test_open_plane_keeps_source_side(sign):
    v, f = _grid_sheet()
    if sign < 0:
        f = f[:, [0, 2, 1]]
    ov = ox.encode_shape(v, f, 64)
    assert ov.sides is not None and (ov.sides[ov.intersected[:, 2], 2] == sign).all()
    dv, df = ox.decode_ovoxel(ov)
    up = lambda c: np.tile([0.0, 0.0, float(sign)], (len(c), 1))  # noqa: E731
    assert _frac_along(dv, df, up) >= 0.95
    # without the stored side (e.g. a VAE output): the documented rule, flat sheets face +dominant axis
    dv2, df2 = ox.decode_ovoxel(ov, sides=None)
    assert _frac_along(dv2, df2, lambda c: np.tile([0.0, 0.0, 1.0], (len(c), 1))) >= 0.95


@pytest.mark.parametrize("inward", [False, True])
def test_open_hemisphere_keeps_source_side(inward):
    sv, sf = shapes.uv_sphere(0.4, 40, 80, center=(0.02, -0.03, 0.01))
    cen = np.array([0.02, -0.03, 0.01])
    f = sf[(sv[sf].mean(1) - cen)[:, 1] > 0]           # half along y
    if inward:
        f = f[:, [0, 2, 1]]
    ov = ox.encode_shape(sv, f, 96)
    dv, df = ox.decode_ovoxel(ov)
    frac = _frac_along(dv, df, lambda c: (c - cen) * (-1 if inward else 1))
    assert frac >= 0.95, frac
    # the rule without stored sides: a dome faces its convex side
    dv2, df2 = ox.decode_ovoxel(ov, sides=None)
    assert _frac_along(dv2, df2, lambda c: c - cen) >= 0.95


def test_nested_spheres_outer_outward_cavity_inward_any_source_winding():
    v1, f1 = shapes.uv_sphere(0.45, 60, 120)
    v2, f2 = shapes.uv_sphere(0.25, 40, 80)
    for f2w in (f2, f2[:, [0, 2, 1]]):     # inner wound outward, then inward, in the source
        v = np.concatenate([v1, v2])
        f = np.concatenate([f1, f2w + len(v1)])
        ov = ox.encode_shape(v, f, 96)
        dv, df = ox.decode_ovoxel(ov)
        outer, inner = _component_volumes(dv, df)
        assert outer > 0 and abs(outer - 4 / 3 * np.pi * 0.45 ** 3) < 0.02 * outer
        assert inner < 0 and abs(-inner - 4 / 3 * np.pi * 0.25 ** 3) < 0.03 * -inner


def test_torus_closed_outward():
    tv, tf = shapes.torus(n_u=120, n_v=60)
    ov = ox.encode_shape(tv, tf, 96)
    dv, df = ox.decode_ovoxel(ov)
    assert abs(signed_volume(dv, df) - signed_volume(tv, tf)) < 0.02 * signed_volume(tv, tf)
    # reversed source winding: a closed surface still faces outward
    ov2 = ox.encode_shape(tv, tf[:, [0, 2, 1]], 96)
    assert signed_volume(*ox.decode_ovoxel(ov2)) > 0


def test_sides_survive_npz_and_cli_decode_keeps_side(tmp_path):
    """The stored side goes through the .npz file; ``trellis2 ovoxel decode`` uses the same decoder."""
    from backend.mesh_io import load_mesh

    src = ASSETS / "two_sided_plane" / "TwoSidedPlane.gltf"
    mesh = load_mesh(str(src))
    n_src = _normals(mesh.vertices, mesh.faces)
    ov = ox.encode_mesh(mesh, 64, normalize=True, pbr=False)
    p = tmp_path / "plane.npz"
    ox.save(p, ov)
    back = ox.load(p)
    np.testing.assert_array_equal(back.sides, ov.sides)
    dv, df = ox.decode_ovoxel(back)
    ref = n_src.sum(0)
    assert _frac_along(dv, df, lambda c: np.tile(ref, (len(c), 1))) == 1.0


# ------------------------------------------------------------------------------------------------
# PBR attributes: no invented zeros, base-colour factors in linear space
def test_points_outside_every_voxel_get_the_nearest_voxel_not_zeros():
    coords = np.array([[10, 10, 10], [11, 10, 10], [30, 30, 30]], np.int32)
    attrs = np.array([[0.2, 0.3, 0.4, 0.0, 0.5, 1.0], [0.2, 0.3, 0.4, 0.0, 0.5, 1.0],
                      [0.9, 0.9, 0.9, 1.0, 0.1, 1.0]], np.float32)
    s = ox.AttributeSampler(coords, attrs, 64)
    far = ox.DEFAULT_AABB[0] + (np.array([[14.5, 10.5, 10.5], [29.0, 33.0, 30.5], [60.0, 60.0, 60.0]]) / 64)
    np.testing.assert_array_equal(s.sample(far)[:, 5], 0.0)            # official semantics: zeros
    near = s.sample(far, fallback="nearest")
    np.testing.assert_allclose(near, attrs[[1, 2, 2]])
    # the reported case: a hole-filling vertex outside every voxel (a sheet with one voxel missing; the
    # fill vertex sits on that voxel's centre, so all trilinear weight falls on the missing voxel)
    holed = _holed_sheet()
    dv, df = ox.decode_ovoxel(holed)
    fv, _ = ox.fill_small_holes(dv, df, 0.03)
    assert len(fv) == len(dv) + 1
    lone = ox.sample_attributes(holed.coords, holed.attrs, holed.resolution, holed.aabb, fv[len(dv):])
    assert lone[0, 5] == 0.0                                         # official semantics: invented zeros
    dec = ox.decode_asset(holed)                                    # the importer's and the CLI's decoder
    assert dec.faces.shape[0] > df.shape[0]                          # the hole was filled
    np.testing.assert_allclose(dec.attrs, np.tile(holed.attrs[0], (len(dec.attrs), 1)), atol=1e-6)
    assert np.isfinite(dec.normals).all() and np.allclose(np.linalg.norm(dec.normals, axis=1), 1, atol=1e-4)


def _holed_sheet() -> "ox.OVoxel":
    """A flat sheet through the centre of a voxel layer at R = 512 with one voxel knocked out, opaque."""
    R = 512
    z = -0.5 + 256.5 / R
    v = np.array([[-0.2, -0.2, z], [0.2, -0.2, z], [0.2, 0.2, z], [-0.2, 0.2, z]], np.float32)
    ov = ox.encode_shape(v, np.array([[0, 1, 2], [0, 2, 3]]), R)
    holed = ov.take(~((ov.coords[:, 0] == 256) & (ov.coords[:, 1] == 256)))
    holed.attrs = np.tile(np.array([0.2, 0.3, 0.4, 0.0, 0.5, 1.0], np.float32), (holed.num_voxels, 1))
    return holed


def _srgb_to_linear(c):
    c = np.asarray(c, np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def test_base_color_factor_round_trip_is_linear(tmp_path):
    """A glTF baseColorFactor (linear) comes back as the same linear colour (within 0.02), also with a
    texture (sRGB bytes x linear factor) and through the file + CLI decoder."""
    import json

    from backend.cli import main
    from backend.mesh_io import load_mesh

    v, f = shapes.uv_sphere(0.4, 24, 48)
    factor = np.array([0.604, 0.2, 0.05, 1.0])
    mesh = ox.MeshData(v, f, materials=[ox.Material(base_color_factor=factor, metallic_factor=0.3,
                                                    roughness_factor=0.7)])
    ov = ox.encode_mesh(mesh, 48)
    dec = ox.decode_asset(ov)
    lin = _srgb_to_linear(np.median(dec.attrs[:, :3], axis=0))
    np.testing.assert_allclose(lin, factor[:3], atol=0.02)
    np.testing.assert_allclose(np.median(dec.attrs[:, 3:5], axis=0), [0.3, 0.7], atol=0.02)
    # texture byte 188 (sRGB, 0.5029 linear) x factor 0.604 -> 0.3037 linear
    uv = np.full((v.shape[0], 2), 0.5, np.float32)
    tex = ox.Texture(np.full((4, 4, 3), 188, np.uint8))
    mesh_t = ox.MeshData(v, f, uvs=uv, materials=[ox.Material(base_color_texture=tex, base_color_factor=factor)])
    a = ox.voxelize_pbr(mesh_t, ov.coords, 48)
    np.testing.assert_allclose(_srgb_to_linear(np.median(a[:, 0])), _srgb_to_linear(188 / 255) * 0.604, atol=0.02)
    # through a file and `trellis2 ovoxel decode`: COLOR_0 (linear) equals the factor
    p = tmp_path / "f.npz"
    ox.save(p, ov)
    assert main(["ovoxel", "decode", str(p), "-o", str(tmp_path / "f.glb")]) == 0
    m = load_mesh(tmp_path / "f.glb")
    np.testing.assert_allclose(np.median(m.vertex_colors[:, :3], axis=0), factor[:3], atol=0.02)
    raw = (tmp_path / "f.glb").read_bytes()
    gl = json.loads(raw[20:20 + int.from_bytes(raw[12:16], "little")])
    prim = gl["meshes"][0]["primitives"][0]
    assert {"NORMAL", "COLOR_0", "_METALLIC", "_ROUGHNESS"} <= set(prim["attributes"])
    pbr = gl["materials"][0]["pbrMetallicRoughness"]
    assert abs(pbr["metallicFactor"] - 0.3) < 0.02 and abs(pbr["roughnessFactor"] - 0.7) < 0.02


def test_factor_only_fast_path_and_fast_npz(tmp_path):
    """Factor-only materials skip the per-pair work with the same result; the default .npz deflates
    everything but the float dual vertices and reads back exactly."""
    import zipfile

    v, f = shapes.uv_sphere(0.4, 24, 48)
    mat = ox.Material(base_color_factor=[0.3, 0.5, 0.7, 1.0], metallic_factor=0.2, roughness_factor=0.6)
    mesh = ox.MeshData(v, f, materials=[mat])
    ov = ox.encode_mesh(mesh, 48)
    fast = ox.voxelize_pbr(mesh, ov.coords, 48)
    slow, touched = ox.voxelize_pbr(mesh, ov.coords, 48, return_mask=True)   # the pair path
    assert touched.all()
    np.testing.assert_allclose(fast, slow, atol=1e-6)
    two = ox.MeshData(v, f, materials=[mat, ox.Material(base_color_factor=[1, 0, 0, 1])],
                      face_material=(np.arange(len(f)) % 2).astype(np.int32))
    a2 = ox.voxelize_pbr(two, ov.coords, 48)
    assert a2[:, 0].mean() > fast[:, 0].mean() + 0.1 and (a2[:, 0] >= fast[:, 0] - 1e-6).all()  # averaged
    p = tmp_path / "s.npz"
    ox.save(p, ov)
    with zipfile.ZipFile(p) as zf:
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
    assert kinds["vertices.npy"] == zipfile.ZIP_STORED and kinds["attrs.npy"] == zipfile.ZIP_DEFLATED
    back = ox.load(p)
    np.testing.assert_array_equal(back.dual_vertices, ov.dual_vertices)
    np.testing.assert_array_equal(back.attrs, ov.attrs)
    ox.save(p, ov, compress=0)
    np.testing.assert_array_equal(ox.load(p).coords, ov.coords)
