"""Submanifold 3×3×3 sparse convolution module (official flex_gemm weight layout): :class:`SparseConv3d`,
the per-tensor caches of its index maps and the choice of implementation. The pure-PyTorch ops live in
:mod:`.conv_torch` (re-exported here).

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
   variable ``TRELLIS2_SPARSE_CONV_ALGO``; both chunked to :data:`.conv_torch.CHUNK_BYTES` of temporaries):

   * ``"gather"``: im2col — gather ``[M, 27·C_in]`` rows into a reused chunk buffer (missing
     neighbours zeroed there, no padded copy of the features) and do one ``addmm`` per chunk with
     ``W.reshape(C_out, 27·C_in)``;
   * ``"pairs"``: per tap, gather only the voxels that *have* that neighbour, multiply by the tap's
     ``[C_in, C_out]`` slice and scatter-add into the output. It skips the missing neighbours
     (~10 of 27 on surface-like structures), so it does ~35 % fewer FLOPs; faster than ``gather``
     on one CPU thread, slower with several threads on a busy CPU (see ``BENCHMARKS.md``);
   * ``"auto"`` (default) picks between them (see :func:`.conv_torch.auto_algorithm`).

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

import logging
import math
import os
from typing import Any

import torch
import torch.nn as nn

from . import conv_torch
from .basic import SparseTensor
from .conv_torch import (build_neighbor_map, build_pair_lists, pack_coords, submanifold_conv3d,
                         submanifold_conv3d_pairs, submanifold_conv3d_rows)

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
]

_NBR_KEY = "submconv3_nbr"
_PAIRS_KEY = "submconv3_pairs"


def get_neighbor_map(x: SparseTensor) -> torch.Tensor:
    """The cached neighbour map of ``x`` (built on first use)."""
    return x.get_cache(_NBR_KEY, lambda: build_neighbor_map(x.coords))


def get_pair_lists(x: SparseTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cached pair lists of ``x`` (built from its neighbour map on first use)."""
    return x.get_cache(_PAIRS_KEY, lambda: build_pair_lists(get_neighbor_map(x)))


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
        algo = conv_torch.ALGORITHM
        if algo == "auto":
            algo = conv_torch.auto_algorithm(x.feats, self.in_channels, self.out_channels)
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
