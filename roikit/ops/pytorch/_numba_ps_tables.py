"""numba versions of :mod:`roikit.ops.geometry`'s position-sensitive rules, per box, for the kernels of
``_numba_ps_kernels``: RoIAlign's sample taps (``aligned=True``) and PSRoIPool's bin edges.

They repeat geometry's arithmetic operation by operation in the boxes' compute dtype (float32 boxes: float32, the
scale rounded to float32 first, as torch multiplies a float32 tensor by a Python float; float64 boxes: float64),
so the kernels sample the points and read the cells the plain path does (tests/test_jit_ps_kernels.py compares
the tables on hostile boxes). ``rois`` is a contiguous [K, 5] array in the compute dtype, ``scale`` a scalar of
that dtype.

Also here: :func:`value`, a map cell as a float (bfloat16 maps arrive as their int16 bits and widen exactly to
float32), so the kernels read bfloat16 maps without a float32 copy.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic, overload

from ..geometry import MAX_CELLS, MAX_GRID


# ---------------------------------------------------------------- map cells
@intrinsic
def _bfloat16_bits(typingctx, bits):
    """A bfloat16 given as its 16 bits (an int16) -> the equal float32 (its bits shifted up: exact)."""
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


def value(cell):
    """A map cell as a float: float32 / float64 as they are, a bfloat16's int16 bits as float32."""
    raise NotImplementedError("numba only")


@overload(value, inline="always")
def _value(cell):
    if isinstance(cell, types.Integer):
        return lambda cell: _bfloat16_bits(cell)
    return lambda cell: cell


# ---------------------------------------------------------------- RoIAlign (aligned=True)
@nb.njit(cache=True, nogil=True)
def align_axis(rois, k, scale, pooled, sampling_ratio, lo, hi):
    """Box ``k``'s axis from columns ``lo`` to ``hi`` (y: 2, 4; x: 1, 3): ``(start, bin size, samples per bin)``
    as ``geometry.sampling_grid`` (the box shifted by -0.5 cell; a negative count for a reversed adaptive box)."""
    t = rois.dtype.type
    start = min(max(rois[k, lo] * scale, t(-MAX_CELLS)), t(MAX_CELLS)) - t(0.5)
    stop = min(max(rois[k, hi] * scale, t(-MAX_CELLS)), t(MAX_CELLS)) - t(0.5)
    size = (stop - start) / t(pooled)
    if sampling_ratio > 0:
        return start, size, np.int64(min(sampling_ratio, MAX_GRID))
    return start, size, np.int64(min(np.ceil(size), t(MAX_GRID)))


@nb.njit(cache=True, nogil=True)
def align_taps(start, size, grid, pooled, length, low, high, w_low, w_high, valid, row):
    """Row ``row`` of one axis's tables [*, P, G] (G = the tables' last extent, at least ``grid``): sample ``i``
    of bin ``p`` at ``geometry.sample_coord`` and its taps as ``geometry.sample_taps`` (low, high cells; their
    weights; whether it lies on the map: ``i < grid`` and ``-1 <= coord <= length``)."""
    t = w_low.dtype.type
    g = t(max(grid, 1))
    for p in range(pooled):
        for i in range(low.shape[2]):
            coord = (start + t(p) * size) + ((t(i) + t(0.5)) * size) / g
            inside = i < grid and coord >= t(-1.0) and coord <= t(length)
            y = max(coord, t(0.0))
            cell = np.int64(y) if inside else 0
            at_end = cell >= length - 1
            if at_end:
                cell = length - 1
            frac = t(0.0) if at_end or not inside else y - t(cell)
            low[row, p, i], high[row, p, i] = cell, cell if at_end else cell + 1
            w_low[row, p, i] = t(1.0) - frac if inside else t(0.0)
            w_high[row, p, i] = frac if inside else t(0.0)
            valid[row, p, i] = inside


@nb.njit(cache=True, nogil=True)
def most_samples(rois, scale, pooled_height, pooled_width, sampling_ratio):
    """``(most_y, most_x)``: the most samples per bin along each axis over all boxes (at least 1)."""
    most_y, most_x = 1, 1
    for k in range(rois.shape[0]):
        most_y = max(most_y, align_axis(rois, k, scale, pooled_height, sampling_ratio, 2, 4)[2])
        most_x = max(most_x, align_axis(rois, k, scale, pooled_width, sampling_ratio, 1, 3)[2])
    return most_y, most_x


@nb.njit(cache=True, nogil=True)
def align_tables(rois, first, scale, sampling_ratio, height, width, batch, y_low, y_high, y_wlow, y_whigh, y_valid,
                 x_low, x_high, x_wlow, x_whigh, x_valid, count):
    """Tables of boxes ``first ..`` (as many as ``batch`` holds): batch [B] (int64), y [B, PH, GY], x [B, PW, GX]
    (as :func:`align_taps`), count [B] (``gh * gw`` in the tables' dtype, not clamped)."""
    t = count.dtype.type
    for row in range(batch.shape[0]):
        k = first + row
        batch[row] = np.int64(rois[k, 0])
        y1, bin_h, gh = align_axis(rois, k, scale, y_low.shape[1], sampling_ratio, 2, 4)
        x1, bin_w, gw = align_axis(rois, k, scale, x_low.shape[1], sampling_ratio, 1, 3)
        align_taps(y1, bin_h, gh, y_low.shape[1], height, y_low, y_high, y_wlow, y_whigh, y_valid, row)
        align_taps(x1, bin_w, gw, x_low.shape[1], width, x_low, x_high, x_wlow, x_whigh, x_valid, row)
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
