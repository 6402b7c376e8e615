"""multilevel_roi_align (one fused op over the pyramid's maps): forward and backward ops, their fake kernels,
autograd, autocast and CUDA dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pytorch import multilevel_roi_align as _multilevel
from ._common import check_op_args, features_backward, register_autograd, register_cuda


def _check_levels(op: str, levels: int, spatial_scales, canonical_scale: int) -> None:
    if levels == 0 or len(spatial_scales) != levels:
        raise ValueError(f"roikit::{op}: give one spatial scale per map of a non-empty pyramid, got {levels} maps and "
                         f"{len(spatial_scales)} scales")
    if not (isinstance(canonical_scale, int) and canonical_scale >= 1):
        raise ValueError(f"roikit::{op}: canonical_scale must be an int >= 1, got {canonical_scale!r}")


def _check(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale,
           canonical_level, fake=False):
    if not fake:
        _check_levels("multilevel_roi_align", len(features), spatial_scales, canonical_scale)
    check_op_args("multilevel_roi_align", rois, (pooled_height, pooled_width), maps=features, scales=spatial_scales,
                  fake=fake)


def _check_backward(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels, heights, widths,
                    sampling_ratio, aligned, canonical_scale, *_, fake=False):
    if not fake:
        _check_levels("multilevel_roi_align_backward", len(heights), spatial_scales, canonical_scale)
        if len(widths) != len(heights):
            raise ValueError(f"roikit::multilevel_roi_align_backward: {len(heights)} heights but {len(widths)} widths")
    check_op_args("multilevel_roi_align_backward", rois, (pooled_height, pooled_width), grad=grad,
                  scales=spatial_scales, fake=fake,
                  sizes=dict(batch_size=batch_size, channels=channels, heights=heights, widths=widths))


@torch.library.custom_op("roikit::multilevel_roi_align", mutates_args=())
def multilevel_roi_align_op(features: list[Tensor], rois: Tensor, spatial_scales: list[float], pooled_height: int,
                            pooled_width: int, sampling_ratio: int, aligned: bool, canonical_scale: int,
                            canonical_level: int) -> Tensor:
    _check(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale,
           canonical_level)
    return _multilevel.multilevel_roi_align_forward(features, rois, spatial_scales, pooled_height, pooled_width,
                                                    sampling_ratio, aligned, canonical_scale, canonical_level)


@multilevel_roi_align_op.register_fake
def _(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale,
      canonical_level):
    _check(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale,
           canonical_level, fake=True)
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::multilevel_roi_align_backward", mutates_args=())
def multilevel_roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scales: list[float], pooled_height: int,
                                     pooled_width: int, batch_size: int, channels: int, heights: list[int],
                                     widths: list[int], sampling_ratio: int, aligned: bool, canonical_scale: int,
                                     canonical_level: int, deterministic: bool) -> list[Tensor]:
    _check_backward(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels, heights, widths,
                    sampling_ratio, aligned, canonical_scale)
    return _multilevel.multilevel_roi_align_backward(grad, rois, spatial_scales, pooled_height, pooled_width,
                                                     batch_size, channels, heights, widths, sampling_ratio, aligned,
                                                     canonical_scale, canonical_level)


@multilevel_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels, heights, widths, sampling_ratio,
      aligned, canonical_scale, canonical_level, deterministic):
    _check_backward(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels, heights, widths,
                    sampling_ratio, aligned, canonical_scale, fake=True)
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


def _setup(ctx, inputs, output):
    features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, cs, cl = inputs
    ctx.save_for_backward(rois)
    n, c = features[0].shape[:2]
    ctx.settings = (list(spatial_scales), pooled_height, pooled_width, n, c, [f.shape[2] for f in features],
                    [f.shape[3] for f in features], sampling_ratio, aligned, cs, cl)


def _backward_maps(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels, heights, widths,
                   *_):
    """The gradient for the kernels, or None (the plain path) when a map of the pyramid is empty."""
    empty_map = any(h * w == 0 for h, w in zip(heights, widths)) or batch_size * channels == 0
    return None if empty_map else [grad]


register_autograd(multilevel_roi_align_op, features_backward(multilevel_roi_align_backward_op), _setup)
register_cuda(multilevel_roi_align_op, _multilevel.multilevel_roi_align_forward, "multilevel_roi_align",
              lambda features, *_: features, check=_check)
register_cuda(multilevel_roi_align_backward_op, _multilevel.multilevel_roi_align_backward, "multilevel_roi_align",
              _backward_maps, deterministic=True, check=_check_backward)
