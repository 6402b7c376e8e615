"""CUDA implementations of roikit's ops, written in Triton, registered with ``torch.library``.

Importing this package registers a CUDA kernel for every ``roikit::`` op; it imports neither Triton nor the kernel
modules, so ``import roikit`` stays fast and works without Triton or a GPU. The first call on a CUDA tensor
imports the kernels. Without Triton, and for float64 or an empty feature map, a CUDA call runs the plain-PyTorch
implementation instead (it runs on any device). CPU tensors never come here.

The kernel modules (one per op family: kernels and launchers) can also be called directly, on CUDA tensors or,
with ``TRITON_INTERPRET=1``, on CPU tensors: that is how the tests check them without a GPU.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from .. import _library  # noqa: F401  (defines the roikit:: ops)
from ..pytorch import multilevel_roi_align as _ref_multilevel
from ..pytorch import prroi_pool as _ref_prroi
from ..pytorch import roi_align as _ref_align
from ..pytorch import roi_pool as _ref_pool

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_modules: dict[str, ModuleType | None] = {}


def kernels(name: str) -> ModuleType | None:
    """The kernel module ``roikit.ops.triton.<name>``, or None when Triton cannot be imported."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            _modules[name] = None
    return _modules[name]


def _usable(name: str, *maps: torch.Tensor) -> ModuleType | None:
    if any(m.dtype not in _KERNEL_DTYPES or m.numel() == 0 for m in maps):
        return None
    return kernels(name)


@torch.library.register_kernel("roikit::roi_pool", "cuda")
def _roi_pool(input, rois, spatial_scale, pooled_height, pooled_width, rounding):
    k = _usable("roi_pool", input)
    if k is None:
        return _ref_pool.roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding)
    return k.roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding)


@torch.library.register_kernel("roikit::roi_pool_backward", "cuda")
def _roi_pool_backward(grad, rois, argmax, batch_size, channels, height, width, deterministic):
    k = _usable("roi_pool", grad) if batch_size * channels * height * width else None
    if k is None:
        return _ref_pool.roi_pool_backward(grad, rois, argmax, batch_size, channels, height, width)
    return k.roi_pool_backward(grad, rois, argmax, batch_size, channels, height, width, deterministic)


@torch.library.register_kernel("roikit::roi_align", "cuda")
def _roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_max):
    k = _usable("roi_align", input)
    if k is None:
        return _ref_align.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                            aligned, pool_max)
    return k.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                               pool_max)


@torch.library.register_kernel("roikit::roi_align_backward", "cuda")
def _roi_align_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                        width, sampling_ratio, aligned, pool_max, deterministic):
    k = _usable("roi_align", grad) if batch_size * channels * height * width else None
    if k is None:
        return _ref_align.roi_align_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width,
                                             batch_size, channels, height, width, sampling_ratio, aligned, pool_max)
    return k.roi_align_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                height, width, sampling_ratio, aligned, pool_max, deterministic)


@torch.library.register_kernel("roikit::prroi_pool", "cuda")
def _prroi_pool(input, rois, spatial_scale, pooled_height, pooled_width, aligned):
    k = _usable("prroi_pool", input)
    if k is None:
        return _ref_prroi.prroi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, aligned)
    return k.prroi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, aligned)


@torch.library.register_kernel("roikit::prroi_pool_backward", "cuda")
def _prroi_pool_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned, deterministic):
    k = _usable("prroi_pool", input)
    if k is None:
        return _ref_prroi.prroi_pool_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned)
    return k.prroi_pool_backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned, deterministic)


@torch.library.register_kernel("roikit::multilevel_roi_align", "cuda")
def _multilevel_roi_align(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
                          canonical_scale, canonical_level):
    k = _usable("multilevel_roi_align", *features)
    if k is None:
        return _ref_multilevel.multilevel_roi_align_forward(features, rois, spatial_scales, pooled_height,
                                                            pooled_width, sampling_ratio, aligned, canonical_scale,
                                                            canonical_level)
    return k.multilevel_roi_align_forward(features, rois, spatial_scales, pooled_height, pooled_width,
                                          sampling_ratio, aligned, canonical_scale, canonical_level)


@torch.library.register_kernel("roikit::multilevel_roi_align_backward", "cuda")
def _multilevel_roi_align_backward(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels,
                                   heights, widths, sampling_ratio, aligned, canonical_scale, canonical_level,
                                   deterministic):
    empty_map = any(h * w == 0 for h, w in zip(heights, widths)) or batch_size * channels == 0
    k = None if empty_map else _usable("multilevel_roi_align", grad)
    if k is None:
        return _ref_multilevel.multilevel_roi_align_backward(grad, rois, spatial_scales, pooled_height, pooled_width,
                                                             batch_size, channels, heights, widths, sampling_ratio,
                                                             aligned, canonical_scale, canonical_level)
    return k.multilevel_roi_align_backward(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size,
                                           channels, heights, widths, sampling_ratio, aligned, canonical_scale,
                                           canonical_level, deterministic)
