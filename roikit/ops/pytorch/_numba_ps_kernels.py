"""numba kernels of the CPU fast path for the position-sensitive ops: ps_roi_align and ps_roi_pool, both ways.

Imported only through :mod:`roikit.ops.pytorch.jit_ps`, which builds their tables with :mod:`roikit.ops.geometry`
(the plain path's code) and runs ranges of channels on :func:`roikit.ops.pytorch.jit._run`'s threads.

Channels: input channel ``c`` belongs to output channel ``c // (PH * PW)`` and bin ``(ph, pw) = divmod(c % (PH *
PW), PW)``, so the output [K, C', PH, PW] is the matrix ``out[k, c]`` [K, C]. Every kernel runs input channels
``begin .. end`` (of a block of channels starting at ``c_offset``) and, for each, every box in order: one channel's
plane stays in cache over all boxes, no two threads touch one output value or one gradient cell, and each cell's
additions come in a fixed order (boxes, then samples or cells), whatever the thread count.

* ``ps_roi_align``: torchvision's sum for each bin, ``acc += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4`` over the
  samples, then ``acc / count`` (equal bits); the backward adds ``g * w / count`` to the four taps in torchvision's
  order (boxes, samples, taps): equal bits.
* ``ps_roi_pool``: the plain path's mean in float64. Two ways, picked per call by their cost: *direct* sums each
  bin's cells in float64 (cost: the bins' cells), *table* builds a channel's summed-area table exactly as the plain
  path does (``cumsum`` over rows, then columns, in float64) and reads four entries per bin (cost: the plane). The
  backward likewise adds ``g / area`` straight to the cells in float64, or replays the plain path's difference
  table (four corners, ``cumsum`` twice). The table ways give the plain path's bits; the direct ways the same sums
  added in another order (float64: equal bits after rounding to float32 unless a float64 sum rounds).
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ._numba_ps_tables import align_axis, align_taps, value

BLOCK = 16  # channels of a block: every box runs a block of channels at a time (its output row is written in
# runs of BLOCK values, not one value per cache line)


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
        y1, bin_h, gh = align_axis(rois, k, scale, ph_count, sampling_ratio, 2, 4)
        x1, bin_w, gw = align_axis(rois, k, scale, pw_count, sampling_ratio, 1, 3)
        align_taps(y1, bin_h, gh, ph_count, height, y_low, y_high, y_wlow, y_whigh, y_valid, 0)
        align_taps(x1, bin_w, gw, pw_count, width, x_low, x_high, x_wlow, x_whigh, x_valid, 0)
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
                    acc += (hy * hx) * value(plane[a0, b0]) + (hy * lx) * value(plane[a0, b1]) \
                        + (ly * hx) * value(plane[a1, b0]) + (ly * lx) * value(plane[a1, b1])
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
        y1, bin_h, gh = align_axis(rois, k, scale, ph_count, sampling_ratio, 2, 4)
        x1, bin_w, gw = align_axis(rois, k, scale, pw_count, sampling_ratio, 1, 3)
        gy, gx = min(max(gh, 0), most_y), min(max(gw, 0), most_x)
        if gy == 0 or gx == 0:
            continue
        align_taps(y1, bin_h, gh, ph_count, height, y_low, y_high, y_wlow, y_whigh, y_valid, 0)
        align_taps(x1, bin_w, gw, pw_count, width, x_low, x_high, x_wlow, x_whigh, x_valid, 0)
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
@nb.njit(cache=True, nogil=True)
def _summed_area(plane, table, columns):
    """``table`` [H + 1, W + 1] (float64) = the plane's summed-area table as the plain path computes it (the plane
    zero-padded on top and left, ``cumsum`` down the rows, then along each row): the same additions in the same
    order, in one pass that keeps the running column sums in ``columns`` [W + 1]; non-finite cells read as 0.
    Returns whether every cell was finite."""
    height, width = plane.shape
    finite = True
    table[0, :] = 0.0
    columns[:] = 0.0
    for i in range(height):
        row, src = table[i + 1], plane[i]
        acc = columns[0]
        row[0] = acc
        for j in range(width):
            v = np.float64(value(src[j]))
            if not np.isfinite(v):
                finite = False
                v = 0.0
            columns[j + 1] += v
            acc += columns[j + 1]
            row[j + 1] = acc
    return finite


@nb.njit(cache=True, nogil=True, inline="always")
def _direct_mean(feat, n, c, h0, h1, w0, w1):
    total = 0.0
    for h in range(h0, h1):
        for w in range(w0, w1):
            total += np.float64(value(feat[n, c, h, w]))
    return total / ((h1 - h0) * (w1 - w0))


@nb.njit(cache=True, nogil=True, inline="always")
def _block_bins(c0, c1, c_offset, ph_count, pw_count, bin_h, bin_w):
    for c in range(c0, c1):
        bin_h[c - c0], bin_w[c - c0] = _bin_of(c_offset + c, ph_count, pw_count)


@nb.njit(cache=True, nogil=True)
def ps_roi_pool_forward_boxes(begin, end, feat, c_offset, batch, h_start, h_end, w_start, w_end, out):
    """The direct way, boxes ``begin .. end``: feat [N, B, H, W] (channels ``c_offset ..``; float32, float64 or
    bfloat16 bits); batch [K]; bin edges [K, PH] / [K, PW] (clipped); out [K, C], columns ``c_offset ..`` of the rows
    written: each bin's cells summed in float64, divided by its area, rounded once to out's dtype; 0 when empty.
    (Blocks of channels kept in cache over all boxes, as the summed-area way runs, measured no faster at 512 boxes.)"""
    _, c_count, _, _ = feat.shape
    ph_count, pw_count = h_start.shape[1], w_start.shape[1]
    first_h, first_w = _bin_of(c_offset, ph_count, pw_count)
    for k in range(begin, end):
        n = batch[k]
        ph, pw = first_h, first_w
        for c in range(c_count):
            h0, h1, w0, w1 = h_start[k, ph], h_end[k, ph], w_start[k, pw], w_end[k, pw]
            if h1 <= h0 or w1 <= w0:
                out[k, c_offset + c] = 0
            else:
                out[k, c_offset + c] = _direct_mean(feat, n, c, h0, h1, w0, w1)
            pw += 1
            if pw == pw_count:
                pw, ph = 0, ph + 1 if ph + 1 < ph_count else 0


@nb.njit(cache=True, nogil=True)
def ps_roi_pool_forward(begin, end, feat, c_offset, batch, h_start, h_end, w_start, w_end, out, table_way, block):
    """feat [N, B, H, W] (channels ``c_offset ..``); batch [K]; bin edges [K, PH] / [K, PW] (int32, clipped);
    out [K, C], columns written: each bin's mean in float64, rounded once to out's dtype; 0 for an empty bin.
    ``table_way``: read summed-area tables (a channel with a non-finite cell is summed directly). ``block``
    channels at a time (their tables together: ``block * N * (H + 1) * (W + 1)`` float64)."""
    n_count, _, height, width = feat.shape
    ph_count, pw_count = h_start.shape[1], w_start.shape[1]
    tables = np.empty((block if table_way else 0, n_count, height + 1, width + 1), np.float64)
    columns = np.empty(width + 1, np.float64)
    bin_h, bin_w = np.empty(block, np.int64), np.empty(block, np.int64)
    direct = np.empty(block, np.bool_)
    for c0 in range(begin, end, block):
        c1 = min(c0 + block, end)
        _block_bins(c0, c1, c_offset, ph_count, pw_count, bin_h, bin_w)
        for c in range(c0, c1):
            direct[c - c0] = not table_way
            if table_way:
                for n in range(n_count):
                    if not _summed_area(feat[n, c], tables[c - c0, n], columns):
                        direct[c - c0] = True
        for k in range(batch.shape[0]):
            n = batch[k]
            for c in range(c0, c1):
                b = c - c0
                h0, h1, w0, w1 = h_start[k, bin_h[b]], h_end[k, bin_h[b]], w_start[k, bin_w[b]], w_end[k, bin_w[b]]
                if h1 <= h0 or w1 <= w0:
                    out[k, c_offset + c] = 0
                elif direct[b]:
                    out[k, c_offset + c] = _direct_mean(feat, n, c, h0, h1, w0, w1)
                else:
                    out[k, c_offset + c] = ((tables[b, n, h1, w1] - tables[b, n, h0, w1]) - tables[b, n, h1, w0]
                                            + tables[b, n, h0, w0]) / ((h1 - h0) * (w1 - w0))


@nb.njit(cache=True, nogil=True)
def ps_roi_pool_backward_cells(begin, end, grad, c_offset, batch, h_start, h_end, w_start, w_end, out):
    """The direct way, channels ``begin .. end``: grad [K, C]; edges as the forward's; out [N, B, H, W] (zeros,
    channels ``c_offset ..``): each bin's ``grad / area`` (float64) added to every cell it averaged, boxes in order,
    and the cell's float64 sum so far rounded into out after each addition (the last one stays). A float64 plane
    per image holds the sums; a stamp per cell says which channel last wrote it (an older stamp reads as 0), so a
    channel costs one pass over its bins' cells, not its plane."""
    n_count, _, height, width = out.shape
    ph_count, pw_count = h_start.shape[1], w_start.shape[1]
    acc = np.empty((n_count, height, width), np.float64)
    stamp = np.full((n_count, height, width), -1, np.int64)
    ph, pw = _bin_of(c_offset + begin, ph_count, pw_count)
    for c in range(begin, end):
        for k in range(grad.shape[0]):
            n = batch[k]
            h0, h1, w0, w1 = h_start[k, ph], h_end[k, ph], w_start[k, pw], w_end[k, pw]
            if h1 <= h0 or w1 <= w0:
                continue
            share = np.float64(grad[k, c_offset + c]) / ((h1 - h0) * (w1 - w0))
            for h in range(h0, h1):
                for w in range(w0, w1):
                    if stamp[n, h, w] == c:
                        acc[n, h, w] += share
                    else:
                        stamp[n, h, w] = c
                        acc[n, h, w] = 0.0 + share
                    out[n, c, h, w] = acc[n, h, w]
        pw += 1
        if pw == pw_count:
            pw, ph = 0, ph + 1 if ph + 1 < ph_count else 0


