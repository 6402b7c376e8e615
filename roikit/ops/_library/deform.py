"""deform_roi_pool (mmcv's DeformRoIPool): forward and backward ops, their fake kernels, autograd (features and,
when asked, offsets), autocast and CUDA dispatch."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..pytorch import deform_roi_pool as _deform
from ._common import (
    check_finite,
    check_op_args,
    check_tensor,
    deterministic_backward_enabled,
    register_autograd,
    register_cuda,
)


def _check_deform(op, grad, input, rois, offset, spatial_scale, pooled_height, pooled_width, gamma, fake):
    check_op_args(op, rois, (pooled_height, pooled_width), maps=[input], scales=[spatial_scale], grad=grad,
                  fake=fake)
    if fake:
        return
    where = f"roikit::{op}"
    if not (isinstance(gamma, numbers.Real) and math.isfinite(gamma)):
        raise ValueError(f"{where}: gamma must be a finite number (the offsets' scale), got {gamma!r}")
    if offset is None:
        return
    check_tensor(where, offset, "offset", 4, any_float=True)
    expected = (rois.shape[0], 2, pooled_height, pooled_width)
    if tuple(offset.shape) != expected or offset.device != input.device:
        raise ValueError(f"{where}: offset must be None or a Tensor[K, 2, PH, PW] = {list(expected)} on "
                         f"{input.device}, got {list(offset.shape)} on {offset.device}")
    check_finite(op, offset, "offset")


def _check(input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma, fake=False):
    _check_deform("deform_roi_pool", None, input, rois, offset, spatial_scale, pooled_height, pooled_width, gamma, fake)


def _check_backward(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma, *_,
                    fake=False):
    _check_deform("deform_roi_pool_backward", grad, input, rois, offset, spatial_scale, pooled_height, pooled_width,
                  gamma, fake)


@torch.library.custom_op("roikit::deform_roi_pool", mutates_args=())
def deform_roi_pool_op(input: Tensor, rois: Tensor, offset: Tensor | None, spatial_scale: float, pooled_height: int,
                       pooled_width: int, sampling_ratio: int, gamma: float) -> Tensor:
    _check(input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma)
    return _deform.deform_roi_pool_forward(input, rois, offset, spatial_scale, pooled_height, pooled_width,
                                           sampling_ratio, gamma)


@deform_roi_pool_op.register_fake
def _(input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma):
    _check(input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma, fake=True)
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::deform_roi_pool_backward", mutates_args=())
def deform_roi_pool_backward_op(grad: Tensor, input: Tensor, rois: Tensor, offset: Tensor | None,
                                spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                                gamma: float, offset_grad: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    _check_backward(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma)
    return _deform.deform_roi_pool_backward(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width,
                                            sampling_ratio, gamma, offset_grad)


@deform_roi_pool_backward_op.register_fake
def _(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma, offset_grad,
      deterministic):
    _check_backward(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma,
                    fake=True)
    with_offset = offset_grad and offset is not None
    return grad.new_empty(input.shape), (offset.new_empty(offset.shape) if with_offset else grad.new_empty((0,)))


def _setup(ctx, inputs, output):
    input, rois, offset, *settings = inputs
    ctx.offset_grad = offset is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(input, rois, offset)
    ctx.settings = tuple(settings)


def _backward(ctx, grad):  # the features' gradient and, when asked, the offsets'
    input, rois, offset = ctx.saved_tensors
    grad_input, grad_offset = deform_roi_pool_backward_op(grad.contiguous(), input, rois, offset, *ctx.settings,
                                                          ctx.offset_grad, deterministic_backward_enabled())
    return grad_input, None, grad_offset if ctx.offset_grad else None, None, None, None, None, None


register_autograd(deform_roi_pool_op, _backward, _setup)
register_cuda(deform_roi_pool_op, _deform.deform_roi_pool_forward, "deform_roi_pool", lambda input, *_: [input],
              check=_check)
register_cuda(deform_roi_pool_backward_op, _deform.deform_roi_pool_backward, "deform_roi_pool",
              lambda grad, input, *_: [input], deterministic=True, check=_check_backward)
