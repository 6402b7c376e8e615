"""roi_pool: forward and backward ops, their fake kernels, autograd, autocast and CUDA dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pytorch import roi_pool as _pool
from ._common import (
    check_index_map,
    check_op_args,
    features_backward,
    integer_output,
    register_autograd,
    register_cuda,
)


def _check_forward(op: str):
    def check(input, rois, spatial_scale, pooled_height, pooled_width, rounding, fake=False):
        check_op_args(op, rois, (pooled_height, pooled_width), maps=[input], scales=[spatial_scale], fake=fake)
        if rounding not in ("torchvision", "integer"):
            raise ValueError(f"roikit::{op}: rounding must be 'torchvision' or 'integer', got {rounding!r}")

    return check


_check, _check_inference = _check_forward("roi_pool"), _check_forward("roi_pool_inference")


def _check_backward(grad, rois, argmax, batch_size, channels, height, width, *_, fake=False):
    pooled = tuple(grad.shape[2:]) if isinstance(grad, Tensor) and grad.dim() == 4 else (1, 1)
    check_op_args("roi_pool_backward", rois, pooled, grad=grad, fake=fake,
                  sizes=dict(batch_size=batch_size, channels=channels, height=height, width=width))
    if not fake:  # each bin's gradient goes to cell argmax of its plane: in [-1, H * W)
        check_index_map("roi_pool_backward", argmax, grad, "argmax", torch.int32, height * width)


@torch.library.custom_op("roikit::roi_pool", mutates_args=())
def roi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                rounding: str) -> tuple[Tensor, Tensor]:
    _check(input, rois, spatial_scale, pooled_height, pooled_width, rounding)
    return _pool.roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding)


@roi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, rounding):
    _check(input, rois, spatial_scale, pooled_height, pooled_width, rounding, fake=True)
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("roikit::roi_pool_inference", mutates_args=())
def roi_pool_inference_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                          rounding: str) -> Tensor:
    """``roikit::roi_pool``'s output without argmax, for eager CPU calls that need no gradient (no autograd)."""
    _check_inference(input, rois, spatial_scale, pooled_height, pooled_width, rounding)
    return _pool.roi_pool_values(input, rois, spatial_scale, pooled_height, pooled_width, rounding)


@roi_pool_inference_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, rounding):
    _check_inference(input, rois, spatial_scale, pooled_height, pooled_width, rounding, fake=True)
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


roi_pool_inference_op.register_autocast("cpu", torch.float32)


@torch.library.custom_op("roikit::roi_pool_backward", mutates_args=())
def roi_pool_backward_op(grad: Tensor, rois: Tensor, argmax: Tensor, batch_size: int, channels: int, height: int,
                         width: int, deterministic: bool) -> Tensor:
    _check_backward(grad, rois, argmax, batch_size, channels, height, width)
    return _pool.roi_pool_backward(grad, rois, argmax, batch_size, channels, height, width)


@roi_pool_backward_op.register_fake
def _(grad, rois, argmax, batch_size, channels, height, width, deterministic):
    _check_backward(grad, rois, argmax, batch_size, channels, height, width, fake=True)
    return grad.new_empty((batch_size, channels, height, width))


def _setup(ctx, inputs, output):
    input, rois = inputs[0], inputs[1]
    ctx.save_for_backward(rois, output[1])
    ctx.settings = tuple(input.shape)
    integer_output(ctx, output[1])


register_autograd(roi_pool_op, features_backward(roi_pool_backward_op), _setup)
register_cuda(roi_pool_op, _pool.roi_pool_forward, "roi_pool", lambda input, *_: [input], check=_check)
register_cuda(roi_pool_backward_op, _pool.roi_pool_backward, "roi_pool",
              lambda grad, rois, argmax, n, c, h, w, _: [grad] if n * c * h * w else None, deterministic=True,
              check=_check_backward)
