"""Submanifold 3×3×3 sparse convolution in pure PyTorch: the functional ops behind
:class:`~.conv.SparseConv3d` and the reference of the GPU kernels (``kernels.sparse_conv``).

Weight ``[C_out, 3, 3, 3, C_in]`` (official flex_gemm layout): tap ``v = 9i + 3j + l`` multiplies the
neighbour at ``(x+i-1, y+j-1, z+l-1)``; missing neighbours count as zero. The algorithms (neighbour map by
sorted keys + ``searchsorted``; ``gather`` im2col vs ``pairs`` per-tap GEMM) are described in
:mod:`.conv`. Nothing here knows about :class:`~.basic.SparseTensor` or the kernels package.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

__all__ = [
    "build_neighbor_map", "build_pair_lists", "needs_autograd", "pack_coords", "submanifold_conv3d",
    "submanifold_conv3d_pairs", "submanifold_conv3d_rows", "auto_algorithm", "ALGORITHM", "CHUNK_BYTES", "INDEX_THREADS",
]

#: Upper bound (bytes) of the gathered block per chunk. Tunable via ``TRELLIS2_CONV_CHUNK_MB``.
CHUNK_BYTES: int = int(float(os.environ.get("TRELLIS2_CONV_CHUNK_MB", "32")) * 2**20)

#: Default algorithm: ``"auto"``, ``"gather"`` (im2col) or ``"pairs"`` (per-tap gather/GEMM/scatter).
#: ``auto`` = ``gather`` on GPU and multi-threaded CPU, ``pairs`` on one CPU thread (BENCHMARKS.md).
ALGORITHM: str = os.environ.get("TRELLIS2_SPARSE_CONV_ALGO", "auto")


#: torch CPU threads used for the integer bookkeeping (neighbour map, pair lists). These ops are
#: memory-bound and cheap on one thread, but on a CPU shared with other jobs every OpenMP region
#: pays for a descheduled worker (measured 10-40x slower per op with 2 threads at load >= 2).
#: ``0`` leaves torch's thread count alone. Env: ``TRELLIS2_SPARSE_INDEX_THREADS``.
INDEX_THREADS: int = int(os.environ.get("TRELLIS2_SPARSE_INDEX_THREADS", "1"))


@contextlib.contextmanager
def _index_threads(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU bookkeeping with :data:`INDEX_THREADS` torch threads, then restore."""
    prev = torch.get_num_threads()
    if device.type != "cpu" or INDEX_THREADS <= 0 or INDEX_THREADS >= prev:
        yield
        return
    torch.set_num_threads(INDEX_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def auto_algorithm(feats: torch.Tensor, cin: int, cout: int) -> str:
    """``gather`` on GPU; on CPU ``pairs`` with one torch thread, else ``gather``.

    Measured (BENCHMARKS.md): on one thread pairs is 1.4-1.9x faster than gather and on par with
    spconv; with 2 threads on a shared CPU the many mid-size ops of pairs lose to gather's few big
    GEMMs at 1M voxels (4.1 s vs 10.1 s at 64 ch, 68 s vs 117 s at 256 ch).
    """
    if feats.device.type != "cpu":
        return "gather"
    return "pairs" if torch.get_num_threads() == 1 else "gather"


#: Offsets of the 27 taps, tap v = 9i + 3j + l  ->  (i-1, j-1, l-1) on (x, y, z).
_OFFSETS = torch.stack(torch.meshgrid(
    torch.arange(-1, 2), torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij"), -1).reshape(27, 3)


def pack_coords(coords: torch.Tensor, pad: int = 1) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pack ``(b, x, y, z)`` into monotone int64 keys over a grid padded by ``pad`` on each side.

    The key order equals lexicographic ``(b, x, y, z)`` order. Returns the keys and the padded
    extents ``(X, Y, Z)`` so that callers can pack shifted coordinates consistently.
    """
    c = coords.long()
    if c.shape[0] == 0:
        return c.new_zeros(0), (1, 1, 1)
    lo = c[:, 1:].min(0).values
    if bool((lo < 0).any()):
        raise ValueError("sparse coords must be non-negative")
    ext = (c[:, 1:].max(0).values + 1 + 2 * pad).tolist()
    X, Y, Z = (int(e) for e in ext)
    key = ((c[:, 0] * X + (c[:, 1] + pad)) * Y + (c[:, 2] + pad)) * Z + (c[:, 3] + pad)
    return key, (X, Y, Z)


def build_neighbor_map(coords: torch.Tensor) -> torch.Tensor:
    """``[N, 27]`` int32: input row of each voxel's neighbour at tap v, or -1 when absent.

    int32 halves the map's memory (108 MB at 1M voxels); row counts stay far below 2^31.
    """
    n = coords.shape[0]
    device = coords.device
    if n == 0:
        return torch.empty(0, 27, dtype=torch.int32, device=device)
    with _index_threads(device):
        return _build_neighbor_map(coords)


def _build_neighbor_map(coords: torch.Tensor) -> torch.Tensor:
    n = coords.shape[0]
    device = coords.device
    key, (X, Y, Z) = pack_coords(coords, pad=1)
    sorted_key, order = torch.sort(key)
    off = _OFFSETS.to(device)
    delta = (off[:, 0] * Y + off[:, 1]) * Z + off[:, 2]          # [27] key shift of each tap
    nbr = torch.full((n, 27), -1, dtype=torch.int32, device=device)
    rows = torch.arange(n, device=device)
    nbr[:, 13] = rows.to(torch.int32)
    # Submanifold symmetry: j is i's neighbour at tap v  <=>  i is j's neighbour at tap 26 - v,
    # so only the 13 taps before the centre are searched. One tap at a time keeps temporaries O(N).
    for v in range(13):
        q = key + delta[v]
        pos = torch.searchsorted(sorted_key, q).clamp_(max=n - 1)
        hit = sorted_key[pos] == q
        i = rows[hit]
        j = order[pos[hit]]
        nbr[i, v] = j.to(torch.int32)
        nbr[j, 26 - v] = i.to(torch.int32)
    return nbr


def _chunk_rows(cin: int, elem: int) -> int:
    return max(1, CHUNK_BYTES // max(1, 27 * cin * elem))


def submanifold_conv3d_rows(
    feats: torch.Tensor,
    nbr: torch.Tensor,
    rows: torch.Tensor | None,
    weight2d: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Conv output at ``rows`` (all rows when None) for a ``[C_out, 27·C_in]`` weight matrix.

    ``feats [N, C_in]``, ``nbr [N, 27]``; returns ``[len(rows), C_out]``. Chunked so the gathered
    im2col block never exceeds :data:`CHUNK_BYTES`.
    """
    n, cin = feats.shape
    cout = weight2d.shape[0]
    m = n if rows is None else rows.shape[0]
    if m == 0:
        return feats.new_empty(0, cout)
    # missing neighbours gather row 0 and are then zeroed in the (small) chunk buffer, so no padded
    # copy of the whole feature matrix is ever made
    wt = weight2d.t()
    step = _chunk_rows(cin, feats.element_size())
    if needs_autograd(feats, weight2d, bias):
        out = feats.new_empty(m, cout) if m > step else None
        for s in range(0, m, step):
            e = min(m, s + step)
            idx = nbr[s:e] if rows is None else nbr.index_select(0, rows[s:e])
            miss = (idx < 0).unsqueeze(-1)
            cols = feats.index_select(0, idx.clamp(min=0).reshape(-1)).view(e - s, 27, cin)
            cols = cols.masked_fill(miss, 0).reshape(e - s, 27 * cin)
            res = torch.addmm(bias, cols, wt) if bias is not None else cols @ wt
            if out is None:
                return res
            out[s:e] = res
        return out
    # inference: one reused im2col buffer, results written in place
    out = feats.new_empty(m, cout)
    buf = feats.new_empty(min(m, step) * 27, cin)
    for s in range(0, m, step):
        e = min(m, s + step)
        idx = nbr[s:e] if rows is None else nbr.index_select(0, rows[s:e])
        miss = (idx < 0).unsqueeze(-1)
        g = torch.index_select(feats, 0, idx.clamp(min=0).reshape(-1), out=buf[:(e - s) * 27])
        g.view(e - s, 27, cin).masked_fill_(miss, 0)
        cols = g.view(e - s, 27 * cin)
        if bias is not None:
            torch.addmm(bias, cols, wt, out=out[s:e])
        else:
            torch.mm(cols, wt, out=out[s:e])
    return out


def needs_autograd(*ts: torch.Tensor | None) -> bool:
    """True when autograd would record an op on these tensors (grad enabled and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def build_pair_lists(nbr: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The 26 off-centre taps as ``(tap, dst, src)`` with ``src = nbr[dst, tap]`` present.

    ``dst`` is ascending in every list (so a block of output rows is one contiguous slice of each
    list). Only taps v < 13 are read from ``nbr``; tap ``26 - v`` is the same pairs swapped
    (submanifold symmetry), re-sorted by its own ``dst``. ~140 bytes per voxel on surfaces.
    """
    out: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    with _index_threads(nbr.device):
        for v in range(13):
            col = nbr[:, v]
            i = torch.nonzero(col >= 0).squeeze(1)
            j = col.index_select(0, i).long()
            out.append((v, i, j))
            j_sorted, order = torch.sort(j)
            out.append((26 - v, j_sorted, i.index_select(0, order)))
    return out


def submanifold_conv3d_pairs(
    feats: torch.Tensor, nbr: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    pairs: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Per tap: gather the voxels that have that neighbour → GEMM with the tap's slice → scatter-add.

    Chunks of at most :data:`CHUNK_BYTES` of temporaries. ``pairs`` (from :func:`build_pair_lists`)
    is derived from ``nbr`` when not given. Without autograd the gathered rows and the GEMM result
    go to two reused buffers (no per-tap allocations / page faults).
    """
    n, cin = feats.shape
    cout = weight.shape[0]
    if pairs is None:
        if nbr is None:
            raise ValueError("need nbr or pairs")
        pairs = build_pair_lists(nbr)
    w = weight.to(feats.dtype).reshape(cout, 27, cin)
    grad = needs_autograd(feats, weight, bias)
    # the centre tap pairs every voxel with itself: a plain GEMM initialises the output
    out = feats @ w[:, 13].t()
    if bias is not None:
        out += bias.to(feats.dtype)
    step = max(1, CHUNK_BYTES // max(1, (cin + cout) * feats.element_size()))
    gbuf = None if grad else feats.new_empty(min(step, n), cin)
    ybuf = None if grad else feats.new_empty(min(step, n), cout)
    for tap, dst, src in pairs:
        wt = w[:, tap].t()
        for s in range(0, dst.shape[0], step):
            r, j = dst[s:s + step], src[s:s + step]
            ridx = r.unsqueeze(1).expand(-1, cout)  # broadcast index: scatter_add_ is 2-14x faster
            if grad:                                # than index_add_ on a busy multi-thread CPU
                out = out.scatter_add(0, ridx, feats.index_select(0, j) @ wt)
            else:
                k = r.shape[0]
                g = torch.index_select(feats, 0, j, out=gbuf[:k])
                out.scatter_add_(0, ridx, torch.mm(g, wt, out=ybuf[:k]))
    return out


def submanifold_conv3d(
    feats: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    algorithm: str | None = None, pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Submanifold conv of ``feats [N, C_in]`` with ``weight [C_out, 3, 3, 3, C_in]`` over ``nbr``.

    ``algorithm``: ``"auto"``, ``"gather"`` (im2col) or ``"pairs"``; default :data:`ALGORITHM`.
    """
    cout, cin = weight.shape[0], weight.shape[-1]
    if feats.shape[1] != cin:
        raise ValueError(f"conv expects {cin} input channels, got {feats.shape[1]}")
    algo = algorithm or ALGORITHM
    if algo == "auto":
        algo = auto_algorithm(feats, cin, cout)
    if algo == "pairs":
        return submanifold_conv3d_pairs(feats, nbr, weight, bias, pairs)
    if algo != "gather":
        raise ValueError(f"unknown sparse conv algorithm {algo!r}")
    w2 = weight.to(feats.dtype).reshape(cout, 27 * cin)
    b = bias.to(feats.dtype) if bias is not None else None
    return submanifold_conv3d_rows(feats, nbr, None, w2, b)
