"""Triton helpers shared by the voxel-lookup kernels (imported lazily, like every ``triton_*`` module).

Voxel sets are looked up by a flat int64 key ``(x·R + y)·R + z`` in a sorted key array (the torch side
sorts once with ``torch.sort``); :func:`lookup_sorted` is a branch-free vectorised binary search.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["lookup_sorted", "lookup_sorted_pair", "search_steps"]


def search_steps(n: int) -> int:
    """Binary-search iterations that resolve any query in ``n`` sorted keys."""
    return max(1, int(n).bit_length())


@triton.jit
def _lower_bound(keys_ptr, n, q, valid, STEPS):
    lo = tl.zeros_like(q)
    hi = tl.zeros_like(q) + n
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(keys_ptr + mid, mask=active & valid, other=0)
        right = v < q
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    return lo


@triton.jit
def lookup_sorted_pair(keys_ptr, order_ptr, n, q, valid0, valid1, STEPS):
    """Rows of keys ``q`` and ``q + 1`` with one binary search (keys are unique and sorted).

    ``lower_bound(q)`` lands on ``q`` if present; the next key is then at ``pos + 1``, else at ``pos``.
    ``valid0`` / ``valid1`` mask each of the two lookups (e.g. off-grid corners); -1 when absent.
    """
    either = valid0 | valid1
    pos = _lower_bound(keys_ptr, n, q, either, STEPS)
    in0 = either & (pos < n)
    k0 = tl.load(keys_ptr + pos, mask=in0, other=-1)
    found0 = in0 & (k0 == q)          # q present (even if lookup 0 is masked off)
    hit0 = valid0 & found0
    pos1 = tl.where(found0, pos + 1, pos)
    in1 = valid1 & (pos1 < n)
    k1 = tl.load(keys_ptr + pos1, mask=in1, other=-1)
    hit1 = in1 & (k1 == q + 1)
    row0 = tl.load(order_ptr + pos, mask=hit0, other=-1)
    row1 = tl.load(order_ptr + pos1, mask=hit1, other=-1)
    return tl.where(hit0, row0, -1), tl.where(hit1, row1, -1)


@triton.jit
def lookup_sorted(keys_ptr, order_ptr, n, q, valid, STEPS):
    """Row of each key ``q`` (int64 vector) in the set, or -1; lanes with ``valid == False`` give -1.

    ``keys_ptr`` holds the ``n`` sorted keys, ``order_ptr`` the original row of each sorted key.
    ``STEPS`` must be at least ``n.bit_length()``.
    """
    lo = _lower_bound(keys_ptr, n, q, valid, STEPS)
    inside = valid & (lo < n)
    k = tl.load(keys_ptr + lo, mask=inside, other=-1)
    hit = inside & (k == q)
    row = tl.load(order_ptr + lo, mask=hit, other=-1)
    return tl.where(hit, row, -1)
