"""Mesh → O-Voxel encode on torch (kernels.ovoxel_encode) vs the numpy codec (backend.ovoxel.encode_shape).

Parity = same voxels in the same (lexicographic) order, identical ``intersected`` flags, dual vertices
within 1e-5 voxel, same drop/edge/crossing counters. CPU torch here; the CUDA case runs where a GPU is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backend import ovoxel as ox
from backend.ovoxel import encode as E
from backend.ovoxel.shapes import box, open_cylinder, uv_sphere
from kernels import ovoxel_encode as K
from kernels.ovoxel_encode import encode_shape_torch

sys.path.insert(0, str(Path(__file__).parent))
from ovoxel_reference import random_mesh, reference_encode  # noqa: E402

@pytest.fixture(autouse=True)
def _one_torch_thread():
    """CPU torch on a small shared machine: intra-op threads only add contention at these sizes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_STAT_KEYS = ("input_vertices", "input_faces", "dropped_nonfinite", "dropped_degenerate", "dropped_duplicate",
              "resolution", "faces", "vertices", "vertices_outside_aabb", "dropped_outside", "estimated_crossings",
              "boundary_edges", "nonmanifold_edges", "crossings", "voxels")


def _assert_parity(a: ox.OVoxel, b: ox.OVoxel, atol: float = 1e-5, dual: bool = True) -> None:
    assert b.resolution == a.resolution
    np.testing.assert_array_equal(b.aabb, a.aabb)
    assert b.coords.dtype == np.int32 and b.dual_vertices.dtype == np.float32 and b.intersected.dtype == bool
    np.testing.assert_array_equal(b.coords, a.coords)
    np.testing.assert_array_equal(b.intersected, a.intersected)
    np.testing.assert_array_equal(b.sides, a.sides)     # the source side of every flagged edge
    if dual:
        np.testing.assert_allclose(b.dual_vertices, a.dual_vertices, rtol=0, atol=atol)
    sa, sb = a.meta["encode_stats"], b.meta["encode_stats"]
    for k in _STAT_KEYS:
        assert sa.get(k) == sb.get(k), k


def _both(v, f, R, aabb=E.DEFAULT_AABB, device="cpu", budget=None, **kw):
    """(numpy codec, torch port); ``budget`` = the torch port's super-slab byte budget."""
    return (ox.encode_shape(v, f, R, aabb, **kw),
            encode_shape_torch(v, f, R, aabb, device=device, max_memory=budget, **kw))


def _case(name):
    if name.startswith("random"):
        v, f = random_mesh(10, seed=int(name[-1]))
        return v, f, 10
    if name == "sphere":
        v, f = uv_sphere(0.37, 12, 20, center=(0.013, -0.021, 0.017))
        return v, f, 7
    v, f = open_cylinder(0.3, 0.6, 24, 6)
    return v, f, 8


@pytest.mark.parametrize("name", ["random1", "random2", "sphere", "cylinder"])
def test_bruteforce_cases_match_numpy_and_reference(name, monkeypatch):
    """The codec tests' brute-force cases; also with one x-plane per numpy slab and one per super-slab."""
    v, f, R = _case(name)
    ref = reference_encode(v, f, R)
    for cells in (1 << 23, 3 * (R + 1) ** 2):
        monkeypatch.setattr(E, "_SLAB_CELLS", cells)
        for budget in (None, 1):  # one super-slab / every numpy slab on its own
            a, b = _both(v, f, R, budget=budget)
            _assert_parity(a, b)
            got = {tuple(c): (d, tuple(x)) for c, d, x in
                   zip(b.coords.tolist(), b.dual_vertices, b.intersected.astype(int).tolist())}
            assert set(got) == set(ref)
            for k, (x, flags, _) in ref.items():
                assert got[k][1] == flags
                np.testing.assert_allclose(got[k][0], x, atol=1e-6)


