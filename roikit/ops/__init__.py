"""Region pooling ops: ``roi_pool`` (both rounding rules), ``roi_align``, ``prroi_pool``, ``roi_spp``,
``multilevel_roi_align``, the rotated ``roi_align_rotated``, and the position-sensitive ``ps_roi_align`` and
``ps_roi_pool``.

Each is a function plus an ``nn.Module``, registered with ``torch.library`` as ``torch.ops.roikit.*``.
"""
from . import geometry
from ._library import deterministic_backward, deterministic_backward_enabled
from ._utils import autocast_to_float32, convert_boxes_to_rois
from .deform_roi_pool import DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack, deform_roi_pool
from .multilevel_roi_align import level_range, multilevel_roi_align, pyramid_levels
from .prroi_pool import PrRoIPool, prroi_pool
from .ps_roi_align import PSRoIAlign, ps_roi_align
from .ps_roi_pool import PSRoIPool, ps_roi_pool
from .roi_align import RoIAlign, roi_align
from .roi_align_rotated import RoIAlignRotated, convert_rotated_boxes_to_rois, roi_align_rotated
from .roi_pool import ROUNDINGS, RoIPool, roi_pool
from .roi_spp import RoISPP, roi_spp

__all__ = [
    "roi_pool", "RoIPool", "ROUNDINGS", "roi_align", "RoIAlign", "prroi_pool", "PrRoIPool", "roi_spp", "RoISPP",
    "ps_roi_align", "PSRoIAlign", "ps_roi_pool", "PSRoIPool",
    "roi_align_rotated", "RoIAlignRotated", "convert_rotated_boxes_to_rois",
    "deform_roi_pool", "DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack",
    "multilevel_roi_align", "pyramid_levels", "level_range", "convert_boxes_to_rois", "autocast_to_float32",
    "deterministic_backward", "deterministic_backward_enabled", "geometry",
]
