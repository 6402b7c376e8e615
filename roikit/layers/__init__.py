"""Layers a model is built from: spatial pyramid pooling, multi-level RoI poolers, and the pooling family.

Region ops themselves live in :mod:`roikit.ops`; these layers import from it (never the other way round).
"""
from .basic_pool import (
    AdaptivePool2d,
    GlobalPool,
    OverlappingMaxPool2d,
    Pool2d,
    adaptive_pool2d,
    global_pool2d,
    overlapping_max_pool2d,
    pool2d,
)
from .bilinear_pool import BilinearPool, CompactBilinearPool, bilinear_pool, compact_bilinear_pool, tensor_sketch_hashes
from .poolers import RoIPooler, assign_boxes_to_levels
from .spp import SpatialPyramidPooling, adaptive_bins, spatial_pyramid_pool, sppnet_bins
from .stochastic_pool import StochasticPool2d, stochastic_pool2d

__all__ = [
    "SpatialPyramidPooling", "spatial_pyramid_pool", "adaptive_bins", "sppnet_bins",
    "RoIPooler", "assign_boxes_to_levels",
    "pool2d", "Pool2d", "global_pool2d", "GlobalPool", "adaptive_pool2d", "AdaptivePool2d",
    "overlapping_max_pool2d", "OverlappingMaxPool2d",
    "stochastic_pool2d", "StochasticPool2d",
    "bilinear_pool", "BilinearPool", "compact_bilinear_pool", "CompactBilinearPool", "tensor_sketch_hashes",
]
