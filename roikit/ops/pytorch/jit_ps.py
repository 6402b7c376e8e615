"""The CPU fast path of ``ps_roi_align`` and ``ps_roi_pool``: numba kernels (``_numba_ps_kernels``), launched as
:mod:`roikit.ops.pytorch.jit` launches RoIAlign's, with the plain path (``ps_roi.py``) as the reference.

Each launcher returns ``None`` for what it does not take (numba missing, the path switched off with
``ROIKIT_JIT=0`` or ``jit.disabled()``, a tensor off the CPU, more than ``jit.MAX_SAMPLES`` samples per bin and
axis, a map with 2^31 cells or more per plane, channels not a multiple of PH * PW), and the plain path runs
instead. The boxes' samples and bin edges
come from ``_numba_ps_tables`` (geometry's arithmetic, operation by operation, in numba: a few microseconds where
building them with torch ops cost 0.2-0.3 ms a call). Threads split the boxes (forward) or the channels (backward,
ps_roi_pool's summed-area way) in ``torch.get_num_threads()`` ranges, so every result is the same on any thread
count; a call with little work runs on the calling thread alone (handing ranges to the pool costs more there).

Results: ``ps_roi_align`` forward and backward give torchvision's bits in float32 and float64 (the same sums in the
same order); ``ps_roi_pool`` gives the plain path's float64 mean, rounded once (its bits, or a float64 rounding
apart where a sum rounds; never seen in the tests), and its backward (this forward's own gradient). bfloat16 maps are
read as they are (their bits widen exactly to float32), float16 ones through float32 copies of blocks of channels;
half types compute in float32 (ps_roi_align) or float64 (ps_roi_pool) and round once at the end.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from ..geometry import compute_dtype
from ._crops import CHUNK_BUDGET
from .jit import MAX_SAMPLES, _channel_chunks, _run, enabled, fresh_tensor

POOL_BLOCK = 16  # channels ps_roi_pool's summed-area kernels run at a time
POOL_SCRATCH = 1 << 18  # float64 values of a thread's tables (2 MiB), at most, unless one channel needs more
SERIAL_WORK = 1 << 14  # samples (ps_roi_align) or bins (ps_roi_pool) below which a call runs on the calling thread


@functools.cache
def _kernels():
    """The numba kernel modules ``(kernels, tables)``, or None when numba cannot be imported."""
    try:
        from . import _numba_ps_kernels, _numba_ps_tables
    except ImportError:
        return None
    return _numba_ps_kernels, _numba_ps_tables


def _takes(*tensors: Tensor) -> bool:
    return enabled() and _kernels() is not None and all(t.device.type == "cpu" for t in tensors)


def _launch(kernel, count: int, work: int, *args) -> None:
    """``kernel(begin, end, *args)`` over ``0 .. count``: on the calling thread when ``work`` is small, else in
    ranges on :func:`roikit.ops.pytorch.jit._run`'s threads."""
    if work < SERIAL_WORK or torch.get_num_threads() == 1:
        kernel(0, count, *args)
    else:
        _run(kernel, count, *args)


