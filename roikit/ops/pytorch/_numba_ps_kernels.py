"""numba kernels of the CPU fast path for the position-sensitive ops: ps_roi_align and ps_roi_pool, both ways.

Imported only through :mod:`roikit.ops.pytorch.jit_ps`, which runs ranges of boxes (forwards) or channels
(backwards) on :func:`roikit.ops.pytorch.jit._run`'s threads; the per-box samples and bin edges come from
:mod:`roikit.ops.pytorch._numba_ps_tables` (geometry's arithmetic).

Channels: input channel ``c`` belongs to output channel ``c // (PH * PW)`` and bin ``(ph, pw) = divmod(c % (PH *
PW), PW)``, so the output [K, C', PH, PW] is the matrix ``out[k, c]`` [K, C]. A forward writes its boxes' rows; a
backward runs its channels and, for each, every box in order: one channel's plane stays in cache over all boxes, no
two threads touch one output value or one gradient cell, and each cell's additions come in a fixed order (boxes,
then samples or cells), whatever the thread count.

* ``ps_roi_align``: torchvision's sum for each bin, ``acc += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4`` over the
  samples, then ``acc / count`` (equal bits); the backward adds ``g * w / count`` to the four taps in torchvision's
  order (boxes, samples, taps): equal bits.
* ``ps_roi_pool``: torchvision's arithmetic too: each bin's cells added row by row from 0 in the compute dtype,
  then divided by its area (equal bits); the backward adds ``g / area`` to each cell of the forward's bins, boxes in
  order (torchvision's additions, on the forward's cells). The flat arrays are indexed with unsigned offsets (numba
  checks a signed index for wraparound on every read: 1.5-2x slower here), and two channels of one bin (the same
  cells) are summed at a time.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ._numba_common import widen
from ._numba_kernels import align_axis, align_taps
from ._numba_ps_tables import pool_axis


@nb.njit(cache=True, nogil=True, inline="always")
def _bin_of(channel, ph_count, pw_count):
    b = channel % (ph_count * pw_count)
    return b // pw_count, b % pw_count


# ---------------------------------------------------------------- ps_roi_align
@nb.njit(cache=True, nogil=True)
def ps_roi_align_forward(begin, end, feat, c_offset, rois, scale, ph_count, pw_count, sampling_ratio, most_y, most_x,
                         out):
    """Boxes ``begin .. end``: feat [N, B, H, W] (the map's channels ``c_offset ..``; float32, float64, or bfloat16
    as int16 bits); rois [K, 5] and ``scale`` in the compute dtype; most_y / most_x: the most samples per bin and
    axis of any box (the scratch's size); out [K, C] (compute dtype), columns ``c_offset ..`` of the rows written.

    Each box's taps come from ``_numba_ps_tables`` into this thread's scratch, then its channels run in order, the
    bin stepping along with the channel (no division per channel)."""
    _, c_count, height, width = feat.shape
    t = out.dtype.type
    y_low, y_high = np.empty((1, ph_count, most_y), np.int64), np.empty((1, ph_count, most_y), np.int64)
    y_wlow, y_whigh = np.empty((1, ph_count, most_y), out.dtype), np.empty((1, ph_count, most_y), out.dtype)
    y_valid = np.empty((1, ph_count, most_y), np.bool_)
    x_low, x_high = np.empty((1, pw_count, most_x), np.int64), np.empty((1, pw_count, most_x), np.int64)
    x_wlow, x_whigh = np.empty((1, pw_count, most_x), out.dtype), np.empty((1, pw_count, most_x), out.dtype)
    x_valid = np.empty((1, pw_count, most_x), np.bool_)
    first_h, first_w = _bin_of(c_offset, ph_count, pw_count)
    for k in range(begin, end):
        n = np.int64(rois[k, 0])
        y1, bin_h, gh = align_axis(rois, k, scale, ph_count, sampling_ratio, True, 2, 4)
        x1, bin_w, gw = align_axis(rois, k, scale, pw_count, sampling_ratio, True, 1, 3)
        align_taps(y1, bin_h, gh, height, y_low, y_high, y_wlow, y_whigh, y_valid, 0)
        align_taps(x1, bin_w, gw, width, x_low, x_high, x_wlow, x_whigh, x_valid, 0)
        count = t(max(gh * gw, 1))
        gy, gx = min(max(gh, 0), most_y), min(max(gw, 0), most_x)
        ph, pw = first_h, first_w
        for c in range(c_count):
            plane = feat[n, c]
            acc = t(0.0)  # torchvision's order: acc += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4, then acc / count
            for iy in range(gy):
                if not y_valid[0, ph, iy]:
                    continue
                a0, a1, hy, ly = y_low[0, ph, iy], y_high[0, ph, iy], y_wlow[0, ph, iy], y_whigh[0, ph, iy]
                for ix in range(gx):
                    if not x_valid[0, pw, ix]:
                        continue
                    b0, b1, hx, lx = x_low[0, pw, ix], x_high[0, pw, ix], x_wlow[0, pw, ix], x_whigh[0, pw, ix]
                    acc += (hy * hx) * widen(plane[a0, b0]) + (hy * lx) * widen(plane[a0, b1]) \
                        + (ly * hx) * widen(plane[a1, b0]) + (ly * lx) * widen(plane[a1, b1])
            out[k, c_offset + c] = acc / count
            pw += 1
            if pw == pw_count:
                pw, ph = 0, ph + 1 if ph + 1 < ph_count else 0


@nb.njit(cache=True, nogil=True)
def ps_roi_align_backward(begin, end, grad, c_offset, rois, scale, ph_count, pw_count, sampling_ratio, most_y,
                          most_x, out):
    """Channels ``begin .. end`` of out [N, B, H, W] (zeros, the map's channels ``c_offset ..``), added into box by
    box: grad [K, C] in the compute dtype; rois, scale, most_y / most_x as the forward's. Each box's taps are
    computed once into this thread's scratch; every cell receives its additions in torchvision's order (boxes,
    samples, taps)."""
    _, _, height, width = out.shape
    t = grad.dtype.type
    y_low, y_high = np.empty((1, ph_count, most_y), np.int64), np.empty((1, ph_count, most_y), np.int64)
    y_wlow, y_whigh = np.empty((1, ph_count, most_y), grad.dtype), np.empty((1, ph_count, most_y), grad.dtype)
    y_valid = np.empty((1, ph_count, most_y), np.bool_)
    x_low, x_high = np.empty((1, pw_count, most_x), np.int64), np.empty((1, pw_count, most_x), np.int64)
    x_wlow, x_whigh = np.empty((1, pw_count, most_x), grad.dtype), np.empty((1, pw_count, most_x), grad.dtype)
    x_valid = np.empty((1, pw_count, most_x), np.bool_)
    first_h, first_w = _bin_of(c_offset + begin, ph_count, pw_count)
    for k in range(rois.shape[0]):
        n = np.int64(rois[k, 0])
        y1, bin_h, gh = align_axis(rois, k, scale, ph_count, sampling_ratio, True, 2, 4)
        x1, bin_w, gw = align_axis(rois, k, scale, pw_count, sampling_ratio, True, 1, 3)
        gy, gx = min(max(gh, 0), most_y), min(max(gw, 0), most_x)
        if gy == 0 or gx == 0:
            continue
        align_taps(y1, bin_h, gh, height, y_low, y_high, y_wlow, y_whigh, y_valid, 0)
        align_taps(x1, bin_w, gw, width, x_low, x_high, x_wlow, x_whigh, x_valid, 0)
        m = t(gh * gw)
        ph, pw = first_h, first_w
        for c in range(begin, end):
            plane, g = out[n, c], grad[k, c_offset + c]
            for iy in range(gy):
                if not y_valid[0, ph, iy]:
                    continue
                r0, r1, hy, ly = y_low[0, ph, iy], y_high[0, ph, iy], y_wlow[0, ph, iy], y_whigh[0, ph, iy]
                for ix in range(gx):
                    if not x_valid[0, pw, ix]:
                        continue
                    q0, q1, hx, lx = x_low[0, pw, ix], x_high[0, pw, ix], x_wlow[0, pw, ix], x_whigh[0, pw, ix]
                    plane[r0, q0] += g * (hy * hx) / m
                    plane[r0, q1] += g * (hy * lx) / m
                    plane[r1, q0] += g * (ly * hx) / m
                    plane[r1, q1] += g * (ly * lx) / m
            pw += 1
            if pw == pw_count:
                pw, ph = 0, ph + 1 if ph + 1 < ph_count else 0


# ---------------------------------------------------------------- ps_roi_pool
_U = np.uint64  # offsets into the flat arrays: unsigned, so numba adds no negative-index wraparound per read


@nb.njit(cache=True, nogil=True, inline="always")
def _bin_sum(flat, base, width, h0, h1, w0, w1, t):
    """torchvision's sum of one bin: ``acc = 0``, then ``acc += cell`` row by row, in ``t``."""
    acc = t(0.0)
    h = h0
    while h < h1:
        row = base + h * width
        w = w0
        while w < w1:
            acc += widen(flat[row + w])
            w += _U(1)
        h += _U(1)
    return acc


@nb.njit(cache=True, nogil=True, inline="always")
def _bin_sum2(flat, base, step, width, h0, h1, w0, w1, t):
    """:func:`_bin_sum` of two planes ``step`` apart at once (two independent sums, each in its own order)."""
    a0, a1 = t(0.0), t(0.0)
    h = h0
    while h < h1:
        row = base + h * width
        w = w0
        while w < w1:
            a0 += widen(flat[row + w])
            a1 += widen(flat[row + step + w])
            w += _U(1)
        h += _U(1)
    return a0, a1


@nb.njit(cache=True, nogil=True)
def ps_roi_pool_forward(begin, end, feat, c_first, rois, scale, ph_count, pw_count, out):
    """Boxes ``begin .. end``: feat [N, B, H, W] (contiguous: the map's channels ``c_first .. c_first + B``;
    float32, float64, or bfloat16 as int16 bits); rois [K, 5] and ``scale`` in the compute dtype; out [K, C]
    (compute dtype), columns ``c_first .. c_first + B`` of the rows written.

    torchvision's arithmetic: each box's bin edges (``pool_axis``), each bin's cells added row by row in the
    compute dtype from 0, then divided by the bin's area; 0 for an empty bin. The channels of one bin
    (``j * PH * PW + b``) share its cells: two of them are summed at a time."""
    _, block, height, width = feat.shape
    t = out.dtype.type
    flat, out_flat = feat.reshape(-1), out.reshape(-1)
    bins = ph_count * pw_count
    c_out = out.shape[1] // bins
    h_start, h_end = np.empty((1, ph_count), np.int64), np.empty((1, ph_count), np.int64)
    w_start, w_end = np.empty((1, pw_count), np.int64), np.empty((1, pw_count), np.int64)
    j_first, j_stop = np.empty(bins, np.int64), np.empty(bins, np.int64)  # bin b's channels j * bins + b here
    for b in range(bins):
        j_first[b] = max(0, (c_first - b + bins - 1) // bins)
        j_stop[b] = min(c_out, (c_first + block - b + bins - 1) // bins)
    plane, u_width, u_bins = _U(height * width), _U(width), _U(bins)
    step = u_bins * plane
    for k in range(begin, end):
        n = _U(np.int64(rois[k, 0]))
        pool_axis(rois, k, scale, ph_count, 2, 4, height, h_start, h_end, 0)
        pool_axis(rois, k, scale, pw_count, 1, 3, width, w_start, w_end, 0)
        row_out = _U(k) * _U(out.shape[1])
        for ph in range(ph_count):
            h0, h1 = _U(h_start[0, ph]), _U(h_end[0, ph])
            for pw in range(pw_count):
                w0, w1 = _U(w_start[0, pw]), _U(w_end[0, pw])
                b = _U(ph * pw_count + pw)
                j, stop = _U(j_first[ph * pw_count + pw]), _U(j_stop[ph * pw_count + pw])
                at = row_out + j * u_bins + b  # out's flat index of channel j * bins + b
                if h1 <= h0 or w1 <= w0:
                    while j < stop:
                        out_flat[at] = 0
                        j, at = j + _U(1), at + u_bins
                    continue
                area = t((h1 - h0) * (w1 - w0))
                base = (n * _U(block) + j * u_bins + b - _U(c_first)) * plane
                while j + _U(2) <= stop:
                    a0, a1 = _bin_sum2(flat, base, step, u_width, h0, h1, w0, w1, t)
                    out_flat[at], out_flat[at + u_bins] = a0 / area, a1 / area
                    j, at, base = j + _U(2), at + _U(2) * u_bins, base + _U(2) * step
                if j < stop:
                    out_flat[at] = _bin_sum(flat, base, u_width, h0, h1, w0, w1, t) / area


@nb.njit(cache=True, nogil=True)
def ps_roi_pool_backward(begin, end, grad, c_offset, batch, h_start, h_end, w_start, w_end, out):
    """Channels ``begin .. end`` of out [N, B, H, W] (zeros, contiguous; the map's channels ``c_offset ..``), added
    into: grad [K, C] in out's dtype; batch [K]; bin edges [K, PH] / [K, PW] (the forward's, clipped to the last
    cell). Each bin's ``grad / area`` (torchvision's division) added to every cell it averaged, boxes in order: each
    cell's additions in torchvision's order (its backward visits boxes in order, and a box feeds a channel through
    one bin)."""
    _, block, height, width = out.shape
    t = out.dtype.type
    flat = out.reshape(-1)
    ph_count, pw_count = h_start.shape[1], w_start.shape[1]
    hs, he, ws, we, g_flat = h_start.reshape(-1), h_end.reshape(-1), w_start.reshape(-1), w_end.reshape(-1), \
        grad.reshape(-1)
    plane, u_width, u_ph, u_pw, u_c = _U(height * width), _U(width), _U(ph_count), _U(pw_count), _U(grad.shape[1])
    ph, pw = _bin_of(c_offset + begin, ph_count, pw_count)
    for c in range(begin, end):
        u_h, u_w, u_g = _U(ph), _U(pw), _U(c_offset + c)
        for k in range(grad.shape[0]):
            uk = _U(k)
            h0, h1 = _U(hs[uk * u_ph + u_h]), _U(he[uk * u_ph + u_h])
            w0, w1 = _U(ws[uk * u_pw + u_w]), _U(we[uk * u_pw + u_w])
            if h1 <= h0 or w1 <= w0:
                continue
            share = g_flat[uk * u_c + u_g] / t((h1 - h0) * (w1 - w0))
            base = (_U(batch[uk]) * _U(block) + _U(c)) * plane
            h = h0
            while h < h1:
                row = base + h * u_width
                w = w0
                while w < w1:
                    flat[row + w] += share
                    w += _U(1)
                h += _U(1)
        pw += 1
        if pw == pw_count:
            pw, ph = 0, ph + 1 if ph + 1 < ph_count else 0
