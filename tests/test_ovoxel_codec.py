"""O-Voxel codec: golden mesh extraction, encoder vs a brute-force reference, decoder properties,
robustness to bad input, file IO, sparse sampling and PBR voxelisation (small, fast cases)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend import ovoxel as ox
from backend.ovoxel import encode as E
from backend.ovoxel.meshutil import edge_stats, signed_volume
from backend.ovoxel.shapes import box, open_cylinder, uv_sphere

sys.path.insert(0, str(Path(__file__).parent))
from ovoxel_reference import random_mesh, reference_encode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# package hygiene
# ----------------------------------------------------------------------------------------------
def test_ovoxel_imports_numpy_only():
    code = ("import sys; import backend.ovoxel as o; import backend.ovoxel.cli; "
            "bad = [m for m in ('torch', 'scipy', 'trimesh', 'PIL') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, f"backend.ovoxel imported {r.stdout.strip()} {r.stderr[-500:]}"
    for p in (REPO / "backend" / "ovoxel").glob("*.py"):
        src = p.read_text()
        assert "import torch" not in src and "from torch" not in src, p


# ----------------------------------------------------------------------------------------------
# golden: official flexible_dual_grid_to_mesh
# ----------------------------------------------------------------------------------------------
def _golden(golden_dir):
    from safetensors.numpy import load_file

    return load_file(str(golden_dir / "case_fdg_mesh_sphere.safetensors"))


def test_golden_fdg_mesh_sphere_exact(golden_dir):
    t = _golden(golden_dir)
    c, dv, fl, sw = t["in.coords"], t["in.dual_vertices"], t["in.intersected"], t["in.split_weight"]
    for name, w in (("split", sw), ("nosplit", None)):
        v, f = ox.flexible_dual_grid_to_mesh(c, dv, fl, w, aabb=[[-0.5] * 3, [0.5] * 3], grid_size=64)
        assert f.dtype == np.int32 and v.dtype == np.float32
        np.testing.assert_array_equal(f, t[f"out.{name}_faces"])
        np.testing.assert_allclose(v, t[f"out.{name}_vertices"], atol=1e-6, rtol=0)
        v2, f2 = ox.decode_mesh(c, dv, fl, w, resolution=64, official=True)
        np.testing.assert_array_equal(f2, f)


def test_golden_handler_passes(golden_dir):
    from backend.golden import run_case

    rep = run_case(golden_dir, "fdg_mesh_sphere")
    assert rep.passed, rep.errors


def test_clean_decode_of_golden_sphere(golden_dir):
    t = _golden(golden_dir)
    c, dv, fl = t["in.coords"], t["in.dual_vertices"], t["in.intersected"]
    perm = np.random.default_rng(0).permutation(c.shape[0])
    for p in (np.arange(c.shape[0]), perm):
        v, f = ox.decode_mesh(c[p], dv[p], fl[p], resolution=64)
        es = edge_stats(f)
        assert es["boundary"] == 0 and es["nonmanifold"] == 0 and es["inconsistent"] == 0
        assert signed_volume(v, f) > 0
    # with gamma, clean mode = official faces up to winding of some quads
    sw = t["in.split_weight"]
    _, fo = ox.decode_mesh(c, dv, fl, sw, resolution=64, official=True)
    _, fc = ox.decode_mesh(c, dv, fl, sw, resolution=64, remove_unused=False)
    np.testing.assert_array_equal(np.sort(fo, axis=1), np.sort(fc, axis=1))


# ----------------------------------------------------------------------------------------------
# encoder vs brute-force reference (official semantics), including slab boundaries
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["random1", "random2", "sphere", "cylinder"])
def test_encoder_matches_bruteforce_reference(case, monkeypatch):
    if case.startswith("random"):
        v, f = random_mesh(10, seed=int(case[-1]))
        R = 10
    elif case == "sphere":
        v, f = uv_sphere(0.37, 12, 20, center=(0.013, -0.021, 0.017))
        R = 7
    else:
        v, f = open_cylinder(0.3, 0.6, 24, 6)
        R = 8
    ref = reference_encode(v, f, R)
    for cells in (1 << 23, 3 * (R + 1) ** 2):  # one slab / one x-plane per slab
        monkeypatch.setattr(E, "_SLAB_CELLS", cells)
        ov = ox.encode_shape(v, f, R)
        got = {tuple(c): (d, tuple(x)) for c, d, x in zip(ov.coords.tolist(), ov.dual_vertices, ov.intersected.astype(int).tolist())}
        assert set(got) == set(ref)
        for k, (x, flags, _) in ref.items():
            assert got[k][1] == flags, k
            np.testing.assert_allclose(got[k][0], x, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# decoder / round trip properties
# ----------------------------------------------------------------------------------------------
def test_sphere_roundtrip_closed_outward_and_accurate():
    v, f = uv_sphere(0.4, 60, 120)
    R = 96
    ov = ox.encode_shape(v, f, R)
    assert ov.coords.dtype == np.int32 and ov.dual_vertices.dtype == np.float32 and ov.intersected.dtype == bool
    assert (ov.dual_vertices >= 0).all() and (ov.dual_vertices <= 1).all()
    dv, df = ox.decode_ovoxel(ov)
    es = edge_stats(df)
    assert es["boundary"] == 0 and es["nonmanifold"] == 0 and es["inconsistent"] == 0
    vol = signed_volume(dv, df)
    assert vol > 0 and abs(vol - signed_volume(v, f)) / vol < 0.01
    r = np.linalg.norm(dv, axis=1)
    assert np.abs(r - 0.4).max() * R < 0.1
    # official mode: every quad faces -axis, all vertices kept
    vo, fo = ox.decode_ovoxel(ov, official=True)
    assert vo.shape[0] == ov.num_voxels and fo.shape == df.shape
    # Morton order output decodes to the same surface
    ovm = ox.encode_shape(v, f, R, order="morton")
    codes = ox.morton_encode(ovm.coords)
    assert (np.diff(codes) > 0).all()
    assert ovm.num_voxels == ov.num_voxels


def test_faces_on_grid_planes_stay_closed():
    R = 64
    v, f = box((-0.25, -0.25, -0.25), (0.25, 0.125, 0.3))  # faces exactly on grid planes
    ov = ox.encode_shape(v, f, R)
    dv, df = ox.decode_ovoxel(ov)
    es = edge_stats(df)
    assert es["boundary"] == 0 and es["nonmanifold"] == 0 and es["inconsistent"] == 0
    assert signed_volume(dv, df) > 0
    assert abs(signed_volume(dv, df) - 0.5 * 0.375 * 0.55) < 0.01


def test_open_sheet_stays_open_and_internal_structure_survives():
    R = 64
    # a slightly tilted open square sheet
    sheet_v = np.array([[-0.3, -0.3, 0.05], [0.3, -0.3, 0.08], [0.3, 0.3, 0.11], [-0.3, 0.3, 0.07]], np.float32)
    sheet_f = np.array([[0, 1, 2], [0, 2, 3]])
    ov = ox.encode_shape(sheet_v, sheet_f, R)
    _, df = ox.decode_ovoxel(ov)
    es = edge_stats(df)
    assert es["boundary"] > 0 and es["nonmanifold"] == 0 and es["inconsistent"] == 0
    # nested closed shells: a thick hollow sphere with a ball inside (candle-in-glass like)
    outer = uv_sphere(0.45, 40, 80)
    inner = uv_sphere(0.38, 40, 80)
    core = uv_sphere(0.15, 30, 60, center=(0.02, -0.03, 0.01))
    v = np.concatenate([outer[0], inner[0], core[0]])
    f = np.concatenate([outer[1], inner[1][:, ::-1] + outer[0].shape[0],
                        core[1] + outer[0].shape[0] + inner[0].shape[0]])
    ov = ox.encode_shape(v, f, R)
    dv, df = ox.decode_ovoxel(ov)
    es = edge_stats(df)
    assert es["boundary"] == 0 and es["inconsistent"] == 0
    r = np.linalg.norm(dv - np.array([0.02, -0.03, 0.01]), axis=1)
    assert (r < 0.2).sum() > 100, "the inner ball was lost"
    # orientation: total signed volume = outer - inner + core (cavity faces inward)
    expect = 4 / 3 * np.pi * (0.45 ** 3 - 0.38 ** 3 + 0.15 ** 3)
    assert abs(signed_volume(dv, df) - expect) / expect < 0.02


def test_split_rules():
    v, f = uv_sphere(0.4, 30, 60)
    ov = ox.encode_shape(v, f, 48)
    q = ox.decode_ovoxel(ov, remove_unused=False, orient=False)[1].reshape(-1, 6)
    qo = ox.decode_ovoxel(ov, official=True)[1].reshape(-1, 6)
    assert q.shape == qo.shape
    # official no-gamma rule = diagonal 0-2 nearly always; the normal rule picks both
    assert (qo[:, 2] == qo[:, 4]).mean() > 0.99
    d02 = (q[:, 2] == q[:, 4]).mean()
    assert 0.05 < d02 < 0.95
    # gamma rule: w0 w2 > w1 w3 -> split 1
    sw = np.ones((ov.num_voxels, 1), np.float32)
    _, f1 = ox.decode_ovoxel(ov.take(np.arange(ov.num_voxels)), official=True) if False else (None, None)
    ov2 = ox.OVoxel(resolution=48, aabb=ov.aabb, coords=ov.coords, dual_vertices=ov.dual_vertices,
                    intersected=ov.intersected, split_weight=sw * 2)
    _, fg = ox.decode_ovoxel(ov2, official=True)
    assert (fg.reshape(-1, 6)[:, 2] == fg.reshape(-1, 6)[:, 4]).mean() < 0.01  # ties -> split 2


def test_unwelded_mesh_equals_welded():
    v, f = uv_sphere(0.4, 20, 40)
    soup_v = v[f.reshape(-1)]
    soup_f = np.arange(soup_v.shape[0]).reshape(-1, 3)
    a = ox.encode_shape(v, f, 48)
    b = ox.encode_shape(soup_v, soup_f, 48)
    assert b.meta["encode_stats"]["boundary_edges"] == 0
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.dual_vertices, b.dual_vertices, atol=1e-6)
    c = ox.encode_shape(soup_v, soup_f, 48, weld=False)
    assert c.meta["encode_stats"]["boundary_edges"] > 0


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_inputs():
    v, f = uv_sphere(0.4, 12, 24)
    # NaN / inf vertices: their faces are dropped and counted, output finite
    vb = v.copy()
    vb[5] = np.nan
    vb[7] = np.inf
    ov = ox.encode_shape(vb, f, 32)
    st = ov.meta["encode_stats"]
    assert st["dropped_nonfinite"] > 0 and np.isfinite(ov.dual_vertices).all() and ov.num_voxels > 0
    # a lone triangle with a NaN vertex (the official boundary walk never terminates)
    ov = ox.encode_shape(np.array([[0, 0, 0], [0.1, 0, 0], [np.nan, 0.1, 0]]), np.array([[0, 1, 2]]), 32)
    assert ov.num_voxels == 0
    # degenerate and duplicate faces are dropped and counted
    fd = np.concatenate([f, f[:3], f[:2, ::-1], [[0, 0, 1]], [[1, 2, 2]]])
    vd = np.concatenate([v, [[0.0, 0.0, 0.0], [0.1, 0.1, 0.1], [0.2, 0.2, 0.2]]])
    fd = np.concatenate([fd, [[v.shape[0], v.shape[0] + 1, v.shape[0] + 2]]])  # collinear
    st = ox.encode_shape(vd, fd, 32).meta["encode_stats"]
    assert st["dropped_duplicate"] == 5 and st["dropped_degenerate"] == 3
    # empty mesh -> empty O-Voxel, decodes to an empty mesh
    e = ox.encode_shape(np.zeros((0, 3)), np.zeros((0, 3), int), 32)
    assert e.num_voxels == 0
    ev, ef = ox.decode_ovoxel(e)
    assert ev.shape == (0, 3) and ef.shape == (0, 3)
    with pytest.raises(ox.OVoxelError, match="out of range"):
        ox.encode_shape(v, f + 1000, 32)
    with pytest.raises(ox.OVoxelError, match="out of range"):
        ox.encode_shape(v, f - 1, 32)
    with pytest.raises(ox.OVoxelError, match="shape"):
        ox.encode_shape(v, f[:, :2], 32)
    with pytest.raises(ox.OVoxelError, match="outside the AABB"):
        ox.encode_shape(v * 2, f, 32)
    clipped = ox.encode_shape(v * 2, f, 32, outside="clip")
    assert clipped.num_voxels > 0 and clipped.coords.max() < 32 and clipped.coords.min() >= 0
    with pytest.raises(ox.OVoxelError, match="max_memory"):
        ox.encode_shape(v * 1.2, f, 4096, max_memory=1 << 30)
    with pytest.raises(ox.OVoxelError):
        ox.encode_shape(v, f, 0)
    with pytest.raises(ox.OVoxelError):
        ox.encode_shape(v, f, 32, aabb=[[0, 0, 0], [0, 1, 1]])
    # decoder input validation
    with pytest.raises(ox.OVoxelError):
        ox.decode_mesh(np.array([[0, 0, 70]]), np.zeros((1, 3)), np.zeros((1, 3), bool), resolution=64)
    with pytest.raises(ox.OVoxelError):
        ox.decode_mesh(np.zeros((2, 3)), np.full((2, 3), np.nan), np.zeros((2, 3), bool), resolution=64)


def test_normalize_vertices_handles_degenerate_extent():
    v = np.array([[0, 0, 0], [2, 0, 0], [2, 0, 2], [np.nan, 1, 1]], np.float32)
    n, c, s = ox.normalize_vertices(v)
    assert np.isfinite(n[:3]).all() and np.abs(n[:3]).max() <= 0.5
    n1, _, s1 = ox.normalize_vertices(np.ones((3, 3)))
    assert s1 == 1.0 and np.allclose(n1, 0)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def test_npz_roundtrip_and_validation(tmp_path):
    v, f = uv_sphere(0.4, 16, 32)
    ov = ox.encode_shape(v, f, 32)
    ov.attrs = np.random.default_rng(0).random((ov.num_voxels, 6)).astype(np.float32)
    ov.split_weight = np.random.default_rng(1).random((ov.num_voxels, 1)).astype(np.float32)
    p = tmp_path / "a.npz"
    ox.save_npz(p, ov)
    b = ox.load_npz(p)
    assert b.resolution == 32 and np.array_equal(b.aabb, ov.aabb)
    for k in ("coords", "dual_vertices", "intersected", "attrs", "split_weight"):
        np.testing.assert_array_equal(getattr(b, k), getattr(ov, k))
    assert b.meta["encode_stats"]["voxels"] == ov.num_voxels
    q = tmp_path / "q.npz"
    ox.save_npz(q, ov, quantize=True)
    c = ox.load_npz(q)
    np.testing.assert_allclose(c.dual_vertices, np.floor(ov.dual_vertices * 255) / 255, atol=1e-6)
    assert np.abs(c.attrs - ov.attrs).max() <= 0.5 / 255 + 1e-6
    with np.load(q) as z:
        assert z["coord"].dtype == np.uint16 and z["vertices"].dtype == np.uint8
        assert z["intersected"].shape == (ov.num_voxels, 1) and int(z["format_version"]) == ox.FORMAT_VERSION
    # validation
    bad = tmp_path / "bad.npz"
    np.savez(bad, coord=np.zeros((2, 3), np.uint16), vertices=np.zeros((2, 3), np.uint8),
             intersected=np.zeros((2, 1), np.uint8))
    with pytest.raises(ox.OVoxelError, match="resolution"):
        ox.load_npz(bad)
    arrays = dict(np.load(p))
    arrays["format_version"] = np.array(99)
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(ox.OVoxelError, match="format_version"):
        ox.load_npz(tmp_path / "v99.npz")
    arrays["format_version"] = np.array(1)
    arrays["coord"] = arrays["coord"][:-1]
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(ox.OVoxelError):
        ox.load_npz(tmp_path / "short.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ox.OVoxelError):
        ox.load_npz(tmp_path / "junk.npz")


def test_vxz_roundtrip(tmp_path):
    v, f = uv_sphere(0.4, 16, 32)
    ov = ox.encode_shape(v, f, 64)
    ov.attrs = np.random.default_rng(0).random((ov.num_voxels, 6)).astype(np.float32)
    for comp in ("lzma", "deflate", "none"):
        p = tmp_path / f"a_{comp}.vxz"
        ox.save_vxz(p, ov, compression=comp, chunk_size=32)
        b = ox.load_vxz(p)
        assert b.resolution == 64
        o1 = ov.sorted("lex")
        o2 = b.sorted("lex")
        np.testing.assert_array_equal(o1.coords, o2.coords)
        np.testing.assert_array_equal(o1.intersected, o2.intersected)
        np.testing.assert_allclose(o2.dual_vertices, np.floor(o1.dual_vertices * 255) / 255, atol=1e-6)
        assert np.abs(o2.attrs - o1.attrs).max() <= 1 / 255 + 1e-6


# ----------------------------------------------------------------------------------------------
# sampling and PBR
# ----------------------------------------------------------------------------------------------
def test_sample_attributes_trilinear_and_renormalised():
    R = 16
    g = np.stack(np.meshgrid(*[np.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    aabb = np.array([[-0.5] * 3, [0.5] * 3])
    centers = aabb[0] + (g + 0.5) / R
    lin = (centers @ np.array([1.0, -2.0, 0.5]) + 0.3)[:, None].astype(np.float32)
    pts = np.random.default_rng(0).uniform(-0.45, 0.45, (500, 3))
    got = ox.sample_attributes(g, lin, R, aabb, pts)[:, 0]
    np.testing.assert_allclose(got, pts @ np.array([1.0, -2.0, 0.5]) + 0.3, atol=1e-5)
    # missing neighbours: renormalised over the present ones; nothing present -> 0
    keep = g[:, 0] < 8
    const = np.full((keep.sum(), 2), 0.7, np.float32)
    s = ox.AttributeSampler(g[keep], const, R, aabb)
    p = np.array([[7.9 / R - 0.5 + 0.5 / R, 0.0, 0.0], [0.45, 0.0, 0.0], [np.nan, 0, 0]])
    out = s.sample(p)
    np.testing.assert_allclose(out[0], 0.7, atol=1e-6)
    assert (out[1] == 0).all() and (out[2] == 0).all()


def test_voxelize_pbr_texture_factors_alpha_and_vertex_colors():
    # a square in the plane z = 0.013 with a 2x2 texture (glTF uv: v = 0 at the top row)
    v = np.array([[-0.4, -0.4, 0.013], [0.4, -0.4, 0.013], [0.4, 0.4, 0.013], [-0.4, 0.4, 0.013]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], np.float32)
    img = np.zeros((2, 2, 4), np.uint8)
    img[0, 0] = (255, 0, 0, 255)    # top-left: red
    img[0, 1] = (0, 255, 0, 255)    # top-right: green
    img[1, 0] = (0, 0, 255, 40)     # bottom-left: blue, transparent
    img[1, 1] = (255, 255, 255, 255)
    mr = np.zeros((1, 1, 3), np.uint8)
    mr[0, 0] = (0, 128, 255)        # roughness G = 0.5, metallic B = 1
    tex = ox.Texture(img, wrap_s="CLAMP", wrap_t="CLAMP", filter="nearest")
    mat = ox.Material(base_color_texture=tex, base_color_factor=[1, 1, 1, 1], metallic_factor=0.5,
                      roughness_factor=1.0, metallic_roughness_texture=ox.Texture(mr), alpha_mode="MASK",
                      alpha_cutoff=0.5)
    mesh = ox.MeshData(v, f, uvs=uv, materials=[mat], face_material=np.zeros(2, np.int32))
    ov = ox.encode_mesh(mesh, 32)
    a = ov.attrs
    assert a.shape == (ov.num_voxels, 6) and a.dtype == np.float32
    world = ov.aabb[0] + (ov.coords + 0.5) / 32
    # voxels over the bottom-left quadrant of the square (uv (0, 0) is at v3 = (-0.4, 0.4))
    q_red = (world[:, 0] < -0.1) & (world[:, 1] > 0.1)
    q_blue = (world[:, 0] < -0.1) & (world[:, 1] < -0.1)
    np.testing.assert_allclose(a[q_red, :3].mean(0), [1, 0, 0], atol=0.02)
    np.testing.assert_allclose(a[q_blue, :3].mean(0), [0, 0, 1], atol=0.02)
    np.testing.assert_allclose(a[:, 3], 0.5, atol=1e-6)     # metallic = B * factor
    np.testing.assert_allclose(a[:, 4], 128 / 255, atol=1e-6)  # roughness = G * factor
    assert a[q_blue, 5].max() == 0 and a[q_red, 5].min() == 1  # MASK cutoff
    # BLEND keeps the alpha value; OPAQUE forces 1; vertex colours (linear) multiply in sRGB
    mat.alpha_mode = "BLEND"
    a2 = ox.voxelize_pbr(mesh, ov.coords, 32)
    np.testing.assert_allclose(a2[q_blue, 5].mean(), 40 / 255, atol=0.01)
    mat.alpha_mode = "OPAQUE"
    mesh.vertex_colors = np.tile(np.array([[0.2140, 0.2140, 0.2140, 1.0]], np.float32), (4, 1))  # sRGB 0.5
    a3 = ox.voxelize_pbr(mesh, ov.coords, 32)
    np.testing.assert_allclose(a3[q_red, 0].mean(), 0.5, atol=0.01)
    assert (a3[:, 5] == 1).all()
    # faces without material get the toolkit default, untouched voxels are filled
    plain = ox.MeshData(v, f)
    extra = np.concatenate([ov.coords, [[0, 0, 0]]])
    a4, touched = ox.voxelize_pbr(plain, extra, 32, return_mask=True)
    np.testing.assert_allclose(a4[:-1], np.tile([0.8, 0.8, 0.8, 0.0, 0.5, 1.0], (ov.num_voxels, 1)), atol=1e-6)
    assert touched[:-1].all() and not touched[-1]


def test_component_labelling_numpy_fallback_matches():
    """decode's patch labelling uses scipy when present and a numpy union-find otherwise (Blender)."""
    from backend.ovoxel import decode as D

    rng = np.random.default_rng(0)
    n = 3000
    i, j = rng.integers(0, n, 2500), rng.integers(0, n, 2500)
    a, b = D._components(n, i, j), D._components_numpy(n, i, j)
    mapping = {}
    assert all(mapping.setdefault(x, y) == y for x, y in zip(a.tolist(), b.tolist()))
    assert len(set(a.tolist())) == len(set(b.tolist()))


