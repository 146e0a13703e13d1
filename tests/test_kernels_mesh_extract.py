"""O-Voxel → mesh on torch: golden official output, the numpy codec, and the Triton lookup kernel
(CPU, TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are interpreted on CPU

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import mesh_extract, registry  # noqa: E402
from kernels.mesh_extract import extract_mesh  # noqa: E402
from kernels.voxel_index import SortedVoxelIndex  # noqa: E402


@pytest.fixture(scope="module")
def sphere(golden_dir):
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "case_fdg_mesh_sphere.safetensors"))


def _random_ovoxel(seed: int, R: int = 6, n: int = 150):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(R ** 3, generator=g)[:n]
    coords = torch.stack([flat // (R * R), (flat // R) % R, flat % R], 1).int()
    flags = torch.rand(n, 3, generator=g) < 0.6
    dv = torch.rand(n, 3, generator=g) * 2 - 0.5
    gamma = torch.rand(n, 1, generator=g) * 2
    return coords, dv, flags, gamma, R


def _brute_force_quads(coords: torch.Tensor, flags: torch.Tensor) -> list[list[int]]:
    """Quads by a Python dict walk over voxels (row order) then axes x, y, z (independent check)."""
    where = {tuple(c): i for i, c in enumerate(coords.tolist())}
    quads = []
    for i, c in enumerate(coords.tolist()):
        for a in range(3):
            if not flags[i, a]:
                continue
            corners = [where.get(tuple(np.add(c, o).tolist())) for o in mesh_extract.QUAD_OFFSETS[a].tolist()]
            if None not in corners:
                quads.append(corners)
    return quads


@pytest.mark.parametrize("name,use_gamma", [("nosplit", False), ("split", True)])
def test_reference_matches_official_golden(sphere, name, use_gamma):
    """The official flexible_dual_grid_to_mesh output (golden, grid 64) exactly: faces and their order."""
    v, f = extract_mesh(sphere["in.coords"], sphere["in.dual_vertices"], sphere["in.intersected"],
                        sphere["in.split_weight"] if use_gamma else None, resolution=64, official=True)
    assert torch.equal(f, sphere[f"out.{name}_faces"].long())
    torch.testing.assert_close(v, sphere[f"out.{name}_vertices"], rtol=1e-4, atol=1e-5)


def test_reference_quads_match_brute_force():
    coords, dv, flags, gamma, R = _random_ovoxel(3)
    v, f = extract_mesh(coords, dv, flags, gamma, resolution=R, orient=False, remove_unused=False)
    quads = torch.tensor(_brute_force_quads(coords, flags))
    assert f.shape[0] == 2 * quads.shape[0] > 0
    # each quad's two triangles use exactly its four corners, with the γ rule's diagonal
    for k, q in enumerate(quads.tolist()):
        t = f[2 * k: 2 * k + 2].tolist()
        g = gamma[q, 0]
        expect = [[q[0], q[1], q[2]], [q[0], q[2], q[3]]] if g[0] * g[2] > g[1] * g[3] else \
            [[q[0], q[1], q[3]], [q[3], q[1], q[2]]]
        assert t == expect


def test_triton_lookup_matches_reference():
    pytest.importorskip("triton")
    from kernels.testing import interpreted_module

    tk = interpreted_module("kernels.triton_mesh_extract")
    coords, dv, flags, gamma, R = _random_ovoxel(5, R=7, n=250)
    index = SortedVoxelIndex.build(coords, R)
    ref = mesh_extract._reference_quad_neighbours(index, coords, flags)
    out = tk.quad_neighbours(index, coords, flags)
    assert torch.equal(out, ref)
    assert int((ref >= 0).all(-1).sum()) > 20  # the case has real quads


def test_triton_end_to_end_matches_golden(sphere, monkeypatch):
    """Forced Triton path through extract_mesh on the golden sphere (2158 voxels)."""
    pytest.importorskip("triton")
    from kernels.testing import interpreted_module

    interpreted_module("kernels.triton_mesh_extract")
    registry.reset()
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    v, f = extract_mesh(sphere["in.coords"], sphere["in.dual_vertices"], sphere["in.intersected"],
                        sphere["in.split_weight"], resolution=64, official=True)
    registry.reset()
    assert torch.equal(f, sphere["out.split_faces"].long())


def _codec_decode(*args, **kwargs):
    from backend.ovoxel import decode_mesh

    return decode_mesh(*args, **kwargs)


@pytest.mark.parametrize("use_gamma,rule,orient,remove_unused", [
    (True, "normal", True, True), (False, "normal", True, True), (False, "normal", False, False),
    (False, "official", False, True), (True, "official", True, False)])
def test_matches_numpy_codec(use_gamma, rule, orient, remove_unused):
    """Bit-identical to backend.ovoxel.decode_mesh on random O-Voxels (faces, order, winding, vertices)."""
    for seed in (11, 12):
        coords, dv, flags, gamma, R = _random_ovoxel(seed)
        sw = gamma if use_gamma else None
        kw = dict(resolution=R, orient=orient, remove_unused=remove_unused, nosplit_rule=rule)
        vn, fn = _codec_decode(coords.numpy(), dv.numpy(), flags.numpy(), None if sw is None else sw.numpy(), **kw)
        v, f = extract_mesh(coords, dv, flags, sw, **kw)
        assert np.array_equal(f.numpy(), np.asarray(fn, dtype=np.int64))
        assert np.array_equal(v.numpy(), vn)


@pytest.mark.parametrize("use_gamma", [False, True])
def test_sphere_default_mode_matches_codec(sphere, use_gamma):
    """Default (clean) mode on a closed surface, where the outward orientation flips half the quads."""
    args = [sphere["in.coords"], sphere["in.dual_vertices"], sphere["in.intersected"],
            sphere["in.split_weight"] if use_gamma else None]
    vn, fn = _codec_decode(*[None if a is None else a.numpy() for a in args], resolution=64)
    v, f = extract_mesh(*args, resolution=64)
    assert np.array_equal(f.numpy(), np.asarray(fn, dtype=np.int64))
    assert np.array_equal(v.numpy(), vn)
    _, f_raw = extract_mesh(*args, resolution=64, orient=False)
    flipped = (f != f_raw).any(dim=1).float().mean().item()
    assert 0.3 < flipped < 0.7


def test_empty_and_no_flags():
    coords = torch.tensor([[0, 0, 0], [1, 1, 1]], dtype=torch.int32)
    v, f = extract_mesh(coords, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), resolution=4,
                        remove_unused=False)
    assert v.shape == (2, 3) and f.shape == (0, 3)
    v, f = extract_mesh(coords, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), resolution=4)
    assert v.shape == (0, 3) and f.shape == (0, 3)
