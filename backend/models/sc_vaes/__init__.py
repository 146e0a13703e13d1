"""SC-VAEs of TRELLIS.2 (shape: flexible dual grid; texture: PBR attributes)."""

from .sparse_unet_vae import (
    SparseConvNeXtBlock3d,
    SparseResBlockC2S3d,
    SparseResBlockS2C3d,
    SparseUnetVaeDecoder,
    SparseUnetVaeEncoder,
)
from .fdg_vae import FlexiDualGridVaeDecoder, FlexiDualGridVaeEncoder

__all__ = [
    "SparseConvNeXtBlock3d", "SparseResBlockS2C3d", "SparseResBlockC2S3d",
    "SparseUnetVaeEncoder", "SparseUnetVaeDecoder",
    "FlexiDualGridVaeEncoder", "FlexiDualGridVaeDecoder",
]