def test_big_triangle_path_and_threads(monkeypatch):
    """Triangles with huge voxel boxes use a sort-based pair dedup: same result as the table path;
    concurrent encodes in threads give identical results."""
    from concurrent.futures import ThreadPoolExecutor

    v, f = box((-0.31, -0.27, -0.22), (0.33, 0.29, 0.26))
    ref = ox.encode_shape(v, f, 48)
    monkeypatch.setattr(E, "_BIG_TRI_CELLS", 8)
    big = ox.encode_shape(v, f, 48)
    np.testing.assert_array_equal(ref.coords, big.coords)
    np.testing.assert_array_equal(ref.intersected, big.intersected)
    np.testing.assert_allclose(ref.dual_vertices, big.dual_vertices, atol=1e-6)
    monkeypatch.setattr(E, "_BIG_TRI_CELLS", 1 << 16)
    sv, sf = uv_sphere(0.4, 20, 40)
    with ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(lambda a: ox.encode_shape(*a), [(sv, sf, 40), (v, f, 48)] * 2))
    np.testing.assert_array_equal(outs[0].dual_vertices, outs[2].dual_vertices)
    np.testing.assert_array_equal(outs[1].dual_vertices, ref.dual_vertices)


def test_parallel_slabs_give_identical_result(monkeypatch):
    """Slabs encoded on several worker threads give bit-identical output to one thread, in any slab
    order; thread counts are validated; the memory budget caps the workers."""
    v, f = uv_sphere(0.41, 24, 48, center=(0.011, -0.017, 0.023))
    monkeypatch.setattr(E, "_SLAB_CELLS", 3 * 65 ** 2)  # one x-plane per slab: 64 slabs
    one = ox.encode_shape(v, f, 64, threads=1)
    assert one.meta["encode_stats"]["threads"] == 1
    for n in (2, 5):
        many = ox.encode_shape(v, f, 64, threads=n)
        assert many.meta["encode_stats"]["threads"] == n
        np.testing.assert_array_equal(many.coords, one.coords)
        np.testing.assert_array_equal(many.dual_vertices, one.dual_vertices)
        np.testing.assert_array_equal(many.intersected, one.intersected)
    monkeypatch.setenv("TRELLIS_ENCODE_THREADS", "3")
    assert ox.encode_shape(v, f, 64).meta["encode_stats"]["threads"] == 3
    monkeypatch.setenv("TRELLIS_ENCODE_THREADS", "many")
    with pytest.raises(ox.OVoxelError, match="TRELLIS_ENCODE_THREADS"):
        ox.encode_shape(v, f, 64)
    monkeypatch.delenv("TRELLIS_ENCODE_THREADS")
    with pytest.raises(ox.OVoxelError, match="threads"):
        ox.encode_shape(v, f, 64, threads=0)
    assert E._encode_workers(8, 100, 1e6, spare_bytes=0) == 1
    assert E._encode_workers(8, 3, 1e6, spare_bytes=1 << 40) == 3


