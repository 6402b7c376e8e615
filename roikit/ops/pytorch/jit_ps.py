"""The CPU fast path of ``ps_roi_align`` and ``ps_roi_pool``: numba kernels (``_numba_ps_kernels``), launched as
:mod:`roikit.ops.pytorch.jit` launches RoIAlign's, with the plain path (``ps_roi.py``) as the reference.

Each launcher returns ``None`` for what it does not take (numba missing, the path switched off with
``ROIKIT_JIT=0`` or ``jit.disabled()``, a tensor off the CPU, more than ``jit.MAX_SAMPLES`` samples per bin and
axis, a map with 2^31 cells or more per plane, channels not a multiple of PH * PW), and the plain path runs
instead. The boxes' samples and bin edges come from ``_numba_ps_tables`` (geometry's arithmetic, operation by
operation, in numba: a few microseconds where building them with torch ops cost 0.2-0.3 ms a call; ps_roi_pool's
forward computes each box's edges inside the kernel). Threads split the boxes (forwards) or the channels
(backwards) in pieces (``jit._run``), so every result is the same on any thread count; a call with little
work runs on the calling thread alone (handing pieces to the pool costs more there).

Results: both ops give torchvision's bits in float32 and float64 (its sums in its order, in the map's dtype):
``ps_roi_align`` forward and backward; ``ps_roi_pool`` forward, and its backward adds ``grad / area`` cell by cell
as torchvision's does, on the forward's own cells (torchvision's CPU backward clips bins to H and W, its forward to
H - 1 and W - 1: the gradients differ on the bins that reach the last row or column). Against the plain path
(float64 summed-area tables) ``ps_roi_pool`` agrees within its sums' rounding: a bin of ``a`` cells within about
``(a + 2) u mean|cell|`` (u = 2^-24 for float32 sums; tests/test_jit_ps_kernels.py checks the bound), unless a
float32 sum overflows (cells near float32's largest values). bfloat16 maps are read as they are (their bits widen
exactly to float32), float16 ones through float32 copies of blocks of channels; half types compute in float32 and
round once at the end, so they give torchvision's float32 result rounded (torchvision's own float16 kernel sums in
float16 and it takes no bfloat16).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._utils import numba_module
from ..geometry import compute_dtype
from ._crops import CHUNK_BUDGET
from .jit import MAX_SAMPLES, _channel_chunks, _run, fresh_tensor
from .jit import _takes as _jit_takes

SERIAL_WORK = 1 << 14  # samples (ps_roi_align) or bins (ps_roi_pool) below which a call runs on the calling thread


def _kernels():
    """The numba kernel modules ``(kernels, tables)``, or None when numba cannot be imported."""
    kernels, tables = numba_module("pytorch._numba_ps_kernels"), numba_module("pytorch._numba_ps_tables")
    return None if kernels is None or tables is None else (kernels, tables)


def _takes(*tensors: Tensor) -> bool:
    return _jit_takes(*tensors) and _kernels() is not None


def _launch(kernel, count: int, work: int, *args) -> None:
    """``kernel(begin, end, *args)`` over ``0 .. count``: on the calling thread when ``work`` is small, else in
    pieces on :func:`roikit.ops.pytorch.jit._run`'s threads."""
    if work < SERIAL_WORK or torch.get_num_threads() == 1:
        kernel(0, count, *args)
    else:
        _run(kernel, count, *args)


def _boxes(rois: Tensor, spatial_scale: float):
    """``(rois, scale)``: the boxes as a contiguous [K, 5] array of the compute dtype and the scale as a scalar of it
    (torch multiplies a float32 tensor by a Python float in float32)."""
    dtype = rois.dtype
    if dtype == torch.float32 and rois.is_contiguous():  # the usual boxes, as they are (a few us saved a call)
        return rois.numpy(), np.float32(spatial_scale)
    if dtype == torch.float64:
        return rois.contiguous().numpy(), np.float64(spatial_scale)
    return rois.to(torch.float32).contiguous().numpy(), np.float32(spatial_scale)


def _map_chunks(input: Tensor, dtype: torch.dtype):
    """``(c0, c1, map array)`` for the kernels: a contiguous bfloat16 map as its int16 bits (the kernels widen each
    cell to float32) when ``dtype`` is float32, else :func:`roikit.ops.pytorch.jit._channel_chunks` in ``dtype``."""
    if input.dtype == torch.bfloat16 and dtype == torch.float32 and input.is_contiguous():
        yield 0, input.shape[1], input.view(torch.int16).numpy()
        return
    for c0, c1, feat in _channel_chunks(input, dtype):
        yield c0, c1, feat.numpy()


# ---------------------------------------------------------------- ps_roi_align
def _most_samples(rois: np.ndarray, scale, pooled: tuple[int, int], sampling_ratio: int) -> tuple[int, int] | None:
    """The most samples per bin along y and x over all boxes, or None above MAX_SAMPLES (the plain path runs)."""
    if sampling_ratio > 0:
        most_y = most_x = sampling_ratio
    else:
        most_y, most_x = _kernels()[1].most_samples(rois, scale, pooled[0], pooled[1], sampling_ratio)
    return None if max(most_y, most_x) > MAX_SAMPLES else (int(most_y), int(most_x))


