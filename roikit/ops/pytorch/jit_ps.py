"""The CPU fast path of ``ps_roi_align`` and ``ps_roi_pool``: numba kernels (``_numba_ps_kernels``), launched as
:mod:`roikit.ops.pytorch.jit` launches RoIAlign's, with the plain path (``ps_roi.py``) as the reference.

Each launcher returns ``None`` for what it does not take (numba missing, the path switched off with
``ROIKIT_JIT=0`` or ``jit.disabled()``, a tensor off the CPU, more than ``jit.MAX_SAMPLES`` samples per bin and
axis, a map with 2^31 cells or more per plane), and the plain path runs instead. Tables come from
:mod:`roikit.ops.geometry` (the plain path's code); threads split the channels (``torch.get_num_threads()`` ranges),
so every result is the same on any thread count.

Results: ``ps_roi_align`` forward and backward give torchvision's bits in float32 and float64 (the same sums in the
same order); ``ps_roi_pool`` gives the plain path's float64 mean, rounded once (its bits, or a float64 rounding
apart where a sum rounds; never seen in the tests), and its backward (this forward's own gradient). Half types
compute in float32 on converted blocks of channels and round at the end.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..geometry import compute_dtype, ps_roi_pool_edges, sampling_grid
from ._crops import CHUNK_BUDGET, box_slices
from .jit import MAX_SAMPLES, _axis_table, _channel_chunks, _run, enabled

POOL_BLOCK = 16  # channels ps_roi_pool's kernels run at a time (each box's output row written in runs)
TABLE_BUDGET = 1 << 16  # samples (or bin edges) per axis of a slice of boxes' tables
POOL_SCRATCH = 1 << 18  # float64 values of a thread's tables (2 MiB), at most, unless one channel needs more


@functools.cache
def _kernels():
    """The numba kernel module, or None when numba cannot be imported."""
    try:
        from . import _numba_ps_kernels
    except ImportError:
        return None
    return _numba_ps_kernels


def _takes(*tensors: Tensor) -> bool:
    return enabled() and _kernels() is not None and all(t.device.type == "cpu" for t in tensors)


class _Declined(Exception):
    """A box with more than MAX_SAMPLES samples per bin and axis: the plain path runs the call."""


def _align_parts(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, height: int,
                 width: int):
    """``(slice, batch, y tables, x tables, gh * gw)`` a slice of boxes at a time (at most TABLE_BUDGET samples per
    axis together: the tables and their temporaries stay a small part of the output's memory), ``aligned=True``
    geometry. Raises :class:`_Declined` (before the first slice's tables when there is one slice of boxes) for a
    box with more than MAX_SAMPLES samples per bin and axis; a negative count (a reversed box, adaptive sampling)
    is a bin without samples."""
    for outer in box_slices(rois.shape[0]):
        (y1, bin_h, gh), (x1, bin_w, gw) = sampling_grid(rois[outer], spatial_scale, pooled, sampling_ratio, True)
        most_y, most_x = max(int(gh.max()), 1), max(int(gw.max()), 1)
        if max(most_y, most_x) > MAX_SAMPLES:
            raise _Declined
        batch = rois[outer, 0].long()
        step = max(1, TABLE_BUDGET // (pooled[0] * most_y + pooled[1] * most_x))
        for start in range(0, outer.stop - outer.start, step):
            sl = slice(start, min(start + step, outer.stop - outer.start))
            y = tuple(t.numpy() for t in _axis_table(y1[sl], bin_h[sl], gh[sl], pooled[0], most_y, height))
            x = tuple(t.numpy() for t in _axis_table(x1[sl], bin_w[sl], gw[sl], pooled[1], most_x, width))
            yield slice(outer.start + sl.start, outer.start + sl.stop), batch[sl].contiguous().numpy(), y, x, \
                gh[sl] * gw[sl]


def ps_roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         sampling_ratio: int) -> Tensor | None:
    """[K, C', PH, PW] in the map's dtype, or None when this path does not take the call."""
    n, c, h, w = input.shape
    pooled = (pooled_height, pooled_width)
    if not _takes(input, rois) or h * w >= 2**31:
        return None
    dtype = compute_dtype(rois)
    out = torch.empty((rois.shape[0], c), dtype=dtype)  # out[k, c] is output (k, c // PH PW, bin c % PH PW)
    try:
        for sl, batch, y, x, count in _align_parts(rois, spatial_scale, pooled, sampling_ratio, h, w):
            count = count.clamp(min=1).to(dtype).numpy()
            for c0, c1, feat in _channel_chunks(input, dtype):
                _run(_kernels().ps_roi_align_forward, c1 - c0, feat.numpy(), c0, batch, *y, *x, count,
                     out[sl].numpy())
    except _Declined:
        return None
    return out.reshape(rois.shape[0], -1, *pooled).to(input.dtype)


def ps_roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                          shape: tuple[int, int, int, int], sampling_ratio: int) -> Tensor | None:
    """Gradient with respect to the map, [N, C, H, W] in ``grad``'s dtype, or None."""
    n, c, h, w = shape
    pooled = (pooled_height, pooled_width)
    if not _takes(grad, rois) or h * w >= 2**31:
        return None
    dtype = compute_dtype(rois)
    g = grad.reshape(rois.shape[0], c).to(dtype).contiguous()
    out = torch.zeros(shape, dtype=grad.dtype)
    try:
        for c0, c1 in _channel_ranges(shape, grad.dtype == dtype):
            part = out if grad.dtype == dtype else torch.zeros((n, c1 - c0, h, w), dtype=dtype)
            for sl, batch, y, x, count in _align_parts(rois, spatial_scale, pooled, sampling_ratio, h, w):
                _run(_kernels().ps_roi_align_backward, c1 - c0, g[sl].numpy(), c0, batch, *y, *x,
                     count.to(dtype).numpy(), part.numpy())
            if part is not out:
                out[:, c0:c1] = part
    except _Declined:
        return None
    return out


def _channel_ranges(shape: tuple[int, int, int, int], whole: bool):
    """``(c0, c1)``: all channels when the result is computed in place, else blocks of at most CHUNK_BUDGET values."""
    n, c, h, w = shape
    step = c if whole else max(1, CHUNK_BUDGET // max(n * h * w, 1))
    for c0 in range(0, c, step):
        yield c0, min(c0 + step, c)


def _pool_edges(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], shape: tuple[int, int, int, int],
                backward: bool = False):
    """The bins' edges as contiguous int64 arrays, and whether the summed-area way is the cheaper."""
    k = rois.shape[0]
    edges = [torch.empty((k, pooled[i // 2]), dtype=torch.int32) for i in range(4)]  # int32: the map has < 2^31
    cells = 0.0
    for start in range(0, k, TABLE_BUDGET // (pooled[0] + pooled[1])):  # geometry's temporaries, a slice at a time
        sl = slice(start, min(start + TABLE_BUDGET // (pooled[0] + pooled[1]), k))
        (hs, he), (ws, we) = ps_roi_pool_edges(rois[sl], spatial_scale, pooled, shape[2:])
        cells += float(((he - hs).clamp(min=0).sum(1).double() * (we - ws).clamp(min=0).sum(1).double()).sum())
        for table, part in zip(edges, (hs, he, ws, we)):
            table[sl] = part
    return tuple(t.numpy() for t in edges), \
        _table_way(rois.shape[0], cells / (pooled[0] * pooled[1]), shape, backward)


def _table_way(boxes: int, cells: float, shape: tuple[int, int, int, int], backward: bool) -> bool:
    """Whether the table way is the cheaper for a channel, in units of a table entry: forward, its bins (``boxes``,
    reading ``cells`` cells together) cost about 6 entries each plus 2 a cell when summed directly (measured: 18 ns
    a bin of one cell direct, 9 ns by the table, 2 ns an entry); backward, the difference table's four passes over
    the boxes cost about 24 entries a box more than the direct way's one."""
    n, _, h, w = shape
    planes = n * (h + 1) * (w + 1)
    return 2 * cells - 24 * boxes > planes if backward else 6 * boxes + 2 * cells > planes


def _pool_block(shape: tuple[int, int, int, int]) -> int:
    """Channels ps_roi_pool's kernels take at a time: POOL_BLOCK, fewer where their float64 planes (each thread's
    ``block * N * (H + 1) * (W + 1)``) would exceed POOL_SCRATCH values."""
    n, _, h, w = shape
    return max(1, min(POOL_BLOCK, POOL_SCRATCH // max(n * (h + 1) * (w + 1), 1)))


def ps_roi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int) -> Tensor | None:
    """[K, C', PH, PW] in the map's dtype, or None."""
    n, c, h, w = input.shape
    if not _takes(input, rois) or h * w >= 2**31:
        return None
    pooled = (pooled_height, pooled_width)
    dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    edges, table_way = _pool_edges(rois, spatial_scale, pooled, input.shape)
    batch = rois[:, 0].long().contiguous().numpy()
    out = torch.empty((rois.shape[0], c), dtype=dtype)
    for c0, c1, feat in _channel_chunks(input, dtype):
        _run(_kernels().ps_roi_pool_forward, c1 - c0, feat.numpy(), c0, batch, *edges, out.numpy(), table_way,
             _pool_block(input.shape))
    return out.reshape(rois.shape[0], -1, *pooled).to(input.dtype)


def ps_roi_pool_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         shape: tuple[int, int, int, int]) -> Tensor | None:
    """Gradient with respect to the map, [N, C, H, W] in ``grad``'s dtype, or None."""
    n, c, h, w = shape
    if not _takes(grad, rois) or h * w >= 2**31:
        return None
    pooled = (pooled_height, pooled_width)
    dtype = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
    edges, table_way = _pool_edges(rois, spatial_scale, pooled, shape, backward=True)
    batch = rois[:, 0].long().contiguous().numpy()
    g = grad.reshape(rois.shape[0], c).to(dtype).contiguous().numpy()
    out = torch.empty(shape, dtype=grad.dtype)
    for c0, c1 in _channel_ranges(shape, grad.dtype == dtype):
        part = out if grad.dtype == dtype else torch.empty((n, c1 - c0, h, w), dtype=dtype)
        _run(_kernels().ps_roi_pool_backward, c1 - c0, g, c0, batch, *edges, part.numpy(), table_way,
             _pool_block(shape))
        if part is not out:
            out[:, c0:c1] = part
    return out