def test_fill_small_holes_closes_short_loops_with_consistent_winding():
    from backend.ovoxel.meshutil import edge_stats, signed_volume

    v, f = uv_sphere(0.3, 24, 48)
    assert ox.fill_small_holes(v, f, 0.03) == (v, f)              # closed: untouched, same objects
    vol = signed_volume(v, f)
    keep = np.ones(len(f), bool)
    keep[np.random.default_rng(0).choice(len(f), 30, replace=False)] = False
    fh = f[keep]
    holes = edge_stats(fh)["boundary"]
    v2, f2 = ox.fill_small_holes(v, fh, 0.5)
    st = edge_stats(f2)
    assert st["inconsistent"] == 0 and st["nonmanifold"] == 0
    assert 0 <= st["boundary"] < holes / 5                         # loops through a shared vertex stay open
    assert len(v2) - len(v) == (len(f2) - len(fh)) // 3 > 0 or len(f2) > len(fh)
    assert np.array_equal(v2[:len(v)], v) and np.array_equal(f2[:len(fh)], fh)   # additions only
    assert abs(signed_volume(v2, f2) - vol) < 0.01 * vol
    assert ox.fill_small_holes(v, fh, 1e-6)[1] is fh               # nothing that short
    # a big opening (open cylinder rims, perimeter 2·π·0.3 ≈ 1.9) is closed only when asked for
    cv, cf = open_cylinder(0.3, 0.6, 24, 6)
    assert ox.fill_small_holes(cv, cf, 0.03)[1] is cf
    cv2, cf2 = ox.fill_small_holes(cv, cf, 2.0)
    assert edge_stats(cf2)["boundary"] == 0 and len(cv2) == len(cv) + 2
    assert edge_stats(cf2)["inconsistent"] == 0