def _boxes(rois: Tensor, spatial_scale: float):
    """``(rois, scale)``: the boxes as a contiguous [K, 5] array of the compute dtype and the scale as a scalar of it
    (torch multiplies a float32 tensor by a Python float in float32)."""
    dtype = compute_dtype(rois)
    scalar = np.float64 if dtype == torch.float64 else np.float32
    return rois.to(dtype).contiguous().numpy(), scalar(spatial_scale)


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
    out = fresh_tensor((k, c), dtype, zeros=False)  # out[k, c] is output (k, c // PH PW, bin c % PH PW)
    work = k * c * min(most[0] * most[1], 16)
    for c0, _, feat in _map_chunks(input, dtype):
        _launch(_kernels()[0].ps_roi_align_forward, k, work, feat, c0, boxes, scale, pooled_height, pooled_width,
                sampling_ratio, most[0], most[1], out.numpy())
    return out.reshape(k, -1, pooled_height, pooled_width).to(input.dtype)


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
def _pool_edges(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], shape: tuple[int, int, int, int],
                backward: bool = False):
    """``(batch, edges, table_way)``: the boxes' batch indices [K] and bin edges ``(h_start, h_end)`` [K, PH],
    ``(w_start, w_end)`` [K, PW] (int32: the map has < 2^31 cells per plane), and whether the summed-area way is
    the cheaper."""
    k = rois.shape[0]
    boxes, scale = _boxes(rois, spatial_scale)
    batch = np.empty(k, np.int64)
    edges = tuple(np.empty((k, pooled[i // 2]), np.int32) for i in range(4))
    cells = _kernels()[1].pool_edges(boxes, scale, shape[2], shape[3], batch, *edges)
    return batch, edges, _table_way(k, cells, shape, backward)


def _table_way(boxes: int, cells: float, shape: tuple[int, int, int, int], backward: bool) -> bool:
    """Whether the summed-area way is the cheaper for a channel, in units of a table entry (about 1.5 ns: a plane's
    table costs its ``N * (H + 1) * (W + 1)`` entries). Measured per channel on the sweep's map (2 x 50 x 68):
    forward, direct ~6 ns a bin plus ~1.1 ns a cell against ~2 ns a bin by the table; backward, direct ~15 ns a
    bin plus ~3 ns a cell (zeroed, added to, written) against ~22 ns a bin for the difference table's corners."""
    n, _, h, w = shape
    planes = n * (h + 1) * (w + 1)
    return 2 * cells - 5 * boxes > planes if backward else 3 * boxes + 0.75 * cells > planes


def _pool_block(shape: tuple[int, int, int, int]) -> int:
    """Channels ps_roi_pool's kernels take at a time: POOL_BLOCK, fewer where their float64 planes (each thread's
    ``block * N * (H + 1) * (W + 1)``) would exceed POOL_SCRATCH values."""
    n, _, h, w = shape
    return max(1, min(POOL_BLOCK, POOL_SCRATCH // max(n * (h + 1) * (w + 1), 1)))


def _pool_dtype(dtype: torch.dtype) -> torch.dtype:
    """ps_roi_pool's output before the final cast: the map's dtype, float64 for the half types (one rounding)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float64


def ps_roi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int) -> Tensor | None:
    """[K, C', PH, PW] in the map's dtype, or None."""
    n, c, h, w = input.shape
    if not _takes(input, rois) or h * w >= 2**31 or c % (pooled_height * pooled_width):
        return None
    k = rois.shape[0]
    batch, edges, table_way = _pool_edges(rois, spatial_scale, (pooled_height, pooled_width), input.shape)
    out = fresh_tensor((k, c), _pool_dtype(input.dtype), zeros=False)
    kernels = _kernels()[0]
    for c0, c1, feat in _map_chunks(input, input.dtype if input.dtype == torch.float64 else torch.float32):
        if table_way:
            _run(kernels.ps_roi_pool_forward, c1 - c0, feat, c0, batch, *edges, out.numpy(), True,
                 _pool_block(input.shape))
        else:
            _launch(kernels.ps_roi_pool_forward_boxes, k, k * c, feat, c0, batch, *edges, out.numpy())
    return out.reshape(k, -1, pooled_height, pooled_width).to(input.dtype)


def ps_roi_pool_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         shape: tuple[int, int, int, int]) -> Tensor | None:
    """Gradient with respect to the map, [N, C, H, W] in ``grad``'s dtype, or None."""
    n, c, h, w = shape
    if not _takes(grad, rois) or h * w >= 2**31:
        return None
    dtype = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
    batch, edges, table_way = _pool_edges(rois, spatial_scale, (pooled_height, pooled_width), shape, backward=True)
    g = grad.reshape(rois.shape[0], c).to(dtype).contiguous().numpy()
    whole = grad.dtype == dtype
    out = fresh_tensor(shape, grad.dtype, zeros=whole and not table_way)
    kernels = _kernels()[0]
    for c0, c1 in _channel_ranges(shape, whole):
        part = out if whole else fresh_tensor((n, c1 - c0, h, w), dtype, zeros=not table_way)
        if table_way:
            _run(kernels.ps_roi_pool_backward, c1 - c0, g, c0, batch, *edges, part.numpy(), True, _pool_block(shape))
        else:
            _launch(kernels.ps_roi_pool_backward_cells, c1 - c0, g.shape[0] * c, g, c0, batch, *edges, part.numpy())
        if part is not out:
            out[:, c0:c1] = part
    return out
