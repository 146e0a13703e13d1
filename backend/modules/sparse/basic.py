"""The sparse tensor used by every sparse module (SC-VAEs, sparse DiT).

A :class:`SparseTensor` is a pair ``feats [N, *C]`` / ``coords [N, 4] int32 (batch, x, y, z)``.
Rows are grouped by batch item in increasing batch index: item ``b`` occupies the contiguous block
``layout[b]``. Inside an item the rows may be in any order (S2C output is sorted, C2S output is
parent-major); all operations match voxels by coordinate, never by position.

Spatial bookkeeping (submanifold-conv neighbour maps, RoPE phases, ...) is memoised in
``spatial_cache``, a plain dict shared by every tensor that has the *same coords object*: tensors
made with :meth:`SparseTensor.replace` without new coords share it, so all convs of one level build
the neighbour map once. Parent/child maps between levels are *not* hidden in that cache for use by
other models; they travel explicitly (see ``backend.modules.sparse.spatial``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["SparseTensor", "sparse_cat", "sparse_unbind"]


class SparseTensor:
    """Batched sparse voxel tensor.

    Args:
        feats: ``[N, *C]`` features, row i belongs to ``coords[i]``.
        coords: ``[N, 4]`` integer ``(batch, x, y, z)``; converted to int32. Rows grouped by batch.
        batch_size: number of items; inferred as ``coords[:, 0].max() + 1`` when omitted (an empty
            item at the end therefore needs it).
        layout: optional per-item row slices (skips the recount when known).
        spatial_cache: optional dict to share (internal; use :meth:`replace`).
    """

    __slots__ = ("feats", "coords", "_layout", "_batch_size", "spatial_cache")

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        batch_size: int | None = None,
        layout: Sequence[slice] | None = None,
        spatial_cache: dict[str, Any] | None = None,
    ) -> None:
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4], got {tuple(coords.shape)}")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        if coords.dtype != torch.int32:
            coords = coords.to(torch.int32)
        if coords.device != feats.device:
            coords = coords.to(feats.device)
        self.feats = feats
        self.coords = coords
        self._layout = list(layout) if layout is not None else None
        self._batch_size = batch_size if batch_size is not None else (
            len(layout) if layout is not None else None)
        self.spatial_cache: dict[str, Any] = spatial_cache if spatial_cache is not None else {}
        if self._layout is None:
            self._compute_layout()  # validates the batch grouping once per coordinate set

    # ------------------------------------------------------------------ layout
    def _compute_layout(self) -> None:
        b = self.coords[:, 0].long()
        n = b.shape[0]
        if self._batch_size is None:
            self._batch_size = int(b.max().item()) + 1 if n else 0
        counts = torch.bincount(b, minlength=self._batch_size).cpu().tolist() if n else [0] * self._batch_size
        if len(counts) > self._batch_size:
            raise ValueError("coords contain a batch index >= batch_size")
        if n and bool((b[1:] < b[:-1]).any()):
            raise ValueError("SparseTensor rows must be grouped by batch in increasing batch index")
        layout, start = [], 0
        for c in counts:
            layout.append(slice(start, start + c))
            start += c
        self._layout = layout

    @property
    def layout(self) -> list[slice]:
        """Per-item row slices: item ``b`` is ``feats[layout[b]]``."""
        if self._layout is None:
            self._compute_layout()
        return self._layout  # type: ignore[return-value]

    @property
    def batch_size(self) -> int:
        """Number of batch items."""
        if self._batch_size is None:
            self._compute_layout()
        return self._batch_size  # type: ignore[return-value]

    @property
    def shape(self) -> torch.Size:
        """``(batch_size, *feats.shape[1:])`` as in the official class."""
        return torch.Size((self.batch_size, *self.feats.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def num_rows(self) -> int:
        return int(self.feats.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def batch_counts(self) -> torch.Tensor:
        """``[B]`` int64 number of rows per item (on the tensor's device)."""
        return torch.tensor([s.stop - s.start for s in self.layout], dtype=torch.long, device=self.device)

    def batch_index(self) -> torch.Tensor:
        """``[N]`` int64 batch index of each row (cached)."""
        bi = self.spatial_cache.get("batch_index")
        if bi is None:
            bi = self.coords[:, 0].long()
            self.spatial_cache["batch_index"] = bi
        return bi

    # ------------------------------------------------------------------ cache
    def get_cache(self, key: str, build: Callable[[], Any] | None = None) -> Any:
        """Return ``spatial_cache[key]``, building and storing it with ``build()`` if missing."""
        if key not in self.spatial_cache:
            if build is None:
                return None
            self.spatial_cache[key] = build()
        return self.spatial_cache[key]

    # ------------------------------------------------------------------ construction
    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> "SparseTensor":
        """New tensor with ``feats`` (same rows); keeps layout and shares the spatial cache.

        With new ``coords`` the result gets a fresh layout and cache.
        """
        if coords is None:
            if feats.shape[0] != self.feats.shape[0]:
                raise ValueError("replace(feats) must keep the row count")
            return SparseTensor(feats, self.coords, self._batch_size, self._layout, self.spatial_cache)
        return SparseTensor(feats, coords, self._batch_size)

    def to(self, *args: Any, **kwargs: Any) -> "SparseTensor":
        """Like ``Tensor.to``: a dtype changes only feats; a device moves feats and coords."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return SparseTensor(feats, self.coords, self._batch_size, self._layout, self.spatial_cache)
        coords = self.coords.to(feats.device)
        return SparseTensor(feats, coords, self._batch_size, self._layout)

    def type(self, dtype: torch.dtype) -> "SparseTensor":
        return self.replace(self.feats.type(dtype))

    def float(self) -> "SparseTensor":
        return self.replace(self.feats.float())

    def half(self) -> "SparseTensor":
        return self.replace(self.feats.half())

    def cpu(self) -> "SparseTensor":
        return self.to("cpu")

    def cuda(self) -> "SparseTensor":
        return self.to("cuda")

    def detach(self) -> "SparseTensor":
        return self.replace(self.feats.detach())

    # ------------------------------------------------------------------ per item
    def __getitem__(self, idx: int) -> "SparseTensor":
        """Item ``idx`` as a batch-1 tensor (batch index reset to 0; feats are a view)."""
        if not isinstance(idx, int):
            raise TypeError("SparseTensor indexing takes one int batch index")
        if idx < 0:
            idx += self.batch_size
        sl = self.layout[idx]
        coords = self.coords[sl].clone()
        coords[:, 0] = 0
        return SparseTensor(self.feats[sl], coords, 1, [slice(0, sl.stop - sl.start)])

    def unbind(self) -> list["SparseTensor"]:
        """All items as batch-1 tensors."""
        return [self[i] for i in range(self.batch_size)]

    def items(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate ``(feats_b, coords_b)`` views per item (coords keep their batch column)."""
        for sl in self.layout:
            yield self.feats[sl], self.coords[sl]

    # ------------------------------------------------------------------ elementwise
    def broadcast_batch(self, other: torch.Tensor) -> torch.Tensor:
        """Expand a per-item tensor ``[B, *C]`` to per-row ``[N, *C]``."""
        return other.index_select(0, self.batch_index())

    def _other(self, other: Any) -> Any:
        if isinstance(other, SparseTensor):
            if other.coords is not self.coords and other.feats.shape[0] != self.feats.shape[0]:
                raise ValueError("elementwise op on SparseTensors with different rows")
            return other.feats
        if isinstance(other, torch.Tensor) and other.dim() == self.feats.dim() \
                and other.shape[0] == self.batch_size and other.shape[0] != self.feats.shape[0]:
            return self.broadcast_batch(other)
        return other

    def __neg__(self) -> "SparseTensor":
        return self.replace(-self.feats)

    def __add__(self, other: Any) -> "SparseTensor":
        return self.replace(self.feats + self._other(other))

    __radd__ = __add__

    def __sub__(self, other: Any) -> "SparseTensor":
        return self.replace(self.feats - self._other(other))

    def __rsub__(self, other: Any) -> "SparseTensor":
        return self.replace(self._other(other) - self.feats)

    def __mul__(self, other: Any) -> "SparseTensor":
        return self.replace(self.feats * self._other(other))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> "SparseTensor":
        return self.replace(self.feats / self._other(other))

    # ------------------------------------------------------------------ dense conversion
    def dense(self, spatial: Sequence[int] | None = None) -> torch.Tensor:
        """Scatter into a dense ``[B, C, X, Y, Z]`` volume (zeros elsewhere); feats must be 2-D."""
        if spatial is None:
            spatial = (self.coords[:, 1:].max(0).values + 1).tolist() if self.num_rows else [1, 1, 1]
        X, Y, Z = (int(s) for s in spatial)
        out = self.feats.new_zeros(self.batch_size, X, Y, Z, self.feats.shape[1])
        c = self.coords.long()
        out[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = self.feats
        return out.permute(0, 4, 1, 2, 3).contiguous()

    def __repr__(self) -> str:
        return (f"SparseTensor(shape={tuple(self.shape)}, rows={self.num_rows}, dtype={self.dtype}, "
                f"device={self.device})")


def sparse_cat(tensors: Sequence[SparseTensor], dim: int = 0) -> SparseTensor:
    """Concatenate along the batch (``dim=0``, items renumbered) or the feature axis (``dim>0``)."""
    if dim == 0:
        feats, coords, layout, start, offset = [], [], [], 0, 0
        for t in tensors:
            c = t.coords.clone()
            c[:, 0] += offset
            coords.append(c)
            feats.append(t.feats)
            for sl in t.layout:
                layout.append(slice(start + sl.start, start + sl.stop))
            start += t.num_rows
            offset += t.batch_size
        return SparseTensor(torch.cat(feats), torch.cat(coords), offset, layout)
    return tensors[0].replace(torch.cat([t.feats for t in tensors], dim=dim))


def sparse_unbind(x: SparseTensor, dim: int = 0) -> list[SparseTensor]:
    """Split into per-item tensors (``dim=0``) or per-feature-slice tensors (``dim>0``)."""
    if dim == 0:
        return x.unbind()
    return [x.replace(f) for f in x.feats.unbind(dim)]
