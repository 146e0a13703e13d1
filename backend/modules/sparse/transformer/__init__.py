"""Sparse transformer blocks, mirroring ``trellis2/modules/sparse/transformer``."""

from .modulated import ModulatedSparseTransformerCrossBlock

__all__ = ["ModulatedSparseTransformerCrossBlock"]
