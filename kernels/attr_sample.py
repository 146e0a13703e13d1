"""Sparse trilinear attribute sampling (texture baking), same semantics as the codec.

``backend.ovoxel.sample_attributes(coords, attrs, resolution, aabb, points)``: voxel values sit at
the centres ``aabb[0] + (coords + 0.5)·s``; each world point is weighted trilinearly over its 8
surrounding centres, **only existing voxels count and the weights are renormalised** over them; a
point whose existing neighbours have zero total weight (in particular, none exist) gets 0.

Here the same on torch tensors (any device). The voxel index is built once by
:class:`AttributeSampler`; the per-point work is the dispatched op ``attr_sample``
(reference: :func:`_reference_sample`, torch ``searchsorted``; kernel:
:mod:`kernels.triton_attr_sample`, binary search + gather fused, one pass over the points).
Arithmetic is fp32: ``u = (p − aabb[0]) / s − 0.5``, ``i0 = floor(u)``, ``f = u − i0``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import registry
from .voxel_index import SortedVoxelIndex

__all__ = ["AttributeSampler", "sample_attributes"]

_DEFAULT_AABB = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))
#: Points per chunk in the reference (bounds its temporaries to ~ chunk·(C + 16)·8 bytes).
REFERENCE_CHUNK = 1 << 20


def _aabb_tensors(aabb: Any, resolution: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(aabb if aabb is not None else _DEFAULT_AABB, dtype=torch.float64)
    if a.shape != (2, 3):
        raise ValueError(f"aabb must be [2, 3], got {tuple(a.shape)}")
    lo = a[0]
    s = (a[1] - a[0]) / resolution
    return lo.to(device, torch.float32), s.to(device, torch.float32)


def _reference_sample(index: SortedVoxelIndex, attrs: torch.Tensor, points: torch.Tensor,
                      lo: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Pure-torch sampling of ``attrs [N, C]`` at world ``points [P, 3]`` → ``[P, C]`` float32."""
    P, C = points.shape[0], attrs.shape[1]
    out = torch.zeros(P, C, dtype=torch.float32, device=points.device)
    if index.n == 0 or P == 0:
        return out
    a32 = attrs.float()
    corners = torch.tensor([[(k >> 2) & 1, (k >> 1) & 1, k & 1] for k in range(8)], device=points.device)
    for s0 in range(0, P, REFERENCE_CHUNK):
        p = points[s0:s0 + REFERENCE_CHUNK].float()
        u = (p - lo) / s - 0.5
        i0 = torch.floor(u)
        f = u - i0
        i0 = i0.long()
        acc = torch.zeros(p.shape[0], C, dtype=torch.float32, device=p.device)
        wsum = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        for d in corners:
            w = torch.where(d.bool(), f, 1.0 - f).prod(dim=1)
            row = index.lookup(i0 + d)
            w = torch.where(row >= 0, w, torch.zeros_like(w))
            acc += w[:, None] * a32[row.clamp(min=0)]
            wsum += w
        ok = wsum > 0
        out[s0:s0 + p.shape[0]] = torch.where(ok[:, None], acc / torch.where(ok, wsum, 1.0)[:, None], 0.0)
    return out


registry.register("attr_sample", _reference_sample, "kernels.triton_attr_sample:sample")


class AttributeSampler:
    """Sparse trilinear sampler with the voxel index built once (repeated / chunked bakes).

    Args:
        coords: ``[N, 3]`` int voxel coords in ``[0, R)`` (unique; any row order).
        attrs: ``[N, C]`` attributes (any float dtype; sampled in fp32).
        resolution: grid resolution R.
        aabb: ``[[x0, y0, z0], [x1, y1, z1]]`` (default the unit cube centred at 0).
    """

    def __init__(self, coords: torch.Tensor, attrs: torch.Tensor, resolution: int,
                 aabb: Sequence[Sequence[float]] | torch.Tensor | None = _DEFAULT_AABB) -> None:
        if attrs.dim() != 2 or attrs.shape[0] != coords.shape[0]:
            raise ValueError(f"attrs must be [N, C] with N={coords.shape[0]}, got {tuple(attrs.shape)}")
        self.index = SortedVoxelIndex.build(coords.to(attrs.device), resolution)
        self.attrs = attrs.contiguous()
        self.lo, self.s = _aabb_tensors(aabb, resolution, attrs.device)

    def sample(self, points: torch.Tensor) -> torch.Tensor:
        """``[P, C]`` float32 samples at world ``points [P, 3]`` (on the attrs' device)."""
        if points.dim() != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be [P, 3], got {tuple(points.shape)}")
        points = points.to(self.attrs.device, torch.float32).contiguous()
        return registry.call("attr_sample", points.device, self.index, self.attrs, points, self.lo, self.s)


def sample_attributes(coords: torch.Tensor, attrs: torch.Tensor, resolution: int,
                      aabb: Sequence[Sequence[float]] | torch.Tensor | None, points: torch.Tensor) -> torch.Tensor:
    """Torch/GPU twin of ``backend.ovoxel.sample_attributes`` (same arguments, tensors in and out)."""
    return AttributeSampler(coords, attrs, resolution, aabb).sample(points)
