"""Sparse voxel modules mirroring ``trellis2/modules/sparse``."""

from .basic import SparseTensor, sparse_cat, sparse_unbind
from .conv import SparseConv3d, build_neighbor_map, get_neighbor_map, submanifold_conv3d
from .linear import SparseLinear
from .norm import LayerNorm32, SparseGroupNorm32, SparseLayerNorm32
from .spatial import (
    SparseChannel2Spatial,
    SparseHierarchy,
    SparseSpatial2Channel,
    SubdivisionMap,
    channel_to_space,
    space_to_channel,
    spatial2channel_map,
    subdivision_map_from_mask,
)

__all__ = [
    "SparseTensor", "sparse_cat", "sparse_unbind",
    "SparseConv3d", "build_neighbor_map", "get_neighbor_map", "submanifold_conv3d",
    "SparseLinear", "LayerNorm32", "SparseLayerNorm32", "SparseGroupNorm32",
    "SparseSpatial2Channel", "SparseChannel2Spatial", "SparseHierarchy", "SubdivisionMap",
    "space_to_channel", "channel_to_space", "spatial2channel_map", "subdivision_map_from_mask",
]