def test_pipeline_mesh_extraction_paths_agree_and_fill_holes(golden_dir):
    """The CUDA path (kernels.extract_mesh, run here on CPU tensors) gives the codec's mesh; the
    pipeline's hole filling only adds faces."""
    import torch

    from backend.ovoxel.meshutil import edge_stats
    from backend.pipelines.pipeline import extract_mesh_on, fdg_to_mesh

    v, f = uv_sphere(0.37, 16, 32)
    ov = ox.encode_shape(v, f, 48)
    keep = np.ones(len(ov.coords), bool)
    keep[::97] = False                                                # knock out voxels: holes
    c, d, x = ov.coords[keep], ov.dual_vertices[keep], ov.intersected[keep]
    g = np.random.default_rng(1).random((len(c), 1)).astype(np.float32)
    ref_v, ref_f = ox.decode_mesh(c, d, x, g, resolution=48)
    kv, kf = extract_mesh_on(torch.device("cpu"), c, d, x, g, 48)
    np.testing.assert_array_equal(kf, ref_f)
    np.testing.assert_allclose(kv, ref_v, atol=1e-6)
    pv, pf = fdg_to_mesh(c, d, x, g, 48, fill_holes=0.0)
    np.testing.assert_array_equal(pf, ref_f)
    hv, hf = fdg_to_mesh(c, d, x, g, 48, fill_holes=0.3)   # 0.03 (official) is ~1.4 voxels at R=48
    assert np.array_equal(hf[:len(pf)], pf) and len(hf) > len(pf)
    assert edge_stats(hf)["boundary"] < edge_stats(pf)["boundary"]


def test_bfs_parity_matches_a_plain_breadth_first_colouring():
    """The vectorised 2-colouring of the winding repair equals the greedy BFS it replaced (largest node
    of each component first), on random graphs with odd cycles and isolated nodes."""
    from backend.ovoxel.decode import _bfs_parity

    rng = np.random.default_rng(3)
    for n, m in ((1, 0), (40, 30), (300, 420), (2000, 1500)):
        ea = rng.integers(0, n, m)
        eb = rng.integers(0, n, m)
        size = rng.integers(1, 6, n)
        adj = [[] for _ in range(n)]
        for x, y in zip(ea.tolist(), eb.tolist()):
            adj[x].append(y)
            adj[y].append(x)
        ref = np.full(n, -1, np.int8)
        for start in np.argsort(-size, kind="stable").tolist():
            if ref[start] >= 0:
                continue
            ref[start] = 0
            queue = [start]
            while queue:
                nxt = []
                for x in queue:
                    for y in adj[x]:
                        if ref[y] < 0:
                            ref[y] = 1 - ref[x]
                            nxt.append(y)
                queue = nxt
        np.testing.assert_array_equal(_bfs_parity(n, ea, eb, size), ref)
