"""The ``torch.library`` registration of every region op, with its fake kernel, autograd and autocast, in one place.

Each op is a forward custom op and a backward custom op (so torch.compile, ``opcheck`` and autograd all see
through them). The default implementation is the plain-PyTorch one in ``roikit.ops.pytorch``, which runs on any
device; ``roikit.ops.triton`` registers CUDA kernels for the same ops when Triton and a GPU are there.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

from .pytorch import deform_roi_pool as _deform
from .pytorch import multilevel_roi_align as _multilevel
from .pytorch import prroi_pool as _prroi
from .pytorch import ps_roi as _ps
from .pytorch import roi_align as _align
from .pytorch import roi_align_box_grad as _align_box
from .pytorch import roi_align_rotated as _rotated
from .pytorch import roi_pool as _pool

_state = threading.local()


def deterministic_backward_enabled() -> bool:
    """True when backward kernels must give the same bits on every run (no floating-point atomics).

    On when ``torch.use_deterministic_algorithms(True)`` is in force, or inside :func:`deterministic_backward`.
    The CPU path is always deterministic; the flag chooses the CUDA kernels.
    """
    return bool(getattr(_state, "deterministic", False)) or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic_backward(enabled: bool = True):
    """Ask for deterministic backward kernels inside a ``with`` block."""
    previous = getattr(_state, "deterministic", False)
    _state.deterministic = enabled
    try:
        yield
    finally:
        _state.deterministic = previous


# ---------------------------------------------------------------- roi_pool
@torch.library.custom_op("roikit::roi_pool", mutates_args=())
def roi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                rounding: str) -> tuple[Tensor, Tensor]:
    return _pool.roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding)


@roi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, rounding):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("roikit::roi_pool_backward", mutates_args=())
def roi_pool_backward_op(grad: Tensor, rois: Tensor, argmax: Tensor, batch_size: int, channels: int, height: int,
                         width: int, deterministic: bool) -> Tensor:
    return _pool.roi_pool_backward(grad, rois, argmax, batch_size, channels, height, width)


@roi_pool_backward_op.register_fake
def _(grad, rois, argmax, batch_size, channels, height, width, deterministic):
    return grad.new_empty((batch_size, channels, height, width))


def _roi_pool_setup(ctx, inputs, output):
    input, rois = inputs[0], inputs[1]
    ctx.save_for_backward(rois, output[1])
    ctx.input_shape = tuple(input.shape)
    ctx.mark_non_differentiable(output[1])


def _roi_pool_backward(ctx, grad, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    grad_input = roi_pool_backward_op(grad.contiguous(), rois, argmax, *ctx.input_shape,
                                      deterministic_backward_enabled())
    return grad_input, None, None, None, None, None


roi_pool_op.register_autograd(_roi_pool_backward, setup_context=_roi_pool_setup)


# ---------------------------------------------------------------- roi_align
@torch.library.custom_op("roikit::roi_align", mutates_args=())
def roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                 sampling_ratio: int, aligned: bool, pool_max: bool) -> tuple[Tensor, Tensor]:
    return _align.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                    pool_max)


@roi_align_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape if pool_max else (0,), dtype=torch.int64)


@torch.library.custom_op("roikit::roi_align_backward", mutates_args=())
def roi_align_backward_op(grad: Tensor, rois: Tensor, argmax: Tensor, spatial_scale: float, pooled_height: int,
                          pooled_width: int, batch_size: int, channels: int, height: int, width: int,
                          sampling_ratio: int, aligned: bool, pool_max: bool, deterministic: bool) -> Tensor:
    return _align.roi_align_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size,
                                     channels, height, width, sampling_ratio, aligned, pool_max)


@roi_align_backward_op.register_fake
def _(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
      sampling_ratio, aligned, pool_max, deterministic):
    return grad.new_empty((batch_size, channels, height, width))


def _roi_align_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.settings = (spatial_scale, pooled_height, pooled_width, *input.shape, sampling_ratio, aligned, pool_max)
    ctx.mark_non_differentiable(output[1])


def _roi_align_backward(ctx, grad, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    grad_input = roi_align_backward_op(grad.contiguous(), rois, argmax, *ctx.settings,
                                       deterministic_backward_enabled())
    return grad_input, None, None, None, None, None, None, None


roi_align_op.register_autograd(_roi_align_backward, setup_context=_roi_align_setup)


# ---------------------------------------------------------------- roi_align with box gradients (box_grad=True)
# The forward is roi_align's own (the same kernels, the same bits); the autograd also differentiates the boxes.
@torch.library.custom_op("roikit::roi_align_box", mutates_args=())
def roi_align_box_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                     sampling_ratio: int, aligned: bool, pool_max: bool) -> tuple[Tensor, Tensor]:
    return _align.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                    pool_max)


@roi_align_box_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape if pool_max else (0,), dtype=torch.int64)


@torch.library.custom_op("roikit::roi_align_box_grad", mutates_args=())
def roi_align_box_grad_op(grad: Tensor, input: Tensor, rois: Tensor, output: Tensor, argmax: Tensor,
                          spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                          aligned: bool, pool_max: bool) -> Tensor:
    return _align_box.roi_align_box_backward(grad, input, rois, output, argmax, spatial_scale, pooled_height,
                                             pooled_width, sampling_ratio, aligned, pool_max)


@roi_align_box_grad_op.register_fake
def _(grad, input, rois, output, argmax, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
      pool_max):
    return rois.new_empty((rois.shape[0], 5))


def _roi_align_box_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max = inputs
    ctx.save_for_backward(input, rois, output[0], output[1])
    ctx.settings = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max)
    ctx.mark_non_differentiable(output[1])


def _roi_align_box_backward(ctx, grad, _grad_argmax):
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


roi_align_box_op.register_autograd(_roi_align_box_backward, setup_context=_roi_align_box_setup)
for _device in ("cpu", "cuda"):  # as every op: the forward in float32 under autocast
    roi_align_box_op.register_autocast(_device, torch.float32)


# ---------------------------------------------------------------- prroi_pool
@torch.library.custom_op("roikit::prroi_pool", mutates_args=())
def prroi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                  aligned: bool) -> Tensor:
    return _prroi.prroi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, aligned)


@prroi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::prroi_pool_backward", mutates_args=())
def prroi_pool_backward_op(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                           pooled_width: int, aligned: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    return _prroi.prroi_pool_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned)


@prroi_pool_backward_op.register_fake
def _(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned, deterministic):
    return input.new_empty(input.shape), rois.new_empty(rois.shape)  # the kernels return contiguous tensors


def _prroi_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, aligned = inputs
    ctx.save_for_backward(input, rois)
    ctx.settings = (spatial_scale, pooled_height, pooled_width, aligned)


def _prroi_backward(ctx, grad):
    input, rois = ctx.saved_tensors
    grad_input, grad_rois = prroi_pool_backward_op(grad.contiguous(), input, rois, *ctx.settings,
                                                   deterministic_backward_enabled())
    return grad_input, grad_rois, None, None, None, None


prroi_pool_op.register_autograd(_prroi_backward, setup_context=_prroi_setup)


# ---------------------------------------------------------------- multilevel_roi_align
@torch.library.custom_op("roikit::multilevel_roi_align", mutates_args=())
def multilevel_roi_align_op(features: list[Tensor], rois: Tensor, spatial_scales: list[float], pooled_height: int,
                            pooled_width: int, sampling_ratio: int, aligned: bool, canonical_scale: int,
                            canonical_level: int) -> Tensor:
    return _multilevel.multilevel_roi_align_forward(features, rois, spatial_scales, pooled_height, pooled_width,
                                                    sampling_ratio, aligned, canonical_scale, canonical_level)


@multilevel_roi_align_op.register_fake
def _(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale,
      canonical_level):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::multilevel_roi_align_backward", mutates_args=())
def multilevel_roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scales: list[float], pooled_height: int,
                                     pooled_width: int, batch_size: int, channels: int, heights: list[int],
                                     widths: list[int], sampling_ratio: int, aligned: bool, canonical_scale: int,
                                     canonical_level: int, deterministic: bool) -> list[Tensor]:
    return _multilevel.multilevel_roi_align_backward(grad, rois, spatial_scales, pooled_height, pooled_width,
                                                     batch_size, channels, heights, widths, sampling_ratio, aligned,
                                                     canonical_scale, canonical_level)


@multilevel_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels, heights, widths, sampling_ratio,
      aligned, canonical_scale, canonical_level, deterministic):
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


def _multilevel_setup(ctx, inputs, output):
    features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, cs, cl = inputs
    ctx.save_for_backward(rois)
    n, c = features[0].shape[:2]
    ctx.settings = (list(spatial_scales), pooled_height, pooled_width, n, c, [f.shape[2] for f in features],
                    [f.shape[3] for f in features], sampling_ratio, aligned, cs, cl)


def _multilevel_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grads = multilevel_roi_align_backward_op(grad.contiguous(), rois, *ctx.settings,
                                             deterministic_backward_enabled())
    return list(grads), None, None, None, None, None, None, None, None


multilevel_roi_align_op.register_autograd(_multilevel_backward, setup_context=_multilevel_setup)


# ---------------------------------------------------------------- ps_roi_align, ps_roi_pool
@torch.library.custom_op("roikit::ps_roi_align", mutates_args=())
def ps_roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                    sampling_ratio: int) -> Tensor:
    return _ps.ps_roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio)


@ps_roi_align_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    channels = input.shape[1] // (pooled_height * pooled_width)
    return input.new_empty((rois.shape[0], channels, pooled_height, pooled_width))


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


def _ps_roi_align_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (spatial_scale, pooled_height, pooled_width, sampling_ratio, *input.shape)


def _ps_roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grad_input = ps_roi_align_backward_op(grad.contiguous(), rois, *ctx.settings, deterministic_backward_enabled())
    return grad_input, None, None, None, None, None


ps_roi_align_op.register_autograd(_ps_roi_align_backward, setup_context=_ps_roi_align_setup)


@torch.library.custom_op("roikit::ps_roi_pool", mutates_args=())
def ps_roi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                   pooled_width: int) -> Tensor:
    return _ps.ps_roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width)


@ps_roi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    channels = input.shape[1] // (pooled_height * pooled_width)
    return input.new_empty((rois.shape[0], channels, pooled_height, pooled_width))


@torch.library.custom_op("roikit::ps_roi_pool_backward", mutates_args=())
def ps_roi_pool_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                            batch_size: int, channels: int, height: int, width: int, deterministic: bool) -> Tensor:
    return _ps.ps_roi_pool_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                    height, width)


@ps_roi_pool_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, deterministic):
    return grad.new_empty((batch_size, channels, height, width))


def _ps_roi_pool_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (spatial_scale, pooled_height, pooled_width, *input.shape)


def _ps_roi_pool_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grad_input = ps_roi_pool_backward_op(grad.contiguous(), rois, *ctx.settings, deterministic_backward_enabled())
    return grad_input, None, None, None, None


ps_roi_pool_op.register_autograd(_ps_roi_pool_backward, setup_context=_ps_roi_pool_setup)


# ---------------------------------------------------------------- deform_roi_pool
@torch.library.custom_op("roikit::deform_roi_pool", mutates_args=())
def deform_roi_pool_op(input: Tensor, rois: Tensor, offset: Tensor | None, spatial_scale: float, pooled_height: int,
                       pooled_width: int, sampling_ratio: int, gamma: float) -> Tensor:
    return _deform.deform_roi_pool_forward(input, rois, offset, spatial_scale, pooled_height, pooled_width,
                                           sampling_ratio, gamma)


@deform_roi_pool_op.register_fake
def _(input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::deform_roi_pool_backward", mutates_args=())
def deform_roi_pool_backward_op(grad: Tensor, input: Tensor, rois: Tensor, offset: Tensor | None,
                                spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                                gamma: float, offset_grad: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    return _deform.deform_roi_pool_backward(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width,
                                            sampling_ratio, gamma, offset_grad)


@deform_roi_pool_backward_op.register_fake
def _(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma, offset_grad,
      deterministic):
    with_offset = offset_grad and offset is not None
    return grad.new_empty(input.shape), (offset.new_empty(offset.shape) if with_offset else grad.new_empty((0,)))


def _deform_roi_pool_setup(ctx, inputs, output):
    input, rois, offset, *settings = inputs
    ctx.offset_grad = offset is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(input, rois, offset)
    ctx.settings = tuple(settings)


def _deform_roi_pool_backward(ctx, grad):
    input, rois, offset = ctx.saved_tensors
    grad_input, grad_offset = deform_roi_pool_backward_op(grad.contiguous(), input, rois, offset, *ctx.settings,
                                                          ctx.offset_grad, deterministic_backward_enabled())
    return grad_input, None, grad_offset if ctx.offset_grad else None, None, None, None, None, None


deform_roi_pool_op.register_autograd(_deform_roi_pool_backward, setup_context=_deform_roi_pool_setup)


# ---------------------------------------------------------------- roi_align_rotated
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


def _roi_align_rotated_setup(ctx, inputs, output):
    input, rois, *settings = inputs
    ctx.save_for_backward(rois)
    ctx.settings = (*settings, *input.shape)


def _roi_align_rotated_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grad_input = roi_align_rotated_backward_op(grad.contiguous(), rois, *ctx.settings,
                                               deterministic_backward_enabled())
    return grad_input, None, None, None, None, None, None, None, None


roi_align_rotated_op.register_autograd(_roi_align_rotated_backward, setup_context=_roi_align_rotated_setup)


# ---------------------------------------------------------------- autocast
# As torchvision's ops: under autocast (CPU or CUDA) the forward runs in float32, whatever the features' dtype;
# the functional forms give the result back in the features' dtype.
for _op in (roi_pool_op, roi_align_op, prroi_pool_op, multilevel_roi_align_op, ps_roi_align_op, ps_roi_pool_op):
    for _device in ("cpu", "cuda"):
        _op.register_autocast(_device, torch.float32)
for _device in ("cpu", "cuda"):  # deform_roi_pool
    deform_roi_pool_op.register_autocast(_device, torch.float32)
for _device in ("cpu", "cuda"):  # roi_align_rotated
    roi_align_rotated_op.register_autocast(_device, torch.float32)

# ---------------------------------------------------------------- CUDA
# On CUDA tensors every op runs its Triton kernels (roikit.ops.triton, imported on the first CUDA call); without
# Triton, and for float64 or an empty map, the plain-PyTorch path above (it runs on any device).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton(name: str, *maps: Tensor):
    """The Triton kernel module ``name`` when it can take ``maps``, else None."""
    if any(m.dtype not in _KERNEL_DTYPES or m.numel() == 0 for m in maps):
        return None
    from .triton import kernels

    return kernels(name)


@torch.library.register_kernel("roikit::roi_pool", "cuda")
def _roi_pool(input, rois, spatial_scale, pooled_height, pooled_width, rounding):
    k = _triton("roi_pool", input)
    if k is None:
        return _pool.roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding)
    return k.roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding)


@torch.library.register_kernel("roikit::roi_pool_backward", "cuda")
def _roi_pool_backward(grad, rois, argmax, batch_size, channels, height, width, deterministic):
    k = _triton("roi_pool", grad) if batch_size * channels * height * width else None
    if k is None:
        return _pool.roi_pool_backward(grad, rois, argmax, batch_size, channels, height, width)
    return k.roi_pool_backward(grad, rois, argmax, batch_size, channels, height, width, deterministic)


@torch.library.register_kernel("roikit::roi_align", "cuda")
def _roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max):
    k = _triton("roi_align", input)
    if k is None:
        return _align.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                            aligned, pool_max)
    return k.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                               pool_max)


@torch.library.register_kernel("roikit::roi_align_backward", "cuda")
def _roi_align_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                        width, sampling_ratio, aligned, pool_max, deterministic):
    k = _triton("roi_align", grad) if batch_size * channels * height * width else None
    if k is None:
        return _align.roi_align_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width,
                                             batch_size, channels, height, width, sampling_ratio, aligned, pool_max)
    return k.roi_align_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                height, width, sampling_ratio, aligned, pool_max, deterministic)


@torch.library.register_kernel("roikit::prroi_pool", "cuda")
def _prroi_pool(input, rois, spatial_scale, pooled_height, pooled_width, aligned):
    k = _triton("prroi_pool", input)
    if k is None:
        return _prroi.prroi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, aligned)
    return k.prroi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, aligned)


@torch.library.register_kernel("roikit::prroi_pool_backward", "cuda")
def _prroi_pool_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned, deterministic):
    k = _triton("prroi_pool", input)
    if k is None:
        return _prroi.prroi_pool_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned)
    return k.prroi_pool_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned, deterministic)


@torch.library.register_kernel("roikit::multilevel_roi_align", "cuda")
def _multilevel_roi_align(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
                          canonical_scale, canonical_level):
    k = _triton("multilevel_roi_align", *features)
    if k is None:
        return _multilevel.multilevel_roi_align_forward(features, rois, spatial_scales, pooled_height,
                                                            pooled_width, sampling_ratio, aligned, canonical_scale,
                                                            canonical_level)
    return k.multilevel_roi_align_forward(features, rois, spatial_scales, pooled_height, pooled_width,
                                          sampling_ratio, aligned, canonical_scale, canonical_level)


@torch.library.register_kernel("roikit::multilevel_roi_align_backward", "cuda")
def _multilevel_roi_align_backward(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels,
                                   heights, widths, sampling_ratio, aligned, canonical_scale, canonical_level,
                                   deterministic):
    empty_map = any(h * w == 0 for h, w in zip(heights, widths)) or batch_size * channels == 0
    k = None if empty_map else _triton("multilevel_roi_align", grad)
    if k is None:
        return _multilevel.multilevel_roi_align_backward(grad, rois, spatial_scales, pooled_height, pooled_width,
                                                             batch_size, channels, heights, widths, sampling_ratio,
                                                             aligned, canonical_scale, canonical_level)
    return k.multilevel_roi_align_backward(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size,
                                           channels, heights, widths, sampling_ratio, aligned, canonical_scale,
                                           canonical_level, deterministic)


@torch.library.register_kernel("roikit::roi_align_box", "cuda")
def _roi_align_box(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max):
    k = _triton("roi_align", input)  # roi_align's own forward kernels
    impl = _align if k is None else k
    return impl.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                  pool_max)


@torch.library.register_kernel("roikit::roi_align_box_grad", "cuda")
def _roi_align_box_grad(grad, input, rois, output, argmax, spatial_scale, pooled_height, pooled_width,
                        sampling_ratio, aligned, pool_max):
    k = _triton("roi_align_box_grad", input)
    impl = _align_box if k is None else k
    return impl.roi_align_box_backward(grad, input, rois, output, argmax, spatial_scale, pooled_height, pooled_width,
                                       sampling_ratio, aligned, pool_max)


@torch.library.register_kernel("roikit::ps_roi_align", "cuda")
def _ps_roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    k = _triton("ps_roi", input)
    impl = _ps if k is None else k
    return impl.ps_roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio)


@torch.library.register_kernel("roikit::ps_roi_align_backward", "cuda")
def _ps_roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, batch_size,
                           channels, height, width, deterministic):
    settings = (spatial_scale, pooled_height, pooled_width, sampling_ratio, batch_size, channels, height, width)
    k = _triton("ps_roi", grad) if batch_size * channels * height * width else None
    if k is None:
        return _ps.ps_roi_align_backward(grad, rois, *settings)
    return k.ps_roi_align_backward(grad, rois, *settings, deterministic)


@torch.library.register_kernel("roikit::ps_roi_pool", "cuda")
def _ps_roi_pool(input, rois, spatial_scale, pooled_height, pooled_width):
    k = _triton("ps_roi", input)
    impl = _ps if k is None else k
    return impl.ps_roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width)


@torch.library.register_kernel("roikit::ps_roi_pool_backward", "cuda")
def _ps_roi_pool_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                          deterministic):
    settings = (spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width)
    k = _triton("ps_roi", grad) if batch_size * channels * height * width else None
    if k is None:
        return _ps.ps_roi_pool_backward(grad, rois, *settings)
    return k.ps_roi_pool_backward(grad, rois, *settings, deterministic)


@torch.library.register_kernel("roikit::deform_roi_pool", "cuda")
def _deform_roi_pool(input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio, gamma):
    k = _triton("deform_roi_pool", input)
    if k is None:
        return _deform.deform_roi_pool_forward(input, rois, offset, spatial_scale, pooled_height, pooled_width,
                                               sampling_ratio, gamma)
    return k.deform_roi_pool_forward(input, rois, offset, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                     gamma)


@torch.library.register_kernel("roikit::deform_roi_pool_backward", "cuda")
def _deform_roi_pool_backward_cuda(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width,
                                   sampling_ratio, gamma, offset_grad, deterministic):
    k = _triton("deform_roi_pool", input)
    if k is None:
        return _deform.deform_roi_pool_backward(grad, input, rois, offset, spatial_scale, pooled_height,
                                                pooled_width, sampling_ratio, gamma, offset_grad)
    return k.deform_roi_pool_backward(grad, input, rois, offset, spatial_scale, pooled_height, pooled_width,
                                      sampling_ratio, gamma, offset_grad, deterministic)


@torch.library.register_kernel("roikit::roi_align_rotated", "cuda")
def _roi_align_rotated(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise,
                       radians):
    k = _triton("roi_align_rotated", input)
    if k is None:
        return _rotated.roi_align_rotated_forward(input, rois, spatial_scale, pooled_height, pooled_width,
                                                  sampling_ratio, aligned, clockwise, radians)
    return k.roi_align_rotated_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                       aligned, clockwise, radians)


@torch.library.register_kernel("roikit::roi_align_rotated_backward", "cuda")
def _roi_align_rotated_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                clockwise, radians, batch_size, channels, height, width, deterministic):
    k = _triton("roi_align_rotated", grad) if batch_size * channels * height * width else None
    settings = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, radians, batch_size,
                channels, height, width)
    if k is None:
        return _rotated.roi_align_rotated_backward(grad, rois, *settings)
    return k.roi_align_rotated_backward(grad, rois, *settings, deterministic)
