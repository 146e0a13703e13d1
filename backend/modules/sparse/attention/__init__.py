"""Sparse (variable-length, per-sample) attention, mirroring ``trellis2/modules/sparse/attention``."""

from .modules import SparseMultiHeadAttention, sparse_rope_phases

__all__ = ["SparseMultiHeadAttention", "sparse_rope_phases"]
