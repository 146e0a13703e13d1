"""Triton submanifold conv vs the pure-torch reference, on CPU under TRITON_INTERPRET=1 (tiny inputs)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are interpreted on CPU

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from backend.modules.sparse.conv import build_neighbor_map  # noqa: E402
from kernels import registry, sparse_conv  # noqa: E402
from kernels.testing import interpreted_module  # noqa: E402

TK = interpreted_module("kernels.triton_sparse_conv")


def _coords(g: torch.Generator, sizes=(70, 50), R: int = 7) -> torch.Tensor:
    """Two batch items of random unique voxels in an R³ grid, sorted by (b, x, y, z)."""
    out = []
    for b, n in enumerate(sizes):
        flat = torch.randperm(R ** 3, generator=g)[:n].sort().values
        out.append(torch.stack([torch.full_like(flat, b), flat // (R * R), (flat // R) % R, flat % R], 1))
    return torch.cat(out).int()


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(1234)
    coords = _coords(g)
    return g, coords, build_neighbor_map(coords)


@pytest.mark.parametrize("c_in,c_out,bias,skip", [(4, 8, True, True), (20, 40, False, False), (72, 16, True, False)])
def test_fp32_parity(case, monkeypatch, c_in, c_out, bias, skip):
    """Both loop variants: tap-major with empty-tap skipping, and the flat pipelined loop (GPU default)."""
    monkeypatch.setattr(TK, "SKIP_EMPTY_TAPS", skip)
    g, coords, nbr = case
    feats = torch.randn(coords.shape[0], c_in, generator=g)
    w = torch.randn(c_out, 3, 3, 3, c_in, generator=g) / (27 * c_in) ** 0.5
    b = torch.randn(c_out, generator=g) if bias else None
    y = TK.submanifold_conv3d(feats, nbr, w, b)
    ref = sparse_conv._reference_conv(feats, nbr, w, b)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_fp32_matches_dense_conv3d(case):
    """Independent of the reference: one item against dense F.conv3d on the active sites."""
    g, coords, nbr = case
    feats = torch.randn(coords.shape[0], 6, generator=g)
    w = torch.randn(5, 3, 3, 3, 6, generator=g)
    b = torch.randn(5, generator=g)
    y = TK.submanifold_conv3d(feats, nbr.int(), w, b)  # int32 neighbour map accepted too
    dense = torch.zeros(2, 6, 7, 7, 7)
    c = coords.long()
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    full = F.conv3d(dense, w.permute(0, 4, 1, 2, 3), b, padding=1)
    torch.testing.assert_close(y, full[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,skip", [(torch.float16, False), (torch.bfloat16, True)])
def test_half_precision_fp32_accumulation(case, monkeypatch, dtype, skip):
    """fp16/bf16 in and out; the error is the output rounding only (fp32 accumulation)."""
    monkeypatch.setattr(TK, "SKIP_EMPTY_TAPS", skip)
    g, coords, nbr = case
    feats = torch.randn(coords.shape[0], 32, generator=g).to(dtype)
    w = (torch.randn(48, 3, 3, 3, 32, generator=g) / 30).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    y = TK.submanifold_conv3d(feats, nbr, w, b)
    assert y.dtype == dtype
    exact = sparse_conv._reference_conv(feats.double(), nbr, w.double(), b.double())
    # one rounding of the fp32 sum to dtype (≤ eps/2 relative; the interpreter's fp32 -> bf16 cast
    # truncates, so ≤ eps there) plus fp32 accumulation noise. An fp16/bf16 accumulator would be off
    # by many ulps over 27·32 terms.
    ulps = 0.5 if dtype == torch.float16 else 1.0
    eps = torch.finfo(dtype).eps
    err = (y.double() - exact).abs()
    assert bool((err <= ulps * eps * exact.abs() + 1e-5 * exact.abs().max()).all()), err.max()


def test_rows_variant(case):
    g, coords, nbr = case
    feats = torch.randn(coords.shape[0], 12, generator=g)
    w2 = torch.randn(16, 27 * 12, generator=g) / 18
    b = torch.randn(16, generator=g)
    rows = torch.randperm(coords.shape[0], generator=g)[:37]
    y = TK.submanifold_conv3d_rows(feats, nbr, rows, w2, b)
    torch.testing.assert_close(y, sparse_conv._reference_conv_rows(feats, nbr, rows, w2, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(TK.submanifold_conv3d_rows(feats, nbr, None, w2, None),
                               sparse_conv._reference_conv_rows(feats, nbr, None, w2, None), rtol=1e-5, atol=1e-5)


def test_dispatch_forced_triton_on_cpu(case, monkeypatch):
    """The public function runs the kernel when forced (interpreter) and the reference by default."""
    g, coords, nbr = case
    feats = torch.randn(coords.shape[0], 4, generator=g)
    w = torch.randn(4, 3, 3, 3, 4, generator=g)
    registry.reset()
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.get("submanifold_conv3d", "cpu") is TK.submanifold_conv3d
    y = sparse_conv.submanifold_conv3d(feats, nbr, w)
    monkeypatch.setenv(registry.ENV_VAR, "auto")
    assert registry.get("submanifold_conv3d", "cpu") is sparse_conv._reference_conv
    torch.testing.assert_close(y, sparse_conv.submanifold_conv3d(feats, nbr, w), rtol=1e-5, atol=1e-5)
    registry.reset()


def test_autograd_uses_reference(case, monkeypatch):
    """Forward-only kernel: with autograd recording, the reference runs (and gradients flow)."""
    g, coords, nbr = case
    feats = torch.randn(coords.shape[0], 4, generator=g)
    w = torch.randn(4, 3, 3, 3, 4, generator=g, requires_grad=True)
    registry.reset()
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    calls = []
    monkeypatch.setattr(TK, "submanifold_conv3d", lambda *a: calls.append(1) or sparse_conv._reference_conv(*a))
    registry.reset()
    y = sparse_conv.submanifold_conv3d(feats, nbr, w)
    y.sum().backward()
    assert w.grad is not None and not calls
    with torch.no_grad():
        sparse_conv.submanifold_conv3d(feats, nbr, w)
    assert calls == [1]
    registry.reset()


def test_isolated_voxels_and_empty():
    """No neighbours at all (only the centre tap) and N = 0."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 4, 4, 4], [1, 0, 0, 0]], dtype=torch.int32)
    nbr = build_neighbor_map(coords)
    feats = torch.randn(3, 3)
    w = torch.randn(2, 3, 3, 3, 3)
    torch.testing.assert_close(TK.submanifold_conv3d(feats, nbr, w, None), feats @ w[:, 1, 1, 1].T)
    empty = TK.submanifold_conv3d(feats[:0], nbr[:0], w, torch.ones(2))
    assert empty.shape == (0, 2)
