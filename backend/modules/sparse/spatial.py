"""Space-to-channel / channel-to-space (factor 2) and the explicit level hierarchy.

Child index inside a 2×2×2 parent: ``k = x%2 + 2·(y%2) + 4·(z%2)``; child k owns the parent's channel
slice ``[k·c, (k+1)·c)``.

* **Space-to-channel** (encoder): coarse coords = ``fine // 2`` (batch kept), unique and sorted
  lexicographically by ``(b, x, y, z)``; the coarse feature is the concatenation over k of the child
  features, zeros for absent children.
* **Channel-to-space** (decoder): the kept children are given either by a boolean mask ``[N, 8]``
  (predicted or guiding subdivision; rows are *parent-major*: parents in row order, each parent's
  kept children in increasing k) or by an explicit :class:`SubdivisionMap` recorded by a
  space-to-channel step (then the fine rows are exactly that step's input rows, in its order).

A :class:`SubdivisionMap` is the whole parent/child bookkeeping between two levels, and
:class:`SparseHierarchy` the chain of them produced by an encoder. It is passed to a decoder
*explicitly* (the official code hides it in a spatial cache shared through ``replace``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .basic import SparseTensor
from .conv import pack_coords

__all__ = [
    "SubdivisionMap",
    "SparseHierarchy",
    "child_offsets",
    "spatial2channel_map",
    "subdivision_map_from_mask",
    "space_to_channel",
    "channel_to_space",
    "SparseSpatial2Channel",
    "SparseChannel2Spatial",
    "get_s2c_map",
]

_S2C_KEY = "s2c_map"


def child_offsets(device: torch.device | str = "cpu") -> torch.Tensor:
    """``[8, 3]`` int32 ``(dx, dy, dz)`` of child k = dx + 2dy + 4dz."""
    k = torch.arange(8, device=device)
    return torch.stack([k & 1, (k >> 1) & 1, (k >> 2) & 1], -1).to(torch.int32)


@dataclass
class SubdivisionMap:
    """Parent/child map between a fine level and its factor-2 coarse level.

    Attributes:
        fine_coords: ``[Nf, 4]`` int32 fine voxels (row order of the fine level).
        coarse_coords: ``[Nc, 4]`` int32 parent voxels (row order of the coarse level).
        parent: ``[Nf]`` int64 coarse row of each fine row.
        child: ``[Nf]`` int64 child index k of each fine row.
        batch_size: number of batch items.
        fine_cache / coarse_cache: spatial caches shared by every tensor made at that level through
            this map (so the convs of a level build the neighbour map once).
    """

    fine_coords: torch.Tensor
    coarse_coords: torch.Tensor
    parent: torch.Tensor
    child: torch.Tensor
    batch_size: int
    fine_cache: dict[str, Any] = field(default_factory=dict)
    coarse_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def slot(self) -> torch.Tensor:
        """``[Nf]`` int64 row in the ``[Nc·8, c]`` view of a coarse channel-packed tensor."""
        return self.parent * 8 + self.child

    def to(self, device: torch.device | str) -> "SubdivisionMap":
        return SubdivisionMap(self.fine_coords.to(device), self.coarse_coords.to(device),
                              self.parent.to(device), self.child.to(device), self.batch_size)

    def subdivision_mask(self) -> torch.Tensor:
        """``[Nc, 8]`` bool: which children of each parent exist."""
        m = torch.zeros(self.coarse_coords.shape[0] * 8, dtype=torch.bool, device=self.parent.device)
        m[self.slot] = True
        return m.view(-1, 8)


@dataclass
class SparseHierarchy:
    """The levels an encoder visited: ``maps[i]`` maps level i (fine) to level i+1 (coarse).

    Level 0 is the encoder input, level ``len(maps)`` the latent. A decoder without predicted or
    guiding subdivisions walks it backwards, so its output voxels are exactly the encoder input
    voxels, in the encoder input row order.
    """

    maps: list[SubdivisionMap]

    @classmethod
    def from_coords(cls, coords: torch.Tensor, num_levels: int, batch_size: int | None = None
                    ) -> "SparseHierarchy":
        """Build the hierarchy of ``num_levels`` space-to-channel steps from fine ``coords`` alone."""
        maps = []
        for _ in range(num_levels):
            m = spatial2channel_map(coords, batch_size)
            maps.append(m)
            coords, batch_size = m.coarse_coords, m.batch_size
        return cls(maps)

    @property
    def num_levels(self) -> int:
        return len(self.maps)

    @property
    def fine_coords(self) -> torch.Tensor:
        return self.maps[0].fine_coords

    @property
    def latent_coords(self) -> torch.Tensor:
        return self.maps[-1].coarse_coords

    def to(self, device: torch.device | str) -> "SparseHierarchy":
        return SparseHierarchy([m.to(device) for m in self.maps])


def spatial2channel_map(coords: torch.Tensor, batch_size: int | None = None) -> SubdivisionMap:
    """Parent/child map of a space-to-channel step on ``coords`` (coarse rows sorted, unique)."""
    c = coords.to(torch.int32)
    coarse_full = torch.cat([c[:, :1], torch.div(c[:, 1:], 2, rounding_mode="floor")], 1)
    key, _ = pack_coords(coarse_full, pad=0)
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    # first fine row of every coarse key gives its coarse coords
    first = torch.full((uniq.shape[0],), c.shape[0], dtype=torch.long, device=c.device)
    first.scatter_reduce_(0, inverse, torch.arange(c.shape[0], device=c.device), reduce="amin")
    coarse = coarse_full.index_select(0, first)
    child = ((c[:, 1] & 1) + 2 * (c[:, 2] & 1) + 4 * (c[:, 3] & 1)).long()
    if batch_size is None:
        batch_size = int(c[:, 0].max().item()) + 1 if c.shape[0] else 0
    return SubdivisionMap(c, coarse, inverse.long(), child, batch_size)


def subdivision_map_from_mask(coarse_coords: torch.Tensor, mask: torch.Tensor,
                              batch_size: int | None = None) -> SubdivisionMap:
    """Map of a channel-to-space step keeping child k of parent p iff ``mask[p, k]``.

    Fine rows are parent-major (parents in row order, kept children in increasing k).
    """
    if mask.shape != (coarse_coords.shape[0], 8):
        raise ValueError(f"subdivision mask must be [{coarse_coords.shape[0]}, 8], got {tuple(mask.shape)}")
    nz = torch.nonzero(mask.to(torch.bool))
    parent, child = nz[:, 0], nz[:, 1]
    pc = coarse_coords.index_select(0, parent)
    off = child_offsets(coarse_coords.device).index_select(0, child)
    fine = torch.cat([pc[:, :1], pc[:, 1:] * 2 + off], 1).to(torch.int32)
    if batch_size is None:
        batch_size = int(coarse_coords[:, 0].max().item()) + 1 if coarse_coords.shape[0] else 0
    return SubdivisionMap(fine, coarse_coords.to(torch.int32), parent, child, batch_size)


def space_to_channel(feats: torch.Tensor, m: SubdivisionMap) -> torch.Tensor:
    """``[Nf, C]`` fine feats → ``[Nc, 8C]`` coarse feats (zeros for absent children)."""
    n, c = feats.shape
    out = feats.new_zeros(m.coarse_coords.shape[0] * 8, c)
    out = out.index_copy(0, m.slot, feats)
    return out.view(-1, 8 * c)


def channel_to_space(feats: torch.Tensor, m: SubdivisionMap) -> torch.Tensor:
    """``[Nc, 8c]`` coarse feats → ``[Nf, c]``: each child takes its parent's slice k."""
    nc, c8 = feats.shape
    if c8 % 8:
        raise ValueError("channel_to_space needs channels divisible by 8")
    return feats.reshape(nc * 8, c8 // 8).index_select(0, m.slot)


def _coarse_tensor(feats: torch.Tensor, m: SubdivisionMap) -> SparseTensor:
    return SparseTensor(feats, m.coarse_coords, m.batch_size, spatial_cache=m.coarse_cache)


def _fine_tensor(feats: torch.Tensor, m: SubdivisionMap) -> SparseTensor:
    return SparseTensor(feats, m.fine_coords, m.batch_size, spatial_cache=m.fine_cache)


def get_s2c_map(x: SparseTensor) -> SubdivisionMap:
    """The space-to-channel map of ``x``'s coords (cached with the coords, shared by ``replace``)."""
    def build() -> SubdivisionMap:
        m = spatial2channel_map(x.coords, x.batch_size)
        m.fine_cache = x.spatial_cache
        return m
    return x.get_cache(_S2C_KEY, build)


class SparseSpatial2Channel(nn.Module):
    """Space-to-channel by 2: ``[Nf, C]`` → ``[Nc, 8C]`` on the sorted unique parents."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor != 2:
            raise NotImplementedError("only factor 2")
        self.factor = factor

    def forward(self, x: SparseTensor, m: SubdivisionMap | None = None) -> SparseTensor:
        m = m if m is not None else get_s2c_map(x)
        return _coarse_tensor(space_to_channel(x.feats, m), m)


class SparseChannel2Spatial(nn.Module):
    """Channel-to-space by 2: ``[Nc, 8c]`` → ``[Nf, c]`` for the kept children.

    ``forward(x, subdiv)`` keeps children where ``subdiv.feats`` (``[Nc, 8]``, bool or logits > 0) is
    true, row for row with ``x``; ``forward(x, m=map)`` follows an explicit :class:`SubdivisionMap`.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor != 2:
            raise NotImplementedError("only factor 2")
        self.factor = factor

    @staticmethod
    def make_map(x: SparseTensor, subdiv: SparseTensor | torch.Tensor) -> SubdivisionMap:
        f = subdiv.feats if isinstance(subdiv, SparseTensor) else subdiv
        mask = f if f.dtype == torch.bool else f > 0
        m = subdivision_map_from_mask(x.coords, mask, x.batch_size)
        m.coarse_cache = x.spatial_cache
        return m

    def forward(self, x: SparseTensor, subdiv: SparseTensor | torch.Tensor | None = None,
                m: SubdivisionMap | None = None) -> SparseTensor:
        if m is None:
            if subdiv is None:
                raise ValueError("channel-to-space needs a subdivision mask or an explicit map")
            m = self.make_map(x, subdiv)
        return _fine_tensor(channel_to_space(x.feats, m), m)