def test_sphere_20k_triangles_r128():
    v, f = uv_sphere(0.45, 71, 142)
    assert 19_000 < f.shape[0] < 21_000
    a, b = _both(v, f, 128)
    assert a.num_voxels > 50_000
    _assert_parity(a, b)
    # several super-slabs give the same result
    c = encode_shape_torch(v, f, 128, device="cpu", max_memory=4 << 20)
    assert c.meta["encode_stats"]["super_slabs"] > 2
    _assert_parity(a, c)


def test_open_mesh_boundary_term():
    v, f = open_cylinder(0.3, 0.7, 90, 20)
    a, b = _both(v, f, 40)
    assert a.meta["encode_stats"]["boundary_edges"] > 0
    _assert_parity(a, b)
    sheet_v = np.array([[-0.3, -0.3, 0.05], [0.3, -0.3, 0.08], [0.3, 0.3, 0.11], [-0.3, 0.3, 0.07]], np.float32)
    sheet_f = np.array([[0, 1, 2], [0, 2, 3]])
    a, b = _both(sheet_v, sheet_f, 64)
    _assert_parity(a, b)
    # without the boundary term
    a, b = _both(v, f, 40, boundary_weight=0.0)
    _assert_parity(a, b)


def test_faces_on_grid_planes():
    v, f = box((-0.25, -0.25, -0.25), (0.25, 0.125, 0.3))
    a, b = _both(v, f, 64)
    _assert_parity(a, b)
    # big triangles spanning many slabs, slab boundaries on the faces
    v, f = box((-0.3125, -0.25, -0.5), (0.3125, 0.25, 0.5))
    a, b = _both(v, f, 32)
    _assert_parity(a, b)


def test_degenerate_duplicate_nonfinite_faces():
    v, f = uv_sphere(0.4, 14, 28)
    v = np.concatenate([v, [[np.nan, 0, 0], [0.1, 0.1, 0.1], [np.inf, 1, 1]]]).astype(np.float32)
    n = v.shape[0]
    f = np.concatenate([
        f,
        f[:7],                       # duplicates
        f[7:10, ::-1],               # duplicates, other winding
        [[n - 3, 0, 1], [2, n - 1, 3]],  # non-finite vertices
        [[0, 0, 1], [4, 5, 4]],      # repeated vertex
        [[n - 2, n - 2, n - 2]],
    ])
    # zero area: a collinear triangle on existing vertices
    v = np.concatenate([v, [[0.0, 0.0, 0.0], [0.05, 0.05, 0.05], [0.1, 0.1, 0.1]]]).astype(np.float32)
    f = np.concatenate([f, [[n, n + 1, n + 2]]])
    a, b = _both(v, f, 40)
    st = b.meta["encode_stats"]
    assert st["dropped_nonfinite"] == 2 and st["dropped_duplicate"] == 10 and st["dropped_degenerate"] == 4
    _assert_parity(a, b)
    # unwelded soup welds to the same result
    sv, sf = uv_sphere(0.4, 20, 40)
    soup_v = sv[sf.reshape(-1)]
    soup_f = np.arange(soup_v.shape[0]).reshape(-1, 3)
    _assert_parity(*_both(soup_v, soup_f, 48))
    _assert_parity(*_both(soup_v, soup_f, 48, weld=False))


def test_empty_and_fully_degenerate_meshes():
    for v, f in [(np.zeros((0, 3)), np.zeros((0, 3), np.int64)),
                 (np.array([[0, 0, 0], [0.1, 0, 0], [0.2, 0, 0]]), np.array([[0, 1, 2], [0, 0, 1]]))]:
        a, b = _both(v, f, 16)
        assert b.num_voxels == 0 and b.coords.shape == (0, 3) and b.dual_vertices.shape == (0, 3)
        _assert_parity(a, b)
    # geometry fully outside the AABB under outside="clip": nothing left
    a, b = _both(np.array([[2.0, 2, 2], [2.1, 2, 2], [2, 2.1, 2]]), np.array([[0, 1, 2]]), 16, outside="clip")
    assert b.num_voxels == 0
    _assert_parity(a, b)


