"""Core O-Voxel container, constants and small packing helpers (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import OVoxelError
from .grid import flat_keys, morton_encode

#: Default AABB of every TRELLIS.2 caller.
DEFAULT_AABB = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))

#: The official 6-channel PBR layout (``pipeline.pbr_attr_layout``).
ATTR_LAYOUT = {
    "base_color": slice(0, 3),
    "metallic": slice(3, 4),
    "roughness": slice(4, 5),
    "alpha": slice(5, 6),
}
ATTR_CHANNELS = 6

#: Version of the ``.npz`` layout written by :func:`backend.ovoxel.save_npz`.
FORMAT_VERSION = 1


def as_aabb(aabb: Any) -> np.ndarray:
    """``aabb`` as float64 ``[2, 3]``; validates finiteness and positive extent."""
    a = np.asarray(aabb if aabb is not None else DEFAULT_AABB, dtype=np.float64)
    if a.shape != (2, 3):
        raise OVoxelError(f"aabb must have shape (2, 3), got {a.shape}")
    if not np.isfinite(a).all():
        raise OVoxelError("aabb must be finite")
    if not (a[1] > a[0]).all():
        raise OVoxelError(f"aabb max must exceed min on every axis, got {a.tolist()}")
    return a


def check_resolution(resolution: Any) -> int:
    """``resolution`` as a positive int (1 … 2**20)."""
    try:
        r = int(resolution)
    except (TypeError, ValueError):
        raise OVoxelError(f"resolution must be an integer, got {resolution!r}") from None
    if r != resolution or r < 1 or r > (1 << 20):
        raise OVoxelError(f"resolution must be an integer in [1, 2**20], got {resolution!r}")
    return r


def pack_flags(intersected: np.ndarray) -> np.ndarray:
    """bool ``[N, 3]`` -> uint8 ``[N, 1]`` = x | y << 1 | z << 2 (the official file layout)."""
    f = np.asarray(intersected).astype(bool).reshape(-1, 3)
    return (f[:, 0] | (f[:, 1] << 1) | (f[:, 2] << 2)).astype(np.uint8).reshape(-1, 1)


def unpack_flags(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 1]`` or ``[N]`` -> bool ``[N, 3]`` (inverse of :func:`pack_flags`)."""
    p = np.asarray(packed).reshape(-1).astype(np.uint8)
    return ((p[:, None] >> np.arange(3, dtype=np.uint8)) & 1).astype(bool)


def quantize_dual_vertices(dual_vertices: np.ndarray) -> np.ndarray:
    """Official uint8 packing of voxel-local dual vertices: ``floor(clip(u, 0, 1) * 255)``.

    (Truncation, not rounding, exactly like ``data_toolkit/dual_grid.py``.) Read back with ``u8 / 255``.
    """
    u = np.clip(np.asarray(dual_vertices, dtype=np.float32), 0.0, 1.0)
    return np.floor(u * np.float32(255.0)).astype(np.uint8)