def ps_roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         sampling_ratio: int) -> Tensor | None:
    """[K, C', PH, PW] in the map's dtype, or None when this path does not take the call."""
    n, c, h, w = input.shape
    if not _takes(input, rois) or h * w >= 2**31 or c % (pooled_height * pooled_width):
        return None
    boxes, scale = _boxes(rois, spatial_scale)
    most = _most_samples(boxes, scale, (pooled_height, pooled_width), sampling_ratio)
    if most is None:
        return None
    dtype = compute_dtype(rois)
    k = rois.shape[0]
    # out[k, c] is output (k, c // PH PW, bin c % PH PW); float32 / float64: fresh_tensor's memory, made directly
    out_array = np.empty((k, c), np.float64 if dtype == torch.float64 else np.float32)
    kernel, work = _kernels()[0].ps_roi_align_forward, k * c * min(most[0] * most[1], 16)
    settings = (boxes, scale, pooled_height, pooled_width, sampling_ratio, most[0], most[1], out_array)
    if input.dtype == dtype and input.is_contiguous():  # the map as it is (no generator: a few us a call)
        _launch(kernel, k, work, input.numpy(), 0, *settings)
    else:
        for c0, _, feat in _map_chunks(input, dtype):
            _launch(kernel, k, work, feat, c0, *settings)
    out = torch.from_numpy(out_array.reshape(k, c // (pooled_height * pooled_width), pooled_height, pooled_width))
    return out if out.dtype == input.dtype else out.to(input.dtype)


def ps_roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                          shape: tuple[int, int, int, int], sampling_ratio: int) -> Tensor | None:
    """Gradient with respect to the map, [N, C, H, W] in ``grad``'s dtype, or None."""
    n, c, h, w = shape
    pooled = (pooled_height, pooled_width)
    if not _takes(grad, rois) or h * w >= 2**31:
        return None
    boxes, scale = _boxes(rois, spatial_scale)
    most = _most_samples(boxes, scale, pooled, sampling_ratio)
    if most is None:
        return None
    dtype = compute_dtype(rois)
    g = grad.reshape(rois.shape[0], c).to(dtype).contiguous().numpy()
    whole = grad.dtype == dtype
    out = fresh_tensor(shape, grad.dtype, zeros=whole)
    work = rois.shape[0] * c * min(most[0] * most[1], 16)
    for c0, c1 in _channel_ranges(shape, whole):
        part = out if whole else fresh_tensor((n, c1 - c0, h, w), dtype)
        _launch(_kernels()[0].ps_roi_align_backward, c1 - c0, work, g, c0, boxes, scale, pooled_height,
                pooled_width, sampling_ratio, most[0], most[1], part.numpy())
        if part is not out:
            out[:, c0:c1] = part
    return out


def _channel_ranges(shape: tuple[int, int, int, int], whole: bool):
    """``(c0, c1)``: all channels when the result is computed in place, else blocks of at most CHUNK_BUDGET values."""
    n, c, h, w = shape
    step = c if whole else max(1, CHUNK_BUDGET // max(n * h * w, 1))
    for c0 in range(0, c, step):
        yield c0, min(c0 + step, c)


# ---------------------------------------------------------------- ps_roi_pool
def _pool_edges(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], shape: tuple[int, int, int, int]):
    """``(batch, edges)``: the boxes' batch indices [K] and bin edges ``(h_start, h_end)`` [K, PH], ``(w_start,
    w_end)`` [K, PW] (int32: the map has < 2^31 cells per plane)."""
    k = rois.shape[0]
    boxes, scale = _boxes(rois, spatial_scale)
    batch = np.empty(k, np.int64)
    edges = tuple(np.empty((k, pooled[i // 2]), np.int32) for i in range(4))
    _kernels()[1].pool_edges(boxes, scale, shape[2], shape[3], batch, *edges)
    return batch, edges


def ps_roi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int) -> Tensor | None:
    """[K, C', PH, PW] in the map's dtype, or None."""
    n, c, h, w = input.shape
    if not _takes(input, rois) or h * w >= 2**31 or c % (pooled_height * pooled_width):
        return None
    k = rois.shape[0]
    dtype = compute_dtype(rois)
    boxes, scale = _boxes(rois, spatial_scale)
    # out[k, c] is output (k, c // PH PW, bin c % PH PW); float32 / float64: fresh_tensor's memory, made directly
    out_array = np.empty((k, c), np.float64 if dtype == torch.float64 else np.float32)
    kernel = _kernels()[0].ps_roi_pool_forward
    if input.dtype == dtype and input.is_contiguous():  # the map as it is (no generator: a few us a call)
        _launch(kernel, k, k * c, input.numpy(), 0, boxes, scale, pooled_height, pooled_width, out_array)
    else:
        for c0, _, feat in _map_chunks(input, dtype):
            _launch(kernel, k, k * c, feat, c0, boxes, scale, pooled_height, pooled_width, out_array)
    out = torch.from_numpy(out_array.reshape(k, c // (pooled_height * pooled_width), pooled_height, pooled_width))
    return out if out.dtype == input.dtype else out.to(input.dtype)


def ps_roi_pool_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         shape: tuple[int, int, int, int]) -> Tensor | None:
    """Gradient with respect to the map, [N, C, H, W] in ``grad``'s dtype, or None."""
    n, c, h, w = shape
    if not _takes(grad, rois) or h * w >= 2**31:
        return None
    dtype = compute_dtype(rois)
    batch, edges = _pool_edges(rois, spatial_scale, (pooled_height, pooled_width), shape)
    g = grad.reshape(rois.shape[0], c).to(dtype).contiguous().numpy()
    whole = grad.dtype == dtype
    out = fresh_tensor(shape, grad.dtype, zeros=whole)
    for c0, c1 in _channel_ranges(shape, whole):
        part = out if whole else fresh_tensor((n, c1 - c0, h, w), dtype)
        _launch(_kernels()[0].ps_roi_pool_backward, c1 - c0, g.shape[0] * c, g, c0, batch, *edges, part.numpy())
        if part is not out:
            out[:, c0:c1] = part
    return out
