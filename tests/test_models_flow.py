"""Flow DiTs: golden forwards, RoPE layout, variable-length attention, sparse ≡ dense."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backend.golden import load_case, run_case
from backend.models import build_model, from_pretrained
from backend.modules.attention import (RotaryPositionEmbedder, apply_rotary_embedding, scaled_dot_product_attention,
                                       varlen_attention)
from backend.modules.sparse import SparseTensor


@pytest.mark.parametrize("name", ["ss_flow_forward", "slat_flow_shape_forward", "slat_flow_tex_forward"])
def test_golden_flow_forward(golden_dir: Path, name: str) -> None:
    rep = run_case(golden_dir, name)
    assert rep.passed, rep.errors
    assert rep.max_abs["out.y"] < 1e-5


@pytest.mark.parametrize("name", ["ss_flow_forward", "slat_flow_shape_forward", "slat_flow_tex_forward"])
def test_golden_flow_intermediates(golden_dir: Path, name: str) -> None:
    """The handlers also return every dbg.* tensor (t_emb, mod, h_in, blocks); check them too."""
    from backend.golden import handlers

    gc = load_case(golden_dir, name)
    with torch.no_grad():
        outs = handlers()[name](gc)
    dbg_keys = [k for k in gc.tensors if k.startswith("dbg.")]
    assert dbg_keys
    for k in dbg_keys:
        ref, tol = gc.tensors[k], gc.meta["tolerances"][k]
        assert outs[k].shape == ref.shape, k
        assert ((outs[k] - ref).abs() <= tol["atol"] + tol["rtol"] * ref.abs()).all(), k


def test_rope_layout_matches_spec() -> None:
    """head_dim 64: 10 freqs per axis, [x·f | y·f | z·f | 2 identity pairs], adjacent pairs rotated."""
    emb = RotaryPositionEmbedder(64, 3)
    pos = torch.tensor([[3, 5, 7]])
    ph = emb(pos)[0]
    assert ph.shape == (32,) and ph.dtype == torch.complex64
    f = [1 / 10000 ** (k / 10) for k in range(10)]
    want = [3 * v for v in f] + [5 * v for v in f] + [7 * v for v in f] + [0.0, 0.0]
    torch.testing.assert_close(ph, torch.polar(torch.ones(32), torch.tensor(want, dtype=torch.float32)))
    # pair (2j, 2j+1) of every head is rotated by phase j
    x = torch.randn(1, 2, 64)  # [T, H, D]
    y = apply_rotary_embedding(x, ph[None])
    a = torch.tensor(want)
    c, s = torch.cos(a), torch.sin(a)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(y[..., 0::2], x0 * c - x1 * s)
    torch.testing.assert_close(y[..., 1::2], x0 * s + x1 * c)
    # official 1.3B: head_dim 128 -> 21 freqs per axis + 1 identity pair
    ph128 = RotaryPositionEmbedder(128, 3)(torch.tensor([[1, 1, 1]]))[0]
    assert ph128.shape == (64,) and ph128[63] == 1 and ph128[62] != 1
    torch.testing.assert_close(ph128[21].angle(), torch.tensor(1.0))  # y block starts at index 21


def _padded_reference(q, k, v, lq, lk):
    """Reference: pad to the longest sample, mask the padding, float64 softmax."""
    B, H, D = len(lq), q.shape[1], q.shape[2]
    Lq, Lk = max(lq), max(lk)
    Q = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    K = torch.zeros(B, Lk, H, D, dtype=torch.float64)
    V = torch.zeros(B, Lk, H, v.shape[2], dtype=torch.float64)
    mask = torch.full((B, 1, 1, Lk), float("-inf"), dtype=torch.float64)
    qs = ks = 0
    for b in range(B):
        Q[b, :lq[b]] = q[qs:qs + lq[b]]
        K[b, :lk[b]] = k[ks:ks + lk[b]]
        V[b, :lk[b]] = v[ks:ks + lk[b]]
        mask[b, ..., :lk[b]] = 0
        qs, ks = qs + lq[b], ks + lk[b]
    att = (Q.transpose(1, 2) @ K.transpose(1, 2).transpose(-1, -2)) / math.sqrt(D) + mask
    out = (att.softmax(-1) @ V.transpose(1, 2)).transpose(1, 2)
    return torch.cat([out[b, :lq[b]] for b in range(B)])


@pytest.mark.parametrize("lq,lk", [([5, 17, 1], [5, 17, 1]), ([9, 4], [12, 12]), ([8, 8], [8, 8]), ([7], [3])])
def test_varlen_attention_matches_padded_masked(lq, lk) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(sum(lq), 3, 16), torch.randn(sum(lk), 3, 16), torch.randn(sum(lk), 3, 8)
    got = varlen_attention(q, k, v, lq, lk)
    torch.testing.assert_close(got.double(), _padded_reference(q, k, v, lq, lk), atol=1e-6, rtol=1e-5)


def test_varlen_attention_empty_sample_and_errors() -> None:
    q, k, v = torch.randn(4, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    out = varlen_attention(q, k, v, [0, 4], [0, 3])
    torch.testing.assert_close(out, scaled_dot_product_attention(q[None], k[None], v[None])[0])
    with pytest.raises(ValueError):
        varlen_attention(q, k, v, [2, 1], [3, 0])


def test_sparse_dit_on_full_grid_equals_dense_dit(golden_dir: Path) -> None:
    """SLatFlowModel with the SS flow's weights on every voxel of the grid == SparseStructureFlowModel."""
    dense = from_pretrained(golden_dir / "model_ss_flow_tiny")
    args = {k: getattr(dense, k) for k in ("in_channels", "model_channels", "cond_channels", "out_channels",
                                            "num_blocks", "num_heads", "mlp_ratio", "share_mod")}
    sparse = build_model("SLatFlowModel", {**args, "resolution": 8, "pe_mode": "rope", "qk_rms_norm": True,
                                            "qk_rms_norm_cross": True}, "cpu")
    sparse.load_state_dict(dense.state_dict())
    T = load_file(str(golden_dir / "case_ss_flow_forward.safetensors"))
    x, t, cond = T["in.x"], T["in.t"], T["in.cond"]
    B, C, R = x.shape[0], x.shape[1], x.shape[2]
    g = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.cat([torch.full((R ** 3, 1), b), g], 1) for b in range(B)]).int()
    feats = x.reshape(B, C, -1).permute(0, 2, 1).reshape(-1, C)
    with torch.no_grad():
        yd = dense(x, t, cond)
        ys = sparse(SparseTensor(feats, coords), t, cond)
    torch.testing.assert_close(ys.feats, yd.reshape(B, C, -1).permute(0, 2, 1).reshape(-1, C), atol=2e-5, rtol=1e-5)


