"""numba versions of :mod:`roikit.ops.geometry`'s position-sensitive rules, per box, for the kernels of
``_numba_ps_kernels``: RoIAlign's sample taps (``aligned=True``; their arithmetic is RoIAlign's own,
``_numba_kernels.align_axis`` / ``align_taps``, one copy for both ops) and PSRoIPool's bin edges.

They repeat geometry's arithmetic operation by operation in the boxes' compute dtype (float32 boxes: float32, the
scale rounded to float32 first, as torch multiplies a float32 tensor by a Python float; float64 boxes: float64),
so the kernels sample the points and read the cells the plain path does (tests/test_jit_ps_kernels.py compares
the tables on hostile boxes). ``rois`` is a contiguous [K, 5] array in the compute dtype, ``scale`` a scalar of
that dtype.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ..geometry import MAX_CELLS
from ._numba_kernels import align_axis, align_taps  # RoIAlign's sample taps, shared (aligned=True here)


# ---------------------------------------------------------------- RoIAlign (aligned=True)
@nb.njit(cache=True, nogil=True)
def most_samples(rois, scale, pooled_height, pooled_width, sampling_ratio):
    """``(most_y, most_x)``: the most samples per bin along each axis over all boxes (at least 1)."""
    most_y, most_x = 1, 1
    for k in range(rois.shape[0]):
        most_y = max(most_y, align_axis(rois, k, scale, pooled_height, sampling_ratio, True, 2, 4)[2])
        most_x = max(most_x, align_axis(rois, k, scale, pooled_width, sampling_ratio, True, 1, 3)[2])
    return most_y, most_x


@nb.njit(cache=True, nogil=True)
def align_tables(rois, first, scale, sampling_ratio, height, width, batch, y_low, y_high, y_wlow, y_whigh, y_valid,
                 x_low, x_high, x_wlow, x_whigh, x_valid, count):
    """Tables of boxes ``first ..`` (as many as ``batch`` holds): batch [B] (int64), y [B, PH, GY], x [B, PW, GX]
    (as ``_numba_kernels.align_taps``), count [B] (``gh * gw`` in the tables' dtype, not clamped)."""
    t = count.dtype.type
    for row in range(batch.shape[0]):
        k = first + row
        batch[row] = np.int64(rois[k, 0])
        y1, bin_h, gh = align_axis(rois, k, scale, y_low.shape[1], sampling_ratio, True, 2, 4)
        x1, bin_w, gw = align_axis(rois, k, scale, x_low.shape[1], sampling_ratio, True, 1, 3)
        align_taps(y1, bin_h, gh, height, y_low, y_high, y_wlow, y_whigh, y_valid, row)
        align_taps(x1, bin_w, gw, width, x_low, x_high, x_wlow, x_whigh, x_valid, row)
        count[row] = t(gh * gw)


# ---------------------------------------------------------------- PSRoIPool
@nb.njit(cache=True, nogil=True)
def round_half_away(x):
    """``geometry.round_half_away`` as an int64."""
    whole = np.trunc(x)
    return np.int64(whole + np.sign(x)) if abs(x - whole) >= 0.5 else np.int64(whole)


@nb.njit(cache=True, nogil=True)
def pool_axis(rois, k, scale, pooled, lo, hi, length, starts, ends, row):
    """Row ``row`` of ``starts``/``ends`` [*, P]: box ``k``'s bin edges along one axis as
    ``geometry.ps_roi_pool_edges`` (clipped to ``[0, length - 1]``)."""
    t = rois.dtype.type
    first = round_half_away(min(max(rois[k, lo] * scale, t(-MAX_CELLS)), t(MAX_CELLS)))
    last = round_half_away(min(max(rois[k, hi] * scale, t(-MAX_CELLS)), t(MAX_CELLS)))
    size = t(max(last - first, 1)) / t(pooled)
    edge = max(length - 1, 0)
    for p in range(pooled):
        starts[row, p] = min(max(np.int64(np.floor(t(p) * size)) + first, 0), edge)
        ends[row, p] = min(max(np.int64(np.ceil(t(p + 1) * size)) + first, 0), edge)


@nb.njit(cache=True, nogil=True)
def pool_edges(rois, scale, height, width, batch, h_start, h_end, w_start, w_end):
    """Every box's bin edges: batch [K] (int64), h [K, PH], w [K, PW]."""
    for k in range(rois.shape[0]):
        batch[k] = np.int64(rois[k, 0])
        pool_axis(rois, k, scale, h_start.shape[1], 2, 4, height, h_start, h_end, k)
        pool_axis(rois, k, scale, w_start.shape[1], 1, 3, width, w_start, w_end, k)
