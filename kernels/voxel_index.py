"""Sorted-key voxel index in torch (any device): coords -> row, ``-1`` when absent or off-grid.

The same flat key as the codec (``backend.ovoxel.grid.flat_keys``): ``(x·R + y)·R + z`` as int64.
Keys are sorted once (``torch.sort``, a radix sort on CUDA); lookups are ``torch.searchsorted`` here
and a branch-free binary search in the Triton kernels (:mod:`kernels.triton_common`), both over the
same arrays, so references and kernels share the index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SortedVoxelIndex", "flat_keys"]


def flat_keys(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """int64 ``(x·R + y)·R + z`` of ``coords [N, 3]``."""
    c = coords.long()
    return (c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2]


@dataclass
class SortedVoxelIndex:
    """Sorted int64 keys of a voxel set and the original row of each sorted key."""

    keys: torch.Tensor
    rows: torch.Tensor
    resolution: int

    @classmethod
    def build(cls, coords: torch.Tensor, resolution: int) -> "SortedVoxelIndex":
        """Index ``coords [N, 3]`` (values in ``[0, R)``; rows must be unique)."""
        if coords.dim() != 2 or coords.shape[1] != 3:
            raise ValueError(f"coords must be [N, 3], got {tuple(coords.shape)}")
        keys, rows = torch.sort(flat_keys(coords, resolution))
        return cls(keys.contiguous(), rows.contiguous(), int(resolution))

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    def lookup(self, query: torch.Tensor) -> torch.Tensor:
        """int64 ``[Q]`` row of each ``query [Q, 3]`` voxel; ``-1`` if absent or outside ``[0, R)³``."""
        q = query.long()
        R = self.resolution
        inside = ((q >= 0) & (q < R)).all(dim=1)
        out = torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
        if self.n == 0 or q.shape[0] == 0:
            return out
        k = flat_keys(q, R)
        pos = torch.searchsorted(self.keys, k).clamp_(max=self.n - 1)
        hit = inside & (self.keys[pos] == k)
        return torch.where(hit, self.rows[pos], out)
