"""Attention building blocks (dense), mirroring ``trellis2/modules/attention``."""

from .full_attn import scaled_dot_product_attention, varlen_attention
from .modules import MultiHeadAttention, MultiHeadAttentionBase, MultiHeadRMSNorm
from .rope import RotaryPositionEmbedder, apply_rotary_embedding, rope_frequencies

__all__ = [
    "scaled_dot_product_attention", "varlen_attention", "MultiHeadAttention", "MultiHeadAttentionBase",
    "MultiHeadRMSNorm", "RotaryPositionEmbedder", "apply_rotary_embedding", "rope_frequencies",
]