def test_options_aabb_clip_order_and_errors():
    v, f = uv_sphere(0.4, 20, 40)
    _assert_parity(*_both(v, f, 32, aabb=((-0.5, -0.45, -0.6), (0.5, 0.5, 0.55))))  # non-cubic voxels
    _assert_parity(*_both(v, f, 32, face_weight=0.0))
    _assert_parity(*_both(v, f, 32, order="morton"))
    vb = v.copy()
    vb[:, 0] *= 1.6
    _assert_parity(*_both(vb, f, 32, outside="clip"))
    with pytest.raises(ox.OVoxelError, match="outside the AABB"):
        encode_shape_torch(vb, f, 32, device="cpu")
    with pytest.raises(ox.OVoxelError, match="at least 2"):
        encode_shape_torch(v, f, 1, device="cpu")
    # tensors in
    b = encode_shape_torch(torch.from_numpy(v), torch.from_numpy(f.astype(np.int64)), 32, device="cpu")
    _assert_parity(ox.encode_shape(v, f, 32), b)


def test_unregularised_qef_matches_voxels_and_flags():
    """λ_r = 0: QEFs of flat voxels are singular and their minimiser is not unique (it depends on the
    float summation order), so only voxels and flags are compared; well-posed voxels still agree."""
    v, f = open_cylinder()
    a, b = _both(v, f, 40, regularization_weight=0.0)
    _assert_parity(a, b, dual=False)
    d = np.abs(a.dual_vertices - b.dual_vertices).max(1)
    assert (d < 1e-5).mean() > 0.9


def test_solver_matches_numpy_on_random_qefs():
    """Closed-form + box-constrained solve (incl. singular systems via pinv) against E._solve_qef."""
    rng = np.random.default_rng(0)
    n = 2000
    rows = []
    for k in range(n):
        m = rng.integers(1, 5)
        nrm = rng.normal(size=(m, 3))
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        if k % 5 == 0:
            nrm[:, 2] = 0  # singular (no z constraint)
            nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        p = rng.uniform(-1, 2, size=(m, 3))
        q = E._plane_quadrics(nrm, -(nrm * p).sum(1)).sum(0)
        rows.append(q)
    Q = np.stack(rows, 1)
    lo = rng.integers(0, 5, size=(n, 3)).astype(np.float64)
    hi = lo + 1
    x, cons = E._solve_qef(Q, lo, hi)
    xt, ct = K._solve_qef(torch.from_numpy(Q), torch.from_numpy(lo), torch.from_numpy(hi))
    np.testing.assert_array_equal(ct.numpy(), cons)
    assert cons.mean() > 0.3
    np.testing.assert_allclose(xt.numpy(), x, rtol=0, atol=1e-9)


def test_dispatch_follows_trellis_kernels(monkeypatch):
    from kernels import registry

    v, f = uv_sphere(0.4, 12, 24)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert K.select_encoder("cpu") == "numpy"
    assert K.select_encoder("cuda") == "torch"  # auto: the torch port only on CUDA
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert K.select_encoder("cuda") == "numpy"
    ov = K.encode_shape(v, f, 24, device="cpu")
    assert "device" not in ov.meta["encode_stats"]  # the numpy codec ran
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert K.select_encoder("cpu") == "torch"
    ot = K.encode_shape(v, f, 24, device="cpu", threads=2)
    assert ot.meta["encode_stats"]["device"] == "cpu"
    _assert_parity(ov, ot)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_numpy():
    v, f = uv_sphere(0.45, 71, 142)
    _assert_parity(*_both(v, f, 256, device="cuda"))
    v, f = open_cylinder(0.3, 0.7, 90, 20)
    _assert_parity(*_both(v, f, 64, device="cuda"))
    v, f, R = _case("random1")
    _assert_parity(*_both(v, f, R, device="cuda"))
