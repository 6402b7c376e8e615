"""prroi_pool: forward and backward ops, their fake kernels, autograd (features and boxes), autocast and CUDA
dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pytorch import prroi_pool as _prroi
from ._common import check_op_args, deterministic_backward_enabled, register_autograd, register_cuda


def _check(input, rois, spatial_scale, pooled_height, pooled_width, *_, fake=False):
    check_op_args("prroi_pool", rois, (pooled_height, pooled_width), maps=[input], scales=[spatial_scale], fake=fake)


def _check_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, *_, fake=False):
    check_op_args("prroi_pool_backward", rois, (pooled_height, pooled_width), maps=[input], scales=[spatial_scale],
                  grad=grad, fake=fake)


@torch.library.custom_op("roikit::prroi_pool", mutates_args=())
def prroi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                  aligned: bool) -> Tensor:
    _check(input, rois, spatial_scale, pooled_height, pooled_width)
    return _prroi.prroi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, aligned)


@prroi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, aligned):
    _check(input, rois, spatial_scale, pooled_height, pooled_width, fake=True)
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::prroi_pool_backward", mutates_args=())
def prroi_pool_backward_op(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                           pooled_width: int, aligned: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    _check_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width)
    return _prroi.prroi_pool_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned)


@prroi_pool_backward_op.register_fake
def _(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned, deterministic):
    _check_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, fake=True)
    return input.new_empty(input.shape), rois.new_empty(rois.shape)  # the kernels return contiguous tensors


def _setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, aligned = inputs
    ctx.save_for_backward(input, rois)
    ctx.settings = (spatial_scale, pooled_height, pooled_width, aligned)


def _backward(ctx, grad):  # the features' and the boxes' gradients
    input, rois = ctx.saved_tensors
    grad_input, grad_rois = prroi_pool_backward_op(grad.contiguous(), input, rois, *ctx.settings,
                                                   deterministic_backward_enabled())
    return grad_input, grad_rois, None, None, None, None


register_autograd(prroi_pool_op, _backward, _setup)
register_cuda(prroi_pool_op, _prroi.prroi_pool_forward, "prroi_pool", lambda input, *_: [input], check=_check)
register_cuda(prroi_pool_backward_op, _prroi.prroi_pool_backward, "prroi_pool", lambda grad, input, *_: [input],
              deterministic=True, check=_check_backward)
