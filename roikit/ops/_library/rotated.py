"""roi_align_rotated: forward and backward ops, their fake kernels, autograd, autocast and CUDA dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pytorch import roi_align_rotated as _rotated
from ._common import check_op_args, features_backward, register_autograd, register_cuda


def _check_sizes(op: str, rois: Tensor, aligned: bool) -> None:
    # aligned=True refuses a negative width or height (detectron2's and mmcv's CPU kernels assert it)
    if aligned and rois.numel() and bool((rois[:, 3:5] < 0).any()):
        bad = (rois[:, 3:5] < 0).any(dim=1).nonzero()[0].item()
        raise ValueError(f"roikit::{op}: boxes must have a width and height >= 0 with aligned=True (detectron2 and "
                         f"mmcv refuse them too); row {bad} is {rois[bad].tolist()}")


def _check(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, *_, fake=False):
    check_op_args("roi_align_rotated", rois, (pooled_height, pooled_width), maps=[input], scales=[spatial_scale],
                  rois_width=6, fake=fake)
    if not fake:
        _check_sizes("roi_align_rotated", rois, aligned)


def _check_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise,
                    radians, batch_size, channels, height, width, *_, fake=False):
    check_op_args("roi_align_rotated_backward", rois, (pooled_height, pooled_width), grad=grad,
                  scales=[spatial_scale], sizes=dict(batch_size=batch_size, channels=channels, height=height,
                                                     width=width), rois_width=6, fake=fake)
    if not fake:
        _check_sizes("roi_align_rotated_backward", rois, aligned)


@torch.library.custom_op("roikit::roi_align_rotated", mutates_args=())
def roi_align_rotated_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         sampling_ratio: int, aligned: bool, clockwise: bool, radians: bool) -> Tensor:
    _check(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    return _rotated.roi_align_rotated_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                              aligned, clockwise, radians)


@roi_align_rotated_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, radians):
    _check(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, fake=True)
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::roi_align_rotated_backward", mutates_args=())
def roi_align_rotated_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                                  pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool,
                                  radians: bool, batch_size: int, channels: int, height: int, width: int,
                                  deterministic: bool) -> Tensor:
    _check_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, radians,
                    batch_size, channels, height, width)
    return _rotated.roi_align_rotated_backward(grad, rois, spatial_scale, pooled_height, pooled_width,
                                               sampling_ratio, aligned, clockwise, radians, batch_size, channels,
                                               height, width)


@roi_align_rotated_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, radians,
      batch_size, channels, height, width, deterministic):
    _check_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, radians,
                    batch_size, channels, height, width, fake=True)
    return grad.new_empty((batch_size, channels, height, width))


def _setup(ctx, inputs, output):
    input, rois, *settings = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (*settings, *input.shape)


register_autograd(roi_align_rotated_op, features_backward(roi_align_rotated_backward_op), _setup)
register_cuda(roi_align_rotated_op, _rotated.roi_align_rotated_forward, "roi_align_rotated",
              lambda input, *_: [input], check=_check)
register_cuda(roi_align_rotated_backward_op, _rotated.roi_align_rotated_backward, "roi_align_rotated",
              lambda grad, rois, scale, ph, pw, ratio, aligned, cw, rad, n, c, h, w, _: [grad] if n * c * h * w
              else None, deterministic=True, check=_check_backward)
