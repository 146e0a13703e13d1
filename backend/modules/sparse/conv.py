"""Submanifold 3×3×3 sparse convolution (official flex_gemm weight layout), pure PyTorch.

Weight ``[C_out, 3, 3, 3, C_in]``: kernel index ``(i, j, l)`` multiplies the neighbour at
``(x+i-1, y+j-1, z+l-1)`` of the same batch item, i.e. tap ``v = 9i + 3j + l``. The output exists only
at the input sites; missing neighbours count as zero; bias is added. This is the cross-correlation
``F.conv3d(dense, w.permute(0, 4, 1, 2, 3), padding=1)`` restricted to the active sites.

Algorithm (default, CPU and GPU):

1. :func:`build_neighbor_map` packs every coordinate into one int64 key (padded by one voxel on every
   side so ±1 offsets never alias across rows/items), sorts the keys once and finds the 27 neighbours
   of every voxel with ``searchsorted`` → ``nbr [N, 27]`` (input row or -1). The map is cached in the
   tensor's ``spatial_cache`` so all convs of one level share it.
2. :func:`submanifold_conv3d` then runs one of two algorithms (``algorithm=`` or the environment
   variable ``TRELLIS2_SPARSE_CONV_ALGO``; both chunked to :data:`CHUNK_BYTES` of temporaries):

   * ``"gather"``: im2col — gather ``[M, 27·C_in]`` rows into a reused chunk buffer (missing
     neighbours zeroed there, no padded copy of the features) and do one ``addmm`` per chunk with
     ``W.reshape(C_out, 27·C_in)``;
   * ``"pairs"``: per tap, gather only the voxels that *have* that neighbour, multiply by the tap's
     ``[C_in, C_out]`` slice and scatter-add into the output. It skips the missing neighbours
     (~10 of 27 on surface-like structures), so it does ~35 % fewer FLOPs; faster than ``gather``
     on one CPU thread, slower with several threads on a busy CPU (see ``BENCHMARKS.md``);
   * ``"auto"`` (default) picks between them (see :func:`_auto_algorithm`).

On CUDA tensors :class:`SparseConv3d` hands the conv (over the same cached neighbour map) to the
project's ``kernels`` package (a Triton kernel, falling back to :func:`submanifold_conv3d` as its
reference) when it imports — untested here, no GPU.

An optional spconv path (``SPARSE_CONV_BACKEND=spconv``, used when ``spconv.pytorch`` imports and
the features are fp32/fp16) hands the conv to spconv's ``SubMConv3d``, whose KRSC weight layout and
tap orientation equal ours: its Native algorithm on CPU (tested in CI with ``spconv-cu120`` against
the golden data and this module), its implicit GEMM on CUDA (needs a GPU to test). The CPU-only
``spconv`` package is *not* supported: it is wrong with several OpenMP threads (environment notes).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator

import torch
import torch.nn as nn

from .basic import SparseTensor

log = logging.getLogger(__name__)

__all__ = [
    "SparseConv3d",
    "build_neighbor_map",
    "get_neighbor_map",
    "submanifold_conv3d",
    "submanifold_conv3d_rows",
    "submanifold_conv3d_pairs",
    "build_pair_lists",
    "get_pair_lists",
    "pack_coords",
    "CHUNK_BYTES",
    "ALGORITHM",
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


def _auto_algorithm(feats: torch.Tensor, cin: int, cout: int) -> str:
    """``gather`` on GPU; on CPU ``pairs`` with one torch thread, else ``gather``.

    Measured (BENCHMARKS.md): on one thread pairs is 1.4-1.9x faster than gather and on par with
    spconv; with 2 threads on a shared CPU the many mid-size ops of pairs lose to gather's few big
    GEMMs at 1M voxels (4.1 s vs 10.1 s at 64 ch, 68 s vs 117 s at 256 ch).
    """
    if feats.device.type != "cpu":
        return "gather"
    return "pairs" if torch.get_num_threads() == 1 else "gather"


_NBR_KEY = "submconv3_nbr"
_PAIRS_KEY = "submconv3_pairs"

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


def get_neighbor_map(x: SparseTensor) -> torch.Tensor:
    """The cached neighbour map of ``x`` (built on first use)."""
    return x.get_cache(_NBR_KEY, lambda: build_neighbor_map(x.coords))


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
    if _needs_autograd(feats, weight2d, bias):
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


def _needs_autograd(*ts: torch.Tensor | None) -> bool:
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


def get_pair_lists(x: SparseTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cached pair lists of ``x`` (built from its neighbour map on first use)."""
    return x.get_cache(_PAIRS_KEY, lambda: build_pair_lists(get_neighbor_map(x)))


