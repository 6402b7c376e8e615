"""roi_align_rotated: forward and backward ops, their fake kernels, autograd, autocast and CUDA dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pytorch import roi_align_rotated as _rotated
from ._common import features_backward, register_autograd, register_cuda


@torch.library.custom_op("roikit::roi_align_rotated", mutates_args=())
def roi_align_rotated_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         sampling_ratio: int, aligned: bool, clockwise: bool, radians: bool) -> Tensor:
    return _rotated.roi_align_rotated_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                              aligned, clockwise, radians)


@roi_align_rotated_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, radians):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::roi_align_rotated_backward", mutates_args=())
def roi_align_rotated_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                                  pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool,
                                  radians: bool, batch_size: int, channels: int, height: int, width: int,
                                  deterministic: bool) -> Tensor:
    return _rotated.roi_align_rotated_backward(grad, rois, spatial_scale, pooled_height, pooled_width,
                                               sampling_ratio, aligned, clockwise, radians, batch_size, channels,
                                               height, width)


@roi_align_rotated_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, radians,
      batch_size, channels, height, width, deterministic):
    return grad.new_empty((batch_size, channels, height, width))


def _setup(ctx, inputs, output):
    input, rois, *settings = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (*settings, *input.shape)


register_autograd(roi_align_rotated_op, features_backward(roi_align_rotated_backward_op), _setup)
register_cuda(roi_align_rotated_op, _rotated.roi_align_rotated_forward, "roi_align_rotated",
              lambda input, *_: [input])
register_cuda(roi_align_rotated_backward_op, _rotated.roi_align_rotated_backward, "roi_align_rotated",
              lambda grad, rois, scale, ph, pw, ratio, aligned, cw, rad, n, c, h, w, _: [grad] if n * c * h * w
              else None, deterministic=True)
