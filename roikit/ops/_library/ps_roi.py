"""ps_roi_align and ps_roi_pool (position-sensitive, R-FCN): forward and backward ops, their fake kernels, autograd,
autocast and CUDA dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pytorch import ps_roi as _ps
from ._common import features_backward, register_autograd, register_cuda


def _fake_forward(input, rois, spatial_scale, pooled_height, pooled_width, *_):
    channels = input.shape[1] // (pooled_height * pooled_width)
    return input.new_empty((rois.shape[0], channels, pooled_height, pooled_width))


# ---------------------------------------------------------------- ps_roi_align
@torch.library.custom_op("roikit::ps_roi_align", mutates_args=())
def ps_roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                    sampling_ratio: int) -> Tensor:
    return _ps.ps_roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio)


@torch.library.custom_op("roikit::ps_roi_align_backward", mutates_args=())
def ps_roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                             pooled_width: int, sampling_ratio: int, batch_size: int, channels: int, height: int,
                             width: int, deterministic: bool) -> Tensor:
    return _ps.ps_roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                     batch_size, channels, height, width)


@ps_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, batch_size, channels, height, width,
      deterministic):
    return grad.new_empty((batch_size, channels, height, width))


def _align_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (spatial_scale, pooled_height, pooled_width, sampling_ratio, *input.shape)


ps_roi_align_op.register_fake(_fake_forward)
register_autograd(ps_roi_align_op, features_backward(ps_roi_align_backward_op), _align_setup)
register_cuda(ps_roi_align_op, _ps.ps_roi_align_forward, "ps_roi", lambda input, *_: [input])
register_cuda(ps_roi_align_backward_op, _ps.ps_roi_align_backward, "ps_roi",
              lambda grad, rois, scale, ph, pw, ratio, n, c, h, w, _: [grad] if n * c * h * w else None,
              deterministic=True)


# ---------------------------------------------------------------- ps_roi_pool
@torch.library.custom_op("roikit::ps_roi_pool", mutates_args=())
def ps_roi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                   pooled_width: int) -> Tensor:
    return _ps.ps_roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width)


@torch.library.custom_op("roikit::ps_roi_pool_backward", mutates_args=())
def ps_roi_pool_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                            batch_size: int, channels: int, height: int, width: int, deterministic: bool) -> Tensor:
    return _ps.ps_roi_pool_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                    height, width)


@ps_roi_pool_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, deterministic):
    return grad.new_empty((batch_size, channels, height, width))


def _pool_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (spatial_scale, pooled_height, pooled_width, *input.shape)


ps_roi_pool_op.register_fake(_fake_forward)
register_autograd(ps_roi_pool_op, features_backward(ps_roi_pool_backward_op), _pool_setup)
register_cuda(ps_roi_pool_op, _ps.ps_roi_pool_forward, "ps_roi", lambda input, *_: [input])
register_cuda(ps_roi_pool_backward_op, _ps.ps_roi_pool_backward, "ps_roi",
              lambda grad, rois, scale, ph, pw, n, c, h, w, _: [grad] if n * c * h * w else None, deterministic=True)
