"""Compiled Triton kernels on a real GPU vs the pure-torch references (skipped without CUDA).

The other kernel tests run the kernels under the CPU interpreter; this file is what
``scripts/gpu_bench.sh`` runs on the device machine, in its own pytest process (those files set
``TRITON_INTERPRET=1`` at import, which would turn this one's kernels into interpreted ones).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: run this file in its own pytest process", allow_module_level=True)
pytest.importorskip("triton")

from backend.modules.sparse.conv import build_neighbor_map  # noqa: E402
from benchmarks.kernels import shell_voxels, sphere_ovoxel  # noqa: E402
from kernels import attr_sample, mesh_extract, registry, sparse_conv  # noqa: E402
from kernels import triton_attr_sample, triton_mesh_extract, triton_sparse_conv  # noqa: E402

DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_registry():
    registry.reset()
    yield
    registry.reset()


def test_auto_selects_triton_on_cuda():
    assert registry.select(DEV) == "triton"


@pytest.fixture(scope="module")
def shell():
    c, _, _ = shell_voxels(60_000)
    coords = torch.cat([torch.zeros(c.shape[0], 1, dtype=c.dtype), c], 1).int().to(DEV)
    return coords, build_neighbor_map(coords)


@pytest.mark.parametrize("dtype,c_in,c_out,tol", [(torch.float32, 32, 48, 1e-4), (torch.float16, 64, 64, 2e-2),
                                                  (torch.bfloat16, 256, 128, 1e-1), (torch.float16, 20, 7, 2e-2)])
@pytest.mark.parametrize("skip", [False, True])
def test_sparse_conv_matches_reference(shell, monkeypatch, dtype, c_in, c_out, tol, skip):
    monkeypatch.setattr(triton_sparse_conv, "SKIP_EMPTY_TAPS", skip)
    coords, nbr = shell
    g = torch.Generator(device=DEV).manual_seed(0)
    feats = torch.randn(coords.shape[0], c_in, generator=g, device=DEV).to(dtype)
    w = (torch.randn(c_out, 3, 3, 3, c_in, generator=g, device=DEV) / (27 * c_in) ** 0.5).to(dtype)
    b = torch.randn(c_out, generator=g, device=DEV).to(dtype)
    with torch.no_grad():
        out = triton_sparse_conv.submanifold_conv3d(feats, nbr, w, b)
        ref = sparse_conv._reference_conv(feats.float(), nbr, w.float(), b.float())
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_mesh_extraction_same_faces_as_reference(monkeypatch):
    c, dv, flags, gamma, R = sphere_ovoxel(200_000, DEV)
    out = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv(registry.ENV_VAR, mode)
        registry.reset()
        out[mode] = mesh_extract.extract_mesh(c, dv, flags, gamma, resolution=R)
    assert out["triton"][1].shape[0] > 100_000
    assert torch.equal(out["triton"][1], out["reference"][1])
    torch.testing.assert_close(out["triton"][0], out["reference"][0], rtol=0, atol=1e-6)
    idx = mesh_extract.SortedVoxelIndex.build(c.long(), R)
    assert torch.equal(triton_mesh_extract.quad_neighbours(idx, c, flags),
                       mesh_extract._reference_quad_neighbours(idx, c, flags))


@pytest.mark.parametrize("channels", [6, 3, 20])
def test_attribute_sampling_matches_reference(channels):
    c, _, _, _, R = sphere_ovoxel(100_000, DEV)
    g = torch.Generator(device=DEV).manual_seed(1)
    attrs = torch.rand(c.shape[0], channels, generator=g, device=DEV)
    pick = torch.randint(0, c.shape[0], (200_000,), generator=g, device=DEV)
    pts = ((c[pick].float() + torch.rand(pick.shape[0], 3, generator=g, device=DEV)) / R - 0.5).contiguous()
    s = attr_sample.AttributeSampler(c, attrs, R)
    ref = attr_sample._reference_sample(s.index, s.attrs, pts, s.lo, s.s)
    out = triton_attr_sample.sample(s.index, s.attrs, pts, s.lo, s.s)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert int((ref.abs().sum(1) > 0).sum()) > 150_000
