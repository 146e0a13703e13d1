"""Submanifold 3×3×3 sparse conv (forward, inference) over a cached neighbour map.

Public ops (dispatched by :mod:`kernels.registry` on the device of ``feats``):

* :func:`submanifold_conv3d` ``(feats [N, C_in], nbr [N, 27], weight [C_out, 3, 3, 3, C_in], bias [C_out] | None)
  -> [N, C_out]``;
* :func:`submanifold_conv3d_rows` ``(feats, nbr, rows [M] | None, weight2d [C_out, 27·C_in], bias) -> [M, C_out]``,
  the conv evaluated only at output ``rows`` (used by the C2S early-pruning path).

Conventions (``shared/golden/README.md``): tap ``v = 9i + 3j + l`` of the weight multiplies the
neighbour at ``(x+i−1, y+j−1, z+l−1)``; ``nbr[r, v]`` is that neighbour's row or ``-1`` when absent
(absent neighbours count as zero); the output has ``feats``' dtype; the kernel accumulates in fp32.

The reference is the sparse-net module's own pure-PyTorch gather+matmul
(``backend.modules.sparse.conv_torch.submanifold_conv3d`` / ``submanifold_conv3d_rows``): one
implementation of each thing. ``conv_torch`` knows nothing of this package, so the sparse conv module
can dispatch here without an import cycle. The Triton kernel is :mod:`kernels.triton_sparse_conv`.
"""

from __future__ import annotations

import torch

from backend.modules.sparse import conv_torch

from . import registry

__all__ = ["submanifold_conv3d", "submanifold_conv3d_rows"]


def _reference_conv(feats: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """Pure-PyTorch reference (the sparse module's gather + matmul)."""
    return conv_torch.submanifold_conv3d(feats, nbr, weight, bias)


def _reference_conv_rows(feats: torch.Tensor, nbr: torch.Tensor, rows: torch.Tensor | None,
                         weight2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Pure-PyTorch reference of the row-subset conv (weights already in ``feats``' dtype)."""
    return conv_torch.submanifold_conv3d_rows(feats, nbr, rows, weight2d.to(feats.dtype), bias.to(feats.dtype) if bias is not None else None)


registry.register("submanifold_conv3d", _reference_conv, "kernels.triton_sparse_conv:submanifold_conv3d")
registry.register("submanifold_conv3d_rows", _reference_conv_rows,
                  "kernels.triton_sparse_conv:submanifold_conv3d_rows")


def submanifold_conv3d(feats: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Submanifold 3×3×3 conv of ``feats [N, C_in]`` over ``nbr [N, 27]`` → ``[N, C_out]``.

    Args:
        feats: fp32 / fp16 / bf16 features.
        nbr: int32 or int64 neighbour map, ``-1`` for a missing neighbour.
        weight: ``[C_out, 3, 3, 3, C_in]`` (cast to ``feats.dtype``).
        bias: ``[C_out]`` or None.

    The kernel is forward-only: when autograd is recording (grad enabled and an input requires grad,
    e.g. a model not run under ``torch.no_grad()`` / ``inference_mode()``) the reference runs instead.
    """
    if conv_torch.needs_autograd(feats, weight, bias):
        return _reference_conv(feats, nbr, weight, bias)
    return registry.call("submanifold_conv3d", feats.device, feats, nbr, weight, bias)


def submanifold_conv3d_rows(feats: torch.Tensor, nbr: torch.Tensor, rows: torch.Tensor | None,
                            weight2d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The conv at output ``rows`` only (all rows when None) for ``weight2d [C_out, 27·C_in]``.

    Forward-only kernel, like :func:`submanifold_conv3d` (the reference runs when autograd records).
    """
    if conv_torch.needs_autograd(feats, weight2d, bias):
        return _reference_conv_rows(feats, nbr, rows, weight2d, bias)
    return registry.call("submanifold_conv3d_rows", feats.device, feats, nbr, rows, weight2d, bias)
