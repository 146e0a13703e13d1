"""Per-voxel linear layer on :class:`SparseTensor` features (official ``SparseLinear``)."""

from __future__ import annotations

import torch.nn as nn

from .basic import SparseTensor

__all__ = ["SparseLinear"]


class SparseLinear(nn.Linear):
    """``nn.Linear`` applied to ``x.feats``; parameters ``weight [out, in]``, ``bias [out]``."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))
