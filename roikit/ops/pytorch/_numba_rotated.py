"""numba kernels of rotated RoIAlign's CPU fast path (launched by :mod:`~roikit.ops.pytorch.roi_align_rotated`).

The launchers take the plain path's sample grid and windows (:func:`~.roi_align_rotated.rotated_grid`,
:func:`~.roi_align_rotated.sample_windows`: the same bounded work, whatever the box) and the kernels visit each
bin's window of samples, computing every position, test and tap with the plain path's operations in the same order
and dtype (``sample_coord``, the turn about the centre, ``sample_taps``): the same samples with the same weights.
Only the sums differ in order: the plain path adds a bin's samples in one matrix product (BLAS's order) and its
gradient by ``index_add_`` over groups of boxes; the kernels add in torchvision's order (per sample
``w1 v1 + w2 v2 + w3 v3 + w4 v4``, samples row by row; the backward box by box). So the results agree with the
plain path to rounding (tests/test_jit_rotated.py: within 1e-6), not bit for bit.

The kernels are serial and release the GIL; the launchers run ranges of boxes (forward) or of channels (backward,
so no two threads add into one value) on ``jit._run``'s threads.
"""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True, inline="always")
def _taps(coord, length, like):
    """``geometry.sample_taps`` of a sample on the map (``-1 <= coord <= length``): low, high cells and weights, in
    the dtype of the array ``like``."""
    t = like.dtype.type
    y = t(0.0) if coord < t(0.0) else coord
    low = np.int64(y)
    if low >= length - 1:
        return length - 1, length - 1, t(1.0), t(0.0)
    frac = y - t(low)
    return low, low + 1, t(1.0) - frac, frac


@nb.njit(cache=True, nogil=True, inline="always")
def _offset(start, size, grid, p, i):
    """``geometry.sample_coord``: sample ``i`` of bin ``p`` along one axis of the box's frame."""
    t = type(start)
    return (start + t(p) * size) + ((t(i) + t(0.5)) * size) / t(max(grid, 1))


@nb.njit(cache=True, nogil=True)
def rotated_forward(begin, end, values, height, width, batch, cy, cx, cos, sin, y0, x0, bin_h, bin_w, gh, gw, lo_y,
                    n_y, lo_x, n_x, out):
    """Boxes ``begin .. end``: values [N H W, C] (channels-last rows, compute dtype); per box [B] the grid and
    windows [B, PH] / [B, PW] of the plain path; out [B, C, PH, PW] (compute dtype), written. A bin averages its
    samples on the map (``acc += w1 v1 + w2 v2 + w3 v3 + w4 v4``, all four taps read: ``0 * inf`` is NaN as in the
    plain path) over ``max(gh * gw, 1)``."""
    t = values.dtype.type
    channels = values.shape[1]
    ph_count, pw_count = lo_y.shape[1], lo_x.shape[1]
    acc = np.empty(channels, values.dtype)
    for k in range(begin, end):
        base = batch[k] * height
        count = t(max(gh[k] * gw[k], 1))
        for ph in range(ph_count):
            for pw in range(pw_count):
                acc[:] = 0
                for iy in range(lo_y[k, ph], lo_y[k, ph] + n_y[k, ph]):
                    yy = _offset(y0[k], bin_h[k], gh[k], ph, iy)
                    for ix in range(lo_x[k, pw], lo_x[k, pw] + n_x[k, pw]):
                        xx = _offset(x0[k], bin_w[k], gw[k], pw, ix)
                        y, x = yy * cos[k] - xx * sin[k] + cy[k], yy * sin[k] + xx * cos[k] + cx[k]  # turned
                        if not (y >= t(-1.0) and y <= t(height) and x >= t(-1.0) and x <= t(width)):
                            continue
                        y_low, y_high, wy_low, wy_high = _taps(y, height, y0)
                        x_low, x_high, wx_low, wx_high = _taps(x, width, y0)
                        w1, w2, w3, w4 = wy_low * wx_low, wy_low * wx_high, wy_high * wx_low, wy_high * wx_high
                        r0, r1 = (base + y_low) * width, (base + y_high) * width
                        v1, v2 = values[r0 + x_low], values[r0 + x_high]
                        v3, v4 = values[r1 + x_low], values[r1 + x_high]
                        for c in range(channels):
                            acc[c] += w1 * v1[c] + w2 * v2[c] + w3 * v3[c] + w4 * v4[c]
                for c in range(channels):
                    out[k, c, ph, pw] = acc[c] / count


@nb.njit(cache=True, nogil=True)
def rotated_backward(begin, end, grad, height, width, batch, cy, cx, cos, sin, y0, x0, bin_h, bin_w, gh, gw, lo_y,
                     n_y, lo_x, n_x, out):
    """Channels ``begin .. end``: grad [B, C, PH, PW] (compute dtype); grid and windows as the forward's; out
    [N H W, C] (zeros), added into: each tap of each sample on the map gets ``w * (g / count)``, box by box, bin by
    bin, sample by sample, tap by tap (one loop per tap: two taps on one cell add in turn)."""
    t = grad.dtype.type
    ph_count, pw_count = lo_y.shape[1], lo_x.shape[1]
    share = np.empty(end - begin, grad.dtype)
    for k in range(batch.shape[0]):
        base = batch[k] * height
        count = t(max(gh[k] * gw[k], 1))
        for ph in range(ph_count):
            for pw in range(pw_count):
                for c in range(begin, end):
                    share[c - begin] = grad[k, c, ph, pw] / count
                for iy in range(lo_y[k, ph], lo_y[k, ph] + n_y[k, ph]):
                    yy = _offset(y0[k], bin_h[k], gh[k], ph, iy)
                    for ix in range(lo_x[k, pw], lo_x[k, pw] + n_x[k, pw]):
                        xx = _offset(x0[k], bin_w[k], gw[k], pw, ix)
                        y, x = yy * cos[k] - xx * sin[k] + cy[k], yy * sin[k] + xx * cos[k] + cx[k]  # turned
                        if not (y >= t(-1.0) and y <= t(height) and x >= t(-1.0) and x <= t(width)):
                            continue
                        y_low, y_high, wy_low, wy_high = _taps(y, height, y0)
                        x_low, x_high, wx_low, wx_high = _taps(x, width, y0)
                        r0, r1 = (base + y_low) * width, (base + y_high) * width
                        _add(out[r0 + x_low], begin, share, wy_low * wx_low)
                        _add(out[r0 + x_high], begin, share, wy_low * wx_high)
                        _add(out[r1 + x_low], begin, share, wy_high * wx_low)
                        _add(out[r1 + x_high], begin, share, wy_high * wx_high)


@nb.njit(cache=True, nogil=True, inline="always")
def _add(row, begin, share, weight):
    for c in range(share.shape[0]):
        row[begin + c] += weight * share[c]