@nb.njit(cache=True, nogil=True)
def ps_roi_pool_backward(begin, end, grad, c_offset, batch, h_start, h_end, w_start, w_end, out, table_way, block):
    """grad [K, C]; edges as the forward's; out [N, B, H, W], written: each bin's ``grad / area`` (float64) on every
    cell it averaged, summed in float64 per channel and rounded once to out's dtype; ``block`` channels at a time."""
    n_count, _, height, width = out.shape
    ph_count, pw_count = h_start.shape[1], w_start.shape[1]
    acc = np.empty((block, n_count, height + 1, width + 1), np.float64)
    bin_h, bin_w = np.empty(block, np.int64), np.empty(block, np.int64)
    for c0 in range(begin, end, block):
        c1 = min(c0 + block, end)
        _block_bins(c0, c1, c_offset, ph_count, pw_count, bin_h, bin_w)
        acc[:] = 0.0
        # the table way replays the plain path's difference table: a corner for every box, then the next corner
        for corner in range(4 if table_way else 1):
            for k in range(grad.shape[0]):
                n = batch[k]
                for c in range(c0, c1):
                    b = c - c0
                    h0, h1 = h_start[k, bin_h[b]], h_end[k, bin_h[b]]
                    w0, w1 = w_start[k, bin_w[b]], w_end[k, bin_w[b]]
                    if h1 <= h0 or w1 <= w0:
                        continue
                    value = np.float64(grad[k, c_offset + c]) / ((h1 - h0) * (w1 - w0))
                    if not table_way:  # straight onto the cells
                        for h in range(h0, h1):
                            for w in range(w0, w1):
                                acc[b, n, h, w] += value
                    elif corner == 0:
                        acc[b, n, h0, w0] += value
                    elif corner == 1:
                        acc[b, n, h0, w1] += -value
                    elif corner == 2:
                        acc[b, n, h1, w0] += -value
                    else:
                        acc[b, n, h1, w1] += value
        for c in range(c0, c1):
            for n in range(n_count):
                plane = acc[c - c0, n]
                if table_way:
                    for i in range(1, height + 1):  # cumsum down the rows, then along each row
                        plane[i] += plane[i - 1]
                    for i in range(height):
                        row = plane[i]
                        total = 0.0
                        for j in range(width):
                            total += row[j]
                            row[j] = total
                dst = out[n, c]
                for i in range(height):
                    for j in range(width):
                        dst[i, j] = plane[i, j]
