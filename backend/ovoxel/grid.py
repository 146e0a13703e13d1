"""Sparse-grid helpers: flat keys, Morton codes, and a fast coords -> row index (numpy only)."""

from __future__ import annotations

import numpy as np

from .errors import OVoxelError

# Column tables (one int entry per (x, y) column) are used up to this many columns.
_MAX_COLUMNS = 1 << 26


def flat_keys(coords: np.ndarray, resolution: int) -> np.ndarray:
    """int64 ``(x * R + y) * R + z`` (lexicographic order of the coordinates)."""
    c = np.asarray(coords)
    R = np.int64(resolution)
    return (c[:, 0].astype(np.int64) * R + c[:, 1]) * R + c[:, 2]


def _spread3(v: np.ndarray) -> np.ndarray:
    """Insert two zero bits between the low 21 bits of ``v`` (-> uint64)."""
    x = v.astype(np.uint64) & np.uint64(0x1FFFFF)
    x = (x | (x << np.uint64(32))) & np.uint64(0x1F00000000FFFF)
    x = (x | (x << np.uint64(16))) & np.uint64(0x1F0000FF0000FF)
    x = (x | (x << np.uint64(8))) & np.uint64(0x100F00F00F00F00F)
    x = (x | (x << np.uint64(4))) & np.uint64(0x10C30C30C30C30C3)
    x = (x | (x << np.uint64(2))) & np.uint64(0x1249249249249249)
    return x


def _compact3(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) & np.uint64(0x1249249249249249)
    x = (x | (x >> np.uint64(2))) & np.uint64(0x10C30C30C30C30C3)
    x = (x | (x >> np.uint64(4))) & np.uint64(0x100F00F00F00F00F)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x1F0000FF0000FF)
    x = (x | (x >> np.uint64(16))) & np.uint64(0x1F00000000FFFF)
    x = (x | (x >> np.uint64(32))) & np.uint64(0x1FFFFF)
    return x.astype(np.int64)


def morton_encode(coords: np.ndarray) -> np.ndarray:
    """int64 Morton code ``spread(x) << 2 | spread(y) << 1 | spread(z)`` (x = high bit of each triplet).

    Identical to the official 30-bit ``encode_seq(mode='z_order')`` for coordinates < 1024, extended to
    21 bits per axis.
    """
    c = np.asarray(coords).reshape(-1, 3)
    if c.size and (c.min() < 0 or c.max() >= (1 << 21)):
        raise OVoxelError("morton_encode: coordinates must lie in [0, 2**21)")
    code = (_spread3(c[:, 0]) << np.uint64(2)) | (_spread3(c[:, 1]) << np.uint64(1)) | _spread3(c[:, 2])
    return code.astype(np.int64)


def morton_decode(code: np.ndarray) -> np.ndarray:
    """Inverse of :func:`morton_encode`: int32 ``[N, 3]``."""
    c = np.asarray(code).astype(np.uint64).reshape(-1)
    out = np.stack([_compact3(c >> np.uint64(2)), _compact3(c >> np.uint64(1)), _compact3(c)], axis=1)
    return out.astype(np.int32)


def is_sorted(a: np.ndarray, strict: bool = False) -> bool:
    if a.shape[0] < 2:
        return True
    return bool((a[1:] > a[:-1]).all()) if strict else bool((a[1:] >= a[:-1]).all())


def lex_order(coords: np.ndarray, resolution: int):
    """Permutation sorting coords lexicographically (x, y, z), or ``None`` if already sorted."""
    key = flat_keys(coords, resolution)
    if is_sorted(key):
        return None
    return np.argsort(key, kind="stable")