def test_sparse_dit_samples_are_independent(golden_dir: Path) -> None:
    """Batched forward == each sample alone, and row order inside a sample does not matter."""
    model = from_pretrained(golden_dir / "model_slat_flow_shape_tiny")
    T = load_file(str(golden_dir / "case_slat_flow_shape_forward.safetensors"))
    x = SparseTensor(T["in.x"], T["in.coords"])
    with torch.no_grad():
        y = model(x, T["in.t"], T["in.cond"]).feats
        for b, sl in enumerate(x.layout):
            xb = x[b]
            yb = model(xb, T["in.t"][b:b + 1], T["in.cond"][b:b + 1]).feats
            torch.testing.assert_close(yb, y[sl], atol=1e-5, rtol=1e-5)
            perm = torch.randperm(xb.num_rows, generator=torch.Generator().manual_seed(b))
            yp = model(SparseTensor(xb.feats[perm], xb.coords[perm]), T["in.t"][b:b + 1],
                       T["in.cond"][b:b + 1]).feats
            torch.testing.assert_close(yp, yb[perm], atol=1e-5, rtol=1e-5)


def test_bf16_mixed_precision_close_to_fp32(golden_dir: Path) -> None:
    """The official GPU precision (blocks bf16, the rest fp32) runs and stays close to fp32."""
    T = load_file(str(golden_dir / "case_ss_flow_forward.safetensors"))
    m32 = from_pretrained(golden_dir / "model_ss_flow_tiny")
    m16 = from_pretrained(golden_dir / "model_ss_flow_tiny", dtype=torch.bfloat16)
    assert m16.blocks[0].mlp.mlp[0].weight.dtype == torch.bfloat16
    assert m16.out_layer.weight.dtype == torch.float32
    with torch.no_grad():
        y32 = m32(T["in.x"], T["in.t"], T["in.cond"])
        y16 = m16(T["in.x"], T["in.t"], T["in.cond"])
    assert y16.dtype == torch.float32
    rel = (y16 - y32).norm() / y32.norm()
    assert 0 < rel < 0.05


def test_sparse_bf16_mixed_precision_close_to_fp32(golden_dir: Path) -> None:
    T = load_file(str(golden_dir / "case_slat_flow_tex_forward.safetensors"))
    x, cc = SparseTensor(T["in.x"], T["in.coords"]), SparseTensor(T["in.concat_cond"], T["in.coords"])
    stem = golden_dir / "model_slat_flow_tex_tiny"
    with torch.no_grad():
        y32 = from_pretrained(stem)(x, T["in.t"], T["in.cond"], concat_cond=cc).feats
        y16 = from_pretrained(stem, dtype=torch.bfloat16)(x, T["in.t"], T["in.cond"], concat_cond=cc).feats
    assert y16.dtype == torch.float32
    rel = (y16 - y32).norm() / y32.norm()
    assert 0 < rel < 0.05
