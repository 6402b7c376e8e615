"""roi_align and roi_align with box gradients (``box_grad=True``): forward and backward ops, their fake kernels,
autograd, autocast and CUDA dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pytorch import roi_align as _align
from ..pytorch import roi_align_box_grad as _align_box
from ._common import (
    check_index_map,
    check_op_args,
    deterministic_backward_enabled,
    features_backward,
    integer_output,
    register_autograd,
    register_cuda,
)


def _check_forward(op: str):
    def check(input, rois, spatial_scale, pooled_height, pooled_width, *_, fake=False):
        check_op_args(op, rois, (pooled_height, pooled_width), maps=[input], scales=[spatial_scale], fake=fake)

    return check


_check_align, _check_align_box = _check_forward("roi_align"), _check_forward("roi_align_box")


def _check_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                    width, sampling_ratio, aligned, pool_max, *_, fake=False):
    check_op_args("roi_align_backward", rois, (pooled_height, pooled_width), grad=grad, scales=[spatial_scale],
                  sizes=dict(batch_size=batch_size, channels=channels, height=height, width=width), fake=fake)
    if pool_max and not fake:  # the winning sample of its bin: the kernels check the sample's place on the map
        check_index_map("roi_align_backward", argmax, grad, "argmax", torch.int64)


def _check_box_grad(grad, input, rois, output, argmax, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                    aligned, pool_max, fake=False):
    check_op_args("roi_align_box_grad", rois, (pooled_height, pooled_width), maps=[input], scales=[spatial_scale],
                  grad=grad, fake=fake)
    if fake:
        return
    if not isinstance(output, Tensor) or output.shape != grad.shape or output.dtype != grad.dtype:
        raise ValueError(f"roikit::roi_align_box_grad: output must be the forward's output, {grad.dtype} of grad's "
                         f"shape {list(grad.shape)}")
    if pool_max:
        check_index_map("roi_align_box_grad", argmax, grad, "argmax", torch.int64)


@torch.library.custom_op("roikit::roi_align", mutates_args=())
def roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                 sampling_ratio: int, aligned: bool, pool_max: bool) -> tuple[Tensor, Tensor]:
    _check_align(input, rois, spatial_scale, pooled_height, pooled_width)
    return _align.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                    pool_max)


def _fake_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max):
    _check_align(input, rois, spatial_scale, pooled_height, pooled_width, fake=True)
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape if pool_max else (0,), dtype=torch.int64)


roi_align_op.register_fake(_fake_forward)


@torch.library.custom_op("roikit::roi_align_backward", mutates_args=())
def roi_align_backward_op(grad: Tensor, rois: Tensor, argmax: Tensor, spatial_scale: float, pooled_height: int,
                          pooled_width: int, batch_size: int, channels: int, height: int, width: int,
                          sampling_ratio: int, aligned: bool, pool_max: bool, deterministic: bool) -> Tensor:
    _check_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                    width, sampling_ratio, aligned, pool_max)
    return _align.roi_align_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size,
                                     channels, height, width, sampling_ratio, aligned, pool_max)


@roi_align_backward_op.register_fake
def _(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
      sampling_ratio, aligned, pool_max, deterministic):
    _check_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                    width, sampling_ratio, aligned, pool_max, fake=True)
    return grad.new_empty((batch_size, channels, height, width))


def _setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.settings = (spatial_scale, pooled_height, pooled_width, *input.shape, sampling_ratio, aligned, pool_max)
    integer_output(ctx, output[1])


register_autograd(roi_align_op, features_backward(roi_align_backward_op), _setup)
register_cuda(roi_align_op, _align.roi_align_forward, "roi_align", lambda input, *_: [input], check=_check_align)
register_cuda(roi_align_backward_op, _align.roi_align_backward, "roi_align",
              lambda grad, rois, argmax, scale, ph, pw, n, c, h, w, *_: [grad] if n * c * h * w else None,
              deterministic=True, check=_check_backward)


# ---------------------------------------------------------------- roi_align with box gradients (box_grad=True)
# The forward is roi_align's own (the same kernels, the same bits); the autograd also differentiates the boxes.
@torch.library.custom_op("roikit::roi_align_box", mutates_args=())
def roi_align_box_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                     sampling_ratio: int, aligned: bool, pool_max: bool) -> tuple[Tensor, Tensor]:
    _check_align_box(input, rois, spatial_scale, pooled_height, pooled_width)
    return _align.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                    pool_max)


@roi_align_box_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max):
    _check_align_box(input, rois, spatial_scale, pooled_height, pooled_width, fake=True)
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape if pool_max else (0,), dtype=torch.int64)


@torch.library.custom_op("roikit::roi_align_box_grad", mutates_args=())
def roi_align_box_grad_op(grad: Tensor, input: Tensor, rois: Tensor, output: Tensor, argmax: Tensor,
                          spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                          aligned: bool, pool_max: bool) -> Tensor:
    _check_box_grad(grad, input, rois, output, argmax, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                    aligned, pool_max)
    return _align_box.roi_align_box_backward(grad, input, rois, output, argmax, spatial_scale, pooled_height,
                                             pooled_width, sampling_ratio, aligned, pool_max)


@roi_align_box_grad_op.register_fake
def _(grad, input, rois, output, argmax, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
      pool_max):
    _check_box_grad(grad, input, rois, output, argmax, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                    aligned, pool_max, fake=True)
    return rois.new_empty((rois.shape[0], 5))


def _box_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max = inputs
    ctx.save_for_backward(input, rois, output[0], output[1])
    ctx.settings = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max)
    integer_output(ctx, output[1])


def _box_backward(ctx, grad, _grad_argmax):
    if grad is None:  # nothing flowed into the output (see integer_output)
        return (None,) * len(ctx.needs_input_grad)
    input, rois, output, argmax = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max = ctx.settings
    grad = grad.contiguous()
    grad_input = grad_rois = None
    if ctx.needs_input_grad[0]:
        grad_input = roi_align_backward_op(grad, rois, argmax, spatial_scale, pooled_height, pooled_width,
                                           *input.shape, sampling_ratio, aligned, pool_max,
                                           deterministic_backward_enabled())
    if ctx.needs_input_grad[1]:
        grad_rois = roi_align_box_grad_op(grad, input, rois, output, argmax, *ctx.settings)
    return grad_input, grad_rois, None, None, None, None, None, None


register_autograd(roi_align_box_op, _box_backward, _box_setup)
register_cuda(roi_align_box_op, _align.roi_align_forward, "roi_align", lambda input, *_: [input],  # roi_align's
              check=_check_align_box)
register_cuda(roi_align_box_grad_op, _align_box.roi_align_box_backward, "roi_align_box_grad",
              lambda grad, input, *_: [input], check=_check_box_grad)