class VoxelIndex:
    """Map voxel coordinates to row indices of a sparse voxel list (``-1`` when absent / off-grid).

    Built once from ``coords [N, 3]`` (any order; duplicates: any one of the equal rows is returned).
    The voxels are kept in lexicographic order with a dense table of (x, y)-column starts
    (``R*R`` int entries), so a lookup is two gathers plus a short scan of the column.
    """

    def __init__(self, coords: np.ndarray, resolution: int):
        c = np.asarray(coords).reshape(-1, 3)
        self.resolution = R = int(resolution)
        self.n = n = c.shape[0]
        if n and (c.min() < 0 or c.max() >= R):
            raise OVoxelError(f"coords outside [0, {R})")
        key = flat_keys(c, R)
        order = None if is_sorted(key) else np.argsort(key, kind="stable")
        self.rows = order  # sorted position -> row (None = identity)
        skey = key if order is None else key[order]
        self.skey = skey
        self.z = (skey % R).astype(np.int32)
        self.use_columns = R * R <= _MAX_COLUMNS
        if self.use_columns:
            col = skey // R
            counts = np.bincount(col, minlength=R * R) if n else np.zeros(R * R, np.int64)
            dt = np.int32 if n < (1 << 31) - 1 else np.int64
            self.col_start = np.zeros(R * R + 1, dt)
            np.cumsum(counts, out=self.col_start[1:])

    def _rows_of(self, pos: np.ndarray) -> np.ndarray:
        return pos if self.rows is None else self.rows[pos]

    def lookup_inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Like :meth:`lookup` for separate coordinate arrays already known to lie in ``[0, R)``."""
        R = self.resolution
        nq = x.shape[0]
        out = np.full(nq, -1, np.int64)
        if self.n == 0 or nq == 0:
            return out
        if not self.use_columns:
            k = (x.astype(np.int64) * R + y) * R + z
            pos = np.minimum(np.searchsorted(self.skey, k), self.n - 1)
            hit = self.skey[pos] == k
            out[hit] = self._rows_of(pos[hit])
            return out
        col = x.astype(np.int64) * R + y
        s = self.col_start[col].astype(np.int64)
        e = self.col_start[col + 1].astype(np.int64)
        cnt = e - s
        last = self.n - 1
        zz = self.z
        # d = 0 for everyone
        p = np.minimum(s, last)
        hit = (cnt > 0) & (zz[p] == z)
        out[hit] = p[hit]
        rem = np.flatnonzero(~hit & (cnt > 1))
        d = 1
        while rem.shape[0] and d < 4:
            p = np.minimum(s[rem] + d, last)
            h = (cnt[rem] > d) & (zz[p] == z[rem])
            out[rem[h]] = p[h]
            rem = rem[~h & (cnt[rem] > d + 1)]
            d += 1
        if rem.shape[0]:
            # binary search in the remaining (long) columns
            lo = s[rem] + d
            hi = e[rem]
            zq = z[rem]
            while True:
                act = lo < hi
                if not act.any():
                    break
                mid = (lo + hi) >> 1
                go = act & (zz[np.minimum(mid, last)] < zq)
                lo = np.where(go, mid + 1, lo)
                hi = np.where(act & ~go, mid, hi)
            p = np.minimum(lo, last)
            h = (lo < e[rem]) & (zz[p] == zq)
            out[rem[h]] = p[h]
        found = out >= 0
        if self.rows is not None:
            out[found] = self.rows[out[found]]
        return out

    def lookup(self, query: np.ndarray) -> np.ndarray:
        """int64 ``[Q]`` row of each query coordinate ``[Q, 3]``, ``-1`` if absent or outside ``[0, R)^3``."""
        q = np.asarray(query).reshape(-1, 3)
        R = self.resolution
        inside = ((q >= 0) & (q < R)).all(axis=1)
        if inside.all():
            return self.lookup_inside(q[:, 0], q[:, 1], q[:, 2])
        out = np.full(q.shape[0], -1, np.int64)
        qi = q[inside]
        out[inside] = self.lookup_inside(qi[:, 0], qi[:, 1], qi[:, 2])
        return out

    def contains(self, query: np.ndarray) -> np.ndarray:
        """bool ``[Q]``: whether each query voxel exists."""
        return self.lookup(query) >= 0