def _needs_autograd(*ts: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


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
    grad = _needs_autograd(feats, weight, bias)
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
        algo = _auto_algorithm(feats, cin, cout)
    if algo == "pairs":
        return submanifold_conv3d_pairs(feats, nbr, weight, bias, pairs)
    if algo != "gather":
        raise ValueError(f"unknown sparse conv algorithm {algo!r}")
    w2 = weight.to(feats.dtype).reshape(cout, 27 * cin)
    b = bias.to(feats.dtype) if bias is not None else None
    return submanifold_conv3d_rows(feats, nbr, None, w2, b)


# --------------------------------------------------------------------------------------------
# Optional spconv path (SPARSE_CONV_BACKEND=spconv). Tested on CPU (algo Native) against the golden
# data and this module in CI; the CUDA algorithm (MaskImplicitGemm) needs a GPU.
# --------------------------------------------------------------------------------------------
_SPCONV: Any = None
_SPCONV_CHECKED = False
#: dtypes spconv's kernels take (its CPU Native algorithm has no bf16; the TRELLIS.2 SC-VAEs run fp16)
_SPCONV_DTYPES = (torch.float32, torch.float16)


def conv_backend() -> str:
    """The sparse-conv backend selected by ``SPARSE_CONV_BACKEND`` (``torch`` default, or ``spconv``)."""
    name = os.environ.get("SPARSE_CONV_BACKEND", "torch").strip().lower() or "torch"
    if name not in ("torch", "spconv"):
        raise ValueError(f"SPARSE_CONV_BACKEND must be 'torch' or 'spconv', got {name!r}")
    return name


def _spconv_module() -> Any:
    """``spconv.pytorch`` if selected with ``SPARSE_CONV_BACKEND=spconv`` and importable, else None
    (checked once per process; an import failure is logged once and the torch path is used)."""
    global _SPCONV, _SPCONV_CHECKED
    if not _SPCONV_CHECKED:
        _SPCONV_CHECKED = True
        _SPCONV = None
        if conv_backend() == "spconv":
            try:
                import warnings

                with warnings.catch_warnings():  # spconv 2.3 uses deprecated torch.cuda.amp decorators
                    warnings.simplefilter("ignore", FutureWarning)
                    import spconv.pytorch as spconv_pt  # type: ignore[import-not-found]
                _SPCONV = spconv_pt
                log.info("sparse conv: spconv %s", getattr(spconv_pt, "__version__", ""))
            except Exception as e:  # noqa: BLE001 - any import problem means "not available"
                log.warning("SPARSE_CONV_BACKEND=spconv but spconv cannot be imported (%s); using the torch "
                            "sparse conv", e)
    return _SPCONV


def _spconv_usable(x: SparseTensor) -> bool:
    return x.feats.dtype in _SPCONV_DTYPES and _spconv_module() is not None


def _spconv_forward(conv: "SparseConv3d", x: SparseTensor) -> torch.Tensor:
    """The conv by spconv's ``SubMConv3d`` (KRSC weight = our ``[C_out, 3, 3, 3, C_in]``, same taps).

    spconv's rulebook is kept in the tensor's ``spatial_cache`` (one per sparse structure, like our
    neighbour map), so every conv of a level builds it once. CPU tensors use spconv's Native algorithm
    (its default implicit GEMM is CUDA-only).
    """
    sp = _SPCONV
    spatial = x.get_cache("spconv_spatial_shape", lambda: (x.coords[:, 1:].amax(0) + 1).tolist() if x.coords.shape[0]
                          else [1, 1, 1])
    indice_dict = x.get_cache("spconv_indice_dict", dict)  # spconv's rulebooks of this structure
    coords = x.coords if x.coords.dtype == torch.int32 else x.coords.int()
    t = sp.SparseConvTensor(x.feats.contiguous(), coords.contiguous(), spatial, x.batch_size,
                            indice_dict=indice_dict)
    key = (x.device.type, conv.bias is not None)
    mod = conv.__dict__.get("_spconv_impl")
    if mod is None or conv.__dict__.get("_spconv_key") != key:
        algo = sp.ConvAlgo.Native if x.device.type == "cpu" else None
        kw = {"algo": algo} if algo is not None else {}
        with torch.device("meta"):
            mod = sp.SubMConv3d(conv.in_channels, conv.out_channels, 3, bias=conv.bias is not None,
                                indice_key="trellis_subm3", **kw)
        conv.__dict__["_spconv_impl"] = mod  # not a registered submodule: no extra state_dict keys
        conv.__dict__["_spconv_key"] = key
    mod.weight = conv.weight  # the same Parameter (same layout), so .to()/dtype changes follow
    mod.bias = conv.bias
    y = mod(t)
    x.spatial_cache["spconv_indice_dict"] = y.indice_dict  # spconv returns a copy holding the new rulebook
    return y.features


def _gpu_kernels(x: SparseTensor) -> Any:
    """The project's ``kernels`` package (Triton conv over our neighbour map, with this module's
    gather conv as its reference) for CUDA tensors, else None. **Untested here (no GPU).**"""
    if x.device.type != "cuda":
        return None
    try:
        import kernels  # top-level sibling of ``backend`` in the repo and the staged extension
    except ImportError:
        return None
    return kernels if hasattr(kernels, "submanifold_conv3d") else None


class SparseConv3d(nn.Module):
    """Submanifold 3×3×3 conv on a :class:`SparseTensor`; parameters ``weight [C_out,3,3,3,C_in]``, ``bias``.

    Only ``kernel_size=3, stride=1, dilation=1, padding=None`` (all TRELLIS.2 uses) is supported.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, padding: Any = None, bias: bool = True,
                 indice_key: str | None = None) -> None:
        super().__init__()
        if kernel_size != 3 or stride != 1 or dilation != 1 or padding is not None:
            raise NotImplementedError("only submanifold 3x3x3, stride 1 sparse conv is implemented")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        fan_in = 27 * self.in_channels
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if _spconv_usable(x):
            return x.replace(_spconv_forward(self, x))
        kern = _gpu_kernels(x)
        if kern is not None:  # pragma: no cover - CUDA only
            return x.replace(kern.submanifold_conv3d(x.feats, get_neighbor_map(x), self.weight, self.bias))
        algo = ALGORITHM if ALGORITHM != "auto" else _auto_algorithm(x.feats, self.in_channels, self.out_channels)
        if algo == "pairs":
            out = submanifold_conv3d_pairs(x.feats, None, self.weight, self.bias, get_pair_lists(x))
        else:
            out = submanifold_conv3d(x.feats, get_neighbor_map(x), self.weight, self.bias, algo)
        return x.replace(out)

    def forward_children(self, x: SparseTensor, parent: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
        """Channel-to-space-aware conv: outputs only the kept children's channel slices.

        For a conv with ``C_out = 8·c`` followed by channel-to-space, child ``(parent[j], child[j])``
        needs only output channels ``[k·c, (k+1)·c)`` at row ``parent[j]``. This computes exactly those
        (``[len(parent), c]``), skipping the pruned children's share of the matmul (early pruning).
        """
        cout, cin = self.out_channels, self.in_channels
        if cout % 8:
            raise ValueError("forward_children needs C_out divisible by 8")
        c = cout // 8
        nbr = get_neighbor_map(x)
        feats = x.feats
        w = self.weight.to(feats.dtype).reshape(8, c, 27 * cin)
        b = self.bias.to(feats.dtype).reshape(8, c) if self.bias is not None else None
        kern = _gpu_kernels(x)
        rows_fn = kern.submanifold_conv3d_rows if kern is not None else submanifold_conv3d_rows
        out = feats.new_empty(parent.shape[0], c)
        for k in range(8):
            sel = torch.nonzero(child == k).squeeze(1)
            if sel.numel() == 0:
                continue
            out[sel] = rows_fn(feats, nbr, parent.index_select(0, sel), w[k], b[k] if b is not None else None)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=3 (submanifold)"
