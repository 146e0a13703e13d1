"""Real assets (../shared/assets/meshes): loading with materials, mesh -> O-Voxel -> mesh round trips
(Chamfer / F1 against the input surface, point-to-triangle), open sheets, internal structure, PBR."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from backend import ovoxel as ox
from backend.mesh_io import load_mesh
from backend.ovoxel.meshutil import edge_stats, sample_surface
from benchmarks.assets import ASSETS

sys.path.insert(0, str(Path(__file__).parent))
from ovoxel_metrics import SurfaceDistance, roundtrip_metrics  # noqa: E402

# assets whose round trip is held to Chamfer <= 0.006 voxel and F1@0.5 >= 0.999 at R = 256
HELD_256 = ("spot", "barrel", "water_bottle", "alpha_blend", "two_sided_plane", "metal_rough_spheres")
# parts thinner than a voxel at R = 256 (reported, not held): the candle holder's glass wall is ~1
# voxel thick, petals/leaves, the toy car's thin parts, the cloth's sub-voxel wrinkles
REPORTED_256 = ("vase_flowers", "sheen_cloth", "candle_holder", "toy_car")

_CACHE: dict = {}


def _mesh(shared_dir, name):
    if name not in _CACHE:
        p = shared_dir / "assets" / "meshes" / ASSETS[name]
        tex = p.parent / "spot_texture.png" if name == "spot" else None
        _CACHE[name] = load_mesh(p, base_color_texture=tex)
    return _CACHE[name]


def _roundtrip(shared_dir, name, R):
    key = (name, R)
    if key not in _CACHE:
        m = _mesh(shared_dir, name)
        v, _, _ = ox.normalize_vertices(m.vertices)
        ov = ox.encode_shape(v, m.faces, R)
        dv, df = ox.decode_ovoxel(ov)
        _CACHE[key] = (v, m.faces, ov, dv, df)
    return _CACHE[key]


def test_every_asset_loads_with_materials(shared_dir):
    expect_textured = {"barrel", "water_bottle", "alpha_blend", "vase_flowers", "sheen_cloth", "candle_holder",
                       "toy_car", "two_sided_plane", "spot"}
    for name in ASSETS:
        m = _mesh(shared_dir, name)
        assert m.num_faces > 0 and np.isfinite(m.vertices).all()
        assert m.face_material is not None and m.face_material.shape[0] == m.num_faces
        if name in expect_textured:
            assert m.uvs is not None
            assert any(mat.base_color_texture is not None for mat in m.materials), name
    ab = _mesh(shared_dir, "alpha_blend")
    modes = {(mm.alpha_mode, round(mm.alpha_cutoff, 2)) for mm in ab.materials}
    assert {("BLEND", 0.5), ("MASK", 0.25), ("MASK", 0.5), ("MASK", 0.75), ("OPAQUE", 0.5)} <= modes
    cloth = _mesh(shared_dir, "sheen_cloth")
    xf = cloth.materials[0].base_color_texture.uv_transform
    assert xf is not None and np.allclose(np.diag(xf)[:2], [30, -30])  # KHR_texture_transform
    mrs = _mesh(shared_dir, "metal_rough_spheres")
    assert len(mrs.materials) == 98 and mrs.num_faces == 1_040_409
    wb = _mesh(shared_dir, "water_bottle")
    assert wb.materials[0].metallic_roughness_texture.image.shape[2] >= 3  # packed ORM


@pytest.mark.parametrize("name", HELD_256 + REPORTED_256)
def test_roundtrip_256(shared_dir, name):
    R = 256
    v, f, ov, dv, df = _roundtrip(shared_dir, name, R)
    met = roundtrip_metrics(v, f, dv, df, 1.0 / R, n=8_000)
    print(f"\n{name} R={R}: voxels={ov.num_voxels} " + " ".join(f"{k}={x:.4g}" for k, x in met.items())
          + f" edges={edge_stats(df)}")
    assert edge_stats(df)["inconsistent"] == 0
    if name in HELD_256:
        assert met["chamfer"] <= 0.006 and met["f1"] >= 0.999, met
    else:  # thin parts: reported; still a sane reconstruction
        assert met["chamfer"] <= 0.05 and met["f1"] >= 0.99, met


@pytest.mark.parametrize("name", ["spot"])
def test_roundtrip_512(shared_dir, name):
    R = 512
    v, f, ov, dv, df = _roundtrip(shared_dir, name, R)
    met = roundtrip_metrics(v, f, dv, df, 1.0 / R, n=8_000)
    print(f"\n{name} R={R}: voxels={ov.num_voxels} " + " ".join(f"{k}={x:.4g}" for k, x in met.items()))
    assert met["chamfer"] <= 0.006 and met["f1"] >= 0.999, met


def test_closed_assets_outward_and_sheet_open(shared_dir):
    from backend.ovoxel.meshutil import signed_volume

    for name in ("spot", "barrel"):
        v, f, ov, dv, df = _roundtrip(shared_dir, name, 256)
        es = edge_stats(df)
        assert signed_volume(dv, df) > 0.9 * signed_volume(v, f) > 0
        assert es["inconsistent"] == 0
    v, f, ov, dv, df = _roundtrip(shared_dir, "sheen_cloth", 256)
    assert edge_stats(df)["boundary"] > 500  # the cloth keeps its open border


def test_candle_inside_glass_survives(shared_dir):
    v, f, ov, dv, df = _roundtrip(shared_dir, "candle_holder", 256)
    m = _mesh(shared_dir, "candle_holder")
    opaque = [i for i, mm in enumerate(m.materials) if "opaque" in mm.name.lower()]
    sel = np.isin(m.face_material, opaque)
    # candle + wick: the opaque faces enclosed by the glass chimney (radius below the chimney's inner wall)
    vv = v[m.faces[sel]].mean(1)
    inner = np.linalg.norm(vv[:, [0, 2]], axis=1) < 0.2
    inner &= vv[:, 1] > -0.15
    assert inner.sum() > 50
    pts, _ = sample_surface(v, m.faces[sel][inner], 5000, seed=4)
    d = SurfaceDistance(dv, df, 1.5 / 256).distance(pts) * 256
    assert np.quantile(d, 0.99) < 0.5, "candle/wick inside the glass lost"


def test_pbr_barrel_and_metal_rough_spheres(shared_dir):
    R = 128
    # barrel: base colour of the voxels vs the texture at the surface (reported and bounded)
    m = _mesh(shared_dir, "barrel")
    v, c, s = ox.normalize_vertices(m.vertices)
    mn = m.transformed(1.0, np.zeros(3))
    mn.vertices = v
    ov = ox.encode_mesh(mn, R)
    pts, fi = sample_surface(v, m.faces, 20_000, seed=5)
    # reference base colour at the sample points
    F = m.faces[fi].astype(np.int64)
    a, b, cc = (v[F[:, k]].astype(np.float64) for k in range(3))
    e1, e2, w = b - a, cc - a, pts - a
    d00, d01, d11 = (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)
    d20, d21 = (w * e1).sum(1), (w * e2).sum(1)
    den = d00 * d11 - d01 * d01
    bv = (d11 * d20 - d01 * d21) / den
    bw = (d00 * d21 - d01 * d20) / den
    uv = (1 - bv - bw)[:, None] * m.uvs[F[:, 0]] + bv[:, None] * m.uvs[F[:, 1]] + bw[:, None] * m.uvs[F[:, 2]]
    from backend.ovoxel.pbr import sample_texture

    ref = sample_texture(m.materials[0].base_color_texture, uv)[:, :3]
    got = ox.sample_attributes(ov.coords, ov.attrs[:, :3], R, ov.aabb, pts)
    err = np.abs(got - ref).mean()
    print(f"\nbarrel R={R}: base colour mean abs error {err:.4f}")
    assert err < 0.06
    # metal/rough spheres: per-sphere metallic / roughness factors survive voxelisation
    m = _mesh(shared_dir, "metal_rough_spheres")
    v, _, _ = ox.normalize_vertices(m.vertices)
    mn = m.transformed(1.0, np.zeros(3))
    mn.vertices = v
    R = 64
    ov = ox.encode_mesh(mn, R)
    sampler = ox.AttributeSampler(ov.coords, ov.attrs, R, ov.aabb)
    fm = m.face_material
    errs = []
    for mi in range(0, 98, 7):
        sel = np.flatnonzero(fm == mi)
        pts, _ = sample_surface(v, m.faces[sel], 200, seed=mi)
        got = np.median(sampler.sample(pts), axis=0)
        mat = m.materials[mi]
        errs.append(abs(got[3] - mat.metallic_factor))
        errs.append(abs(got[4] - mat.roughness_factor))
    print(f"metal/rough spheres R={R}: max |median - factor| = {max(errs):.4f}")
    assert max(errs) < 0.05, errs
