"""Triton kernel: sparse trilinear attribute sampling (one pass over the points, imported lazily).

Each program takes ``BLOCK_P`` points, converts them to voxel units, finds the 8 surrounding voxels
with 4 binary searches in the sorted keys (the two z-neighbours of a column have adjacent keys), gathers the existing ones' attributes
(``BLOCK_C ≥ C`` channels, masked) and writes the renormalised weighted mean. Same fp32 arithmetic as
:func:`kernels.attr_sample._reference_sample`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import lookup_sorted_pair, search_steps
from .voxel_index import SortedVoxelIndex

__all__ = ["sample"]


@triton.jit
def _attr_sample_kernel(
    pts_ptr, keys_ptr, rows_ptr, attrs_ptr, out_ptr,
    P, N, C, R, STEPS,
    lo_x, lo_y, lo_z, s_x, s_y, s_z,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    p64 = offs_p.to(tl.int64)
    px = tl.load(pts_ptr + p64 * 3 + 0, mask=mask_p, other=0.0)
    py = tl.load(pts_ptr + p64 * 3 + 1, mask=mask_p, other=0.0)
    pz = tl.load(pts_ptr + p64 * 3 + 2, mask=mask_p, other=0.0)
    ux = (px - lo_x) / s_x - 0.5
    uy = (py - lo_y) / s_y - 0.5
    uz = (pz - lo_z) / s_z - 0.5
    fin = (tl.abs(ux) < 1e30) & (tl.abs(uy) < 1e30) & (tl.abs(uz) < 1e30)   # False for NaN / inf
    ux = tl.where(fin, ux, -10.0)
    uy = tl.where(fin, uy, -10.0)
    uz = tl.where(fin, uz, -10.0)
    fx0 = tl.floor(ux)
    fy0 = tl.floor(uy)
    fz0 = tl.floor(uz)
    fx = ux - fx0
    fy = uy - fy0
    fz = uz - fz0
    ix = fx0.to(tl.int64)
    iy = fy0.to(tl.int64)
    iz = fz0.to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    # corners (dx, dy, z) and (dx, dy, z + 1) have adjacent keys: one binary search per pair
    for k in tl.static_range(4):
        dx = (k >> 1) & 1
        dy = k & 1
        cx = ix + dx
        cy = iy + dy
        in_xy = mask_p & (cx >= 0) & (cx < R) & (cy >= 0) & (cy < R)
        v0 = in_xy & (iz >= 0) & (iz < R)
        v1 = in_xy & (iz + 1 >= 0) & (iz + 1 < R)
        q = (cx * R + cy) * R + iz
        row0, row1 = lookup_sorted_pair(keys_ptr, rows_ptr, N, q, v0, v1, STEPS)
        wxy = tl.where(dx == 1, fx, 1.0 - fx) * tl.where(dy == 1, fy, 1.0 - fy)
        w0 = tl.where(row0 >= 0, wxy * (1.0 - fz), 0.0)
        w1 = tl.where(row1 >= 0, wxy * fz, 0.0)
        a0 = tl.load(attrs_ptr + row0[:, None] * C + offs_c[None, :], mask=(row0 >= 0)[:, None] & mask_c[None, :],
                     other=0.0)
        a1 = tl.load(attrs_ptr + row1[:, None] * C + offs_c[None, :], mask=(row1 >= 0)[:, None] & mask_c[None, :],
                     other=0.0)
        acc += w0[:, None] * a0.to(tl.float32)
        acc += w1[:, None] * a1.to(tl.float32)
        wsum += w0
        wsum += w1
    ok = wsum > 0
    res = acc / tl.where(ok, wsum, 1.0)[:, None]
    res = tl.where(ok[:, None], res, 0.0)
    tl.store(out_ptr + p64[:, None] * C + offs_c[None, :], res, mask=mask_p[:, None] & mask_c[None, :])


def sample(index: SortedVoxelIndex, attrs: torch.Tensor, points: torch.Tensor, lo: torch.Tensor,
           s: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`kernels.attr_sample._reference_sample` (same arguments and result)."""
    P, C = points.shape[0], attrs.shape[1]
    out = torch.zeros(P, C, dtype=torch.float32, device=points.device)
    if index.n == 0 or P == 0 or C == 0:
        return out
    block_c = triton.next_power_of_2(C)
    block_p = 256 if points.device.type == "cuda" else 512  # interpreter: few large programs
    if block_c > 16:
        block_p = max(32, block_p * 16 // block_c)
    lo_ = [float(v) for v in lo.tolist()]
    s_ = [float(v) for v in s.tolist()]
    grid = (triton.cdiv(P, block_p),)
    _attr_sample_kernel[grid](
        points.contiguous(), index.keys, index.rows, attrs.contiguous(), out,
        P, index.n, C, index.resolution, search_steps(index.n),
        *lo_, *s_,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )
    return out
