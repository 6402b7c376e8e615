"""ps_roi_align and ps_roi_pool (position-sensitive, R-FCN): forward and backward ops, their fake kernels, autograd,
autocast and CUDA dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pytorch import ps_roi as _ps
from ._common import check_op_args, features_backward, register_autograd, register_cuda


def _check_forward(op: str):
    def check(input, rois, spatial_scale, pooled_height, pooled_width, *_, fake=False):
        check_op_args(op, rois, (pooled_height, pooled_width), maps=[input], scales=[spatial_scale],
                      position_sensitive=True, fake=fake)

    return check


_check_align, _check_pool = _check_forward("ps_roi_align"), _check_forward("ps_roi_pool")


def _check_backward(op: str):
    def check(grad, rois, spatial_scale, pooled_height, pooled_width, *settings, fake=False):
        batch_size, channels, height, width, _deterministic = settings[-5:]  # after ps_roi_align's sampling_ratio
        check_op_args(op, rois, (pooled_height, pooled_width), grad=grad, scales=[spatial_scale],
                      sizes=dict(batch_size=batch_size, channels=channels, height=height, width=width),
                      position_sensitive=True, fake=fake)

    return check


_check_align_backward = _check_backward("ps_roi_align_backward")
_check_pool_backward = _check_backward("ps_roi_pool_backward")


def _fake_forward(input, rois, spatial_scale, pooled_height, pooled_width, *_):
    channels = input.shape[1] // (pooled_height * pooled_width)
    return input.new_empty((rois.shape[0], channels, pooled_height, pooled_width))


# ---------------------------------------------------------------- ps_roi_align
@torch.library.custom_op("roikit::ps_roi_align", mutates_args=())
def ps_roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                    sampling_ratio: int) -> Tensor:
    _check_align(input, rois, spatial_scale, pooled_height, pooled_width)
    return _ps.ps_roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio)


@torch.library.custom_op("roikit::ps_roi_align_backward", mutates_args=())
def ps_roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                             pooled_width: int, sampling_ratio: int, batch_size: int, channels: int, height: int,
                             width: int, deterministic: bool) -> Tensor:
    _check_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, batch_size, channels,
                          height, width, deterministic)
    return _ps.ps_roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                     batch_size, channels, height, width)


@ps_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, batch_size, channels, height, width,
      deterministic):
    _check_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, batch_size, channels,
                          height, width, deterministic, fake=True)
    return grad.new_empty((batch_size, channels, height, width))


def _align_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (spatial_scale, pooled_height, pooled_width, sampling_ratio, *input.shape)


@ps_roi_align_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    _check_align(input, rois, spatial_scale, pooled_height, pooled_width, fake=True)
    return _fake_forward(input, rois, spatial_scale, pooled_height, pooled_width)


register_autograd(ps_roi_align_op, features_backward(ps_roi_align_backward_op), _align_setup)
register_cuda(ps_roi_align_op, _ps.ps_roi_align_forward, "ps_roi", lambda input, *_: [input], check=_check_align)
register_cuda(ps_roi_align_backward_op, _ps.ps_roi_align_backward, "ps_roi",
              lambda grad, rois, scale, ph, pw, ratio, n, c, h, w, _: [grad] if n * c * h * w else None,
              deterministic=True, check=_check_align_backward)


# ---------------------------------------------------------------- ps_roi_pool
@torch.library.custom_op("roikit::ps_roi_pool", mutates_args=())
def ps_roi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                   pooled_width: int) -> Tensor:
    _check_pool(input, rois, spatial_scale, pooled_height, pooled_width)
    return _ps.ps_roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width)


@torch.library.custom_op("roikit::ps_roi_pool_backward", mutates_args=())
def ps_roi_pool_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                            batch_size: int, channels: int, height: int, width: int, deterministic: bool) -> Tensor:
    _check_pool_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                         deterministic)
    return _ps.ps_roi_pool_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                    height, width)


@ps_roi_pool_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, deterministic):
    _check_pool_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                         deterministic, fake=True)
    return grad.new_empty((batch_size, channels, height, width))


def _pool_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (spatial_scale, pooled_height, pooled_width, *input.shape)


@ps_roi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    _check_pool(input, rois, spatial_scale, pooled_height, pooled_width, fake=True)
    return _fake_forward(input, rois, spatial_scale, pooled_height, pooled_width)


register_autograd(ps_roi_pool_op, features_backward(ps_roi_pool_backward_op), _pool_setup)
register_cuda(ps_roi_pool_op, _ps.ps_roi_pool_forward, "ps_roi", lambda input, *_: [input], check=_check_pool)
register_cuda(ps_roi_pool_backward_op, _ps.ps_roi_pool_backward, "ps_roi",
              lambda grad, rois, scale, ph, pw, n, c, h, w, _: [grad] if n * c * h * w else None, deterministic=True,
              check=_check_pool_backward)
