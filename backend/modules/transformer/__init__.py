"""Dense transformer blocks of the DiTs, mirroring ``trellis2/modules/transformer``."""

from .blocks import FeedForwardNet, LayerNorm32, convert_linear_to, str_to_dtype
from .embedders import TimestepEmbedder, timestep_embedding
from .modulated import ModulatedCrossBlockBase, ModulatedTransformerCrossBlock, split_modulation

__all__ = [
    "FeedForwardNet", "LayerNorm32", "convert_linear_to", "str_to_dtype", "TimestepEmbedder",
    "timestep_embedding", "ModulatedCrossBlockBase", "ModulatedTransformerCrossBlock", "split_modulation",
]
