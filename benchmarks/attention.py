"""Attention / DiT benchmark (CPU by default): ``python benchmarks/attention.py [--quick] [--device cuda]``.

Prints, per configuration, the best-of-``--reps`` wall time of:
1. variable-length self-attention (our per-sample SDPA, ``varlen_attention``) vs. padding every
   sample to the longest and running one masked SDPA — at realistic token counts (1 × 8192 tokens,
   1024 channels, 16 heads; and a CFG-like batch of 2 samples of unequal length);
2. one dense SS-DiT block at the official size (4096 tokens, 1536 channels, 12 heads, 1029 cond
   tokens of width 1024) and one sparse SLat-DiT block on the same token count, extrapolated ×30.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.modules.attention import varlen_attention  # noqa: E402
from backend.modules.sparse import SparseTensor  # noqa: E402
from backend.modules.sparse.transformer import ModulatedSparseTransformerCrossBlock  # noqa: E402
from backend.modules.transformer import ModulatedTransformerCrossBlock  # noqa: E402
from backend.models.sparse_structure_flow import grid_positions  # noqa: E402
from backend.modules.attention import RotaryPositionEmbedder  # noqa: E402
from benchmarks.timing import bench, timed  # noqa: E402


def bench_pair(fa, fb, reps: int, device: torch.device) -> tuple[float, float]:
    """Like :func:`bench` for two functions, interleaved so that both see the same load."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        ta.append(timed(fa, device))
        tb.append(timed(fb, device))
    return min(ta), min(tb)


def padded_masked(q, k, v, lens):
    B, L = len(lens), max(lens)
    H, D = q.shape[1:]
    Q = q.new_zeros(B, L, H, D)
    K, V = torch.zeros_like(Q), torch.zeros_like(Q)
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=q.device)
    s = 0
    for b, n in enumerate(lens):
        Q[b, :n], K[b, :n], V[b, :n] = q[s:s + n], k[s:s + n], v[s:s + n]
        mask[b, ..., :n] = True
        s += n
    out = F.scaled_dot_product_attention(Q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), attn_mask=mask)
    return torch.cat([out.transpose(1, 2)[b, :n] for b, n in enumerate(lens)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {dev}, dtype {a.dtype}, threads {torch.get_num_threads()}")

    H, D = 16, 64
    # (lens, compare with padding?) — the padded path may materialise B·H·L² scores, so it is only
    # run at moderate sizes
    cases = [([2048], False), ([1024, 2048], True)] if a.quick else \
        [([8192], False), ([3072, 4096], True), ([6144, 8192], False)]
    for lens, compare in cases:
        n = sum(lens)
        q, k, v = (torch.randn(n, H, D, device=dev, dtype=dt) for _ in range(3))
        var = lambda: varlen_attention(q, k, v, lens, lens)  # noqa: E731
        if compare:
            t_var, t_pad = bench_pair(var, lambda: padded_masked(q, k, v, lens), a.reps, dev)
        else:
            t_var = bench(var, a.reps, dev)
        line = f"varlen self-attn  lens={lens} C={H * D} H={H}: per-sample SDPA {t_var * 1e3:8.1f} ms"
        if compare:
            line += f" | padded+masked SDPA {t_pad * 1e3:8.1f} ms"
        print(line)

    C, Hm, Lc, Cc = (1536, 12, 1029, 1024) if not a.quick else (384, 6, 257, 256)
    R = 16 if not a.quick else 8
    with torch.device(dev):
        blk = ModulatedTransformerCrossBlock(C, Cc, Hm, mlp_ratio=5.3334, use_rope=True, share_mod=True,
                                             qk_rms_norm=True, qk_rms_norm_cross=True).eval()
        sblk = ModulatedSparseTransformerCrossBlock(C, Cc, Hm, mlp_ratio=5.3334, use_rope=True, share_mod=True,
                                                    qk_rms_norm=True, qk_rms_norm_cross=True).eval()
    for m in (blk, sblk):
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.to(dt)
    L = R ** 3
    x = torch.randn(1, L, C, device=dev, dtype=dt)
    mod = torch.randn(1, 6 * C, device=dev, dtype=dt)
    cond = torch.randn(1, Lc, Cc, device=dev, dtype=dt)
    phases = RotaryPositionEmbedder(C // Hm, 3)(grid_positions(R, dev))
    with torch.no_grad():
        t_blk = bench(lambda: blk(x, mod, cond, phases), a.reps, dev)
        coords = torch.cat([torch.zeros(L, 1, dtype=torch.int32, device=dev),
                            grid_positions(R, dev).int()], 1)
        sx = SparseTensor(x[0], coords)
        t_sblk = bench(lambda: sblk(sx, mod, cond), a.reps, dev)
    print(f"dense SS-DiT block  tokens={L} C={C} H={Hm} cond={Lc}x{Cc}: {t_blk * 1e3:8.1f} ms "
          f"(x30 blocks ≈ {t_blk * 30:.2f} s per forward)")
    print(f"sparse SLat block   tokens={L} C={C} H={Hm} cond={Lc}x{Cc}: {t_sblk * 1e3:8.1f} ms "
          f"(x30 blocks ≈ {t_sblk * 30:.2f} s per forward)")


if __name__ == "__main__":
    main()
