"""Triton kernel: quad-corner lookup of O-Voxel mesh extraction (imported lazily).

One program per ``BLOCK`` voxels: for each axis whose flag is set, the three other corners of the
quad (official offsets, see :data:`kernels.mesh_extract.QUAD_OFFSETS`) are found by binary search
in the sorted keys and written to ``out [N, 3, 3]`` (``-1`` when absent or the flag is unset). Voxels
with no flag cost one load. Same result as :func:`kernels.mesh_extract._reference_quad_neighbours`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import lookup_sorted, search_steps
from .voxel_index import SortedVoxelIndex

__all__ = ["quad_neighbours"]


@triton.jit
def _corner(keys_ptr, rows_ptr, N, R, STEPS, cx, cy, cz, valid):
    inside = valid & (cx < R) & (cy < R) & (cz < R)
    return lookup_sorted(keys_ptr, rows_ptr, N, (cx * R + cy) * R + cz, inside, STEPS)


@triton.jit
def _quad_neighbours_kernel(coords_ptr, flags_ptr, keys_ptr, rows_ptr, out_ptr, N, R, STEPS,
                            BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    o64 = offs.to(tl.int64)
    x = tl.load(coords_ptr + o64 * 3 + 0, mask=mask, other=0).to(tl.int64)
    y = tl.load(coords_ptr + o64 * 3 + 1, mask=mask, other=0).to(tl.int64)
    z = tl.load(coords_ptr + o64 * 3 + 2, mask=mask, other=0).to(tl.int64)
    fx = tl.load(flags_ptr + o64 * 3 + 0, mask=mask, other=0) != 0
    fy = tl.load(flags_ptr + o64 * 3 + 1, mask=mask, other=0) != 0
    fz = tl.load(flags_ptr + o64 * 3 + 2, mask=mask, other=0) != 0
    base = out_ptr + o64 * 9
    # x: (0,0,1) (0,1,1) (0,1,0)
    vx = mask & fx
    tl.store(base + 0, _corner(keys_ptr, rows_ptr, N, R, STEPS, x, y, z + 1, vx), mask=mask)
    tl.store(base + 1, _corner(keys_ptr, rows_ptr, N, R, STEPS, x, y + 1, z + 1, vx), mask=mask)
    tl.store(base + 2, _corner(keys_ptr, rows_ptr, N, R, STEPS, x, y + 1, z, vx), mask=mask)
    # y: (1,0,0) (1,0,1) (0,0,1)
    vy = mask & fy
    tl.store(base + 3, _corner(keys_ptr, rows_ptr, N, R, STEPS, x + 1, y, z, vy), mask=mask)
    tl.store(base + 4, _corner(keys_ptr, rows_ptr, N, R, STEPS, x + 1, y, z + 1, vy), mask=mask)
    tl.store(base + 5, _corner(keys_ptr, rows_ptr, N, R, STEPS, x, y, z + 1, vy), mask=mask)
    # z: (0,1,0) (1,1,0) (1,0,0)
    vz = mask & fz
    tl.store(base + 6, _corner(keys_ptr, rows_ptr, N, R, STEPS, x, y + 1, z, vz), mask=mask)
    tl.store(base + 7, _corner(keys_ptr, rows_ptr, N, R, STEPS, x + 1, y + 1, z, vz), mask=mask)
    tl.store(base + 8, _corner(keys_ptr, rows_ptr, N, R, STEPS, x + 1, y, z, vz), mask=mask)


def quad_neighbours(index: SortedVoxelIndex, coords: torch.Tensor, intersected: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`kernels.mesh_extract._reference_quad_neighbours`."""
    n = coords.shape[0]
    out = torch.empty((n, 3, 3), dtype=torch.long, device=coords.device)
    if n == 0:
        return out
    flags = intersected.to(torch.uint8).contiguous()
    block = 256 if coords.device.type == "cuda" else 1024
    grid = (triton.cdiv(n, block),)
    _quad_neighbours_kernel[grid](coords.to(torch.int32).contiguous(), flags, index.keys, index.rows, out,
                                  n, index.resolution, search_steps(index.n), BLOCK=block, num_warps=4)
    return out