@dataclass
class OVoxel:
    """One O-Voxel (shape, optionally PBR attributes) on a sparse grid. Construct with keywords.

    Fields (row ``n`` of every array belongs to ``coords[n]``):

    * ``resolution`` int R; ``aabb`` float64 ``[2, 3]``;
    * ``coords`` int32 ``[N, 3]`` in ``[0, R)``;
    * ``dual_vertices`` float32 ``[N, 3]``, voxel-local offsets (world = ``aabb[0] + (coords + dv) * s``);
    * ``intersected`` bool ``[N, 3]`` (edge-crossed flags, see the package docstring);
    * ``split_weight`` float32 ``[N, 1]`` or ``None`` (VAE output only);
    * ``attrs`` float32 ``[N, 6]`` in [0, 1] or ``None`` (:data:`ATTR_LAYOUT`);
    * ``sides`` int8 ``[N, 3]`` or ``None``: for each flagged edge, the side the *source* surface faces
      there (+1: its normal points to +axis, -1: to -axis, 0: unknown or cancelling crossings). Only our
      encoder knows it (official files and VAE outputs have ``None``); the decoder uses it to keep open
      sheets on their source side (closed surfaces are oriented by the flags alone);
    * ``meta`` free-form dict (encoder statistics, source file, normalisation ...; JSON-able values).
    """

    resolution: int
    aabb: Any
    coords: np.ndarray
    dual_vertices: np.ndarray
    intersected: np.ndarray
    split_weight: Optional[np.ndarray] = None
    attrs: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)
    sides: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.resolution = check_resolution(self.resolution)
        self.aabb = as_aabb(self.aabb)
        self.coords = np.ascontiguousarray(np.asarray(self.coords).reshape(-1, 3), dtype=np.int32)
        self.dual_vertices = np.ascontiguousarray(np.asarray(self.dual_vertices).reshape(-1, 3), dtype=np.float32)
        self.intersected = np.ascontiguousarray(np.asarray(self.intersected).reshape(-1, 3), dtype=bool)
        if self.split_weight is not None:
            self.split_weight = np.ascontiguousarray(np.asarray(self.split_weight, dtype=np.float32).reshape(-1, 1))
        if self.attrs is not None:
            self.attrs = np.ascontiguousarray(np.asarray(self.attrs, dtype=np.float32))
            if self.attrs.ndim == 1:
                self.attrs = self.attrs.reshape(-1, 1)
        if self.sides is not None:
            self.sides = np.ascontiguousarray(np.sign(np.asarray(self.sides)).reshape(-1, 3), dtype=np.int8)

    # ------------------------------------------------------------------ properties
    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])

    @property
    def voxel_size(self) -> np.ndarray:
        """float64 ``[3]``: ``(aabb[1] - aabb[0]) / R``."""
        return (self.aabb[1] - self.aabb[0]) / self.resolution

    def world_dual_vertices(self) -> np.ndarray:
        """float32 ``[N, 3]`` world positions of the dual vertices."""
        return (self.aabb[0] + (self.coords + self.dual_vertices.astype(np.float64)) * self.voxel_size).astype(np.float32)

    def validate(self) -> "OVoxel":
        """Check shapes, ranges, uniqueness and finiteness; raises :class:`OVoxelError`. Returns self."""
        n = self.num_voxels
        R = self.resolution
        for name in ("dual_vertices", "intersected"):
            if getattr(self, name).shape != (n, 3):
                raise OVoxelError(f"{name} must have shape ({n}, 3), got {getattr(self, name).shape}")
        if n and (self.coords.min() < 0 or self.coords.max() >= R):
            raise OVoxelError(f"coords must lie in [0, {R}), got range [{self.coords.min()}, {self.coords.max()}]")
        if not np.isfinite(self.dual_vertices).all():
            raise OVoxelError("dual_vertices contain NaN/inf")
        if self.split_weight is not None:
            if self.split_weight.shape != (n, 1):
                raise OVoxelError(f"split_weight must have shape ({n}, 1), got {self.split_weight.shape}")
            if not np.isfinite(self.split_weight).all() or (self.split_weight < 0).any():
                raise OVoxelError("split_weight must be finite and >= 0")
        if self.sides is not None and self.sides.shape != (n, 3):
            raise OVoxelError(f"sides must have shape ({n}, 3), got {self.sides.shape}")
        if self.attrs is not None:
            if self.attrs.ndim != 2 or self.attrs.shape[0] != n:
                raise OVoxelError(f"attrs must have shape ({n}, C), got {self.attrs.shape}")
            if not np.isfinite(self.attrs).all():
                raise OVoxelError("attrs contain NaN/inf")
        if n:

            k = np.sort(flat_keys(self.coords, R))
            if (k[1:] == k[:-1]).any():
                raise OVoxelError("coords contain duplicate voxels")
        return self

    def take(self, index: np.ndarray) -> "OVoxel":
        """A new OVoxel with rows ``index`` (int indices or bool mask)."""
        return OVoxel(
            resolution=self.resolution, aabb=self.aabb.copy(), coords=self.coords[index],
            dual_vertices=self.dual_vertices[index], intersected=self.intersected[index],
            split_weight=None if self.split_weight is None else self.split_weight[index],
            attrs=None if self.attrs is None else self.attrs[index], meta=dict(self.meta),
            sides=None if self.sides is None else self.sides[index])

    def sorted(self, order: str = "morton") -> "OVoxel":
        """Rows re-ordered: ``"morton"`` (z-order, x high bit) or ``"lex"`` (x, then y, then z)."""

        if order == "morton":
            key = morton_encode(self.coords)
        elif order == "lex":
            key = flat_keys(self.coords, self.resolution)
        else:
            raise OVoxelError(f"unknown order {order!r}")
        return self.take(np.argsort(key, kind="stable"))
