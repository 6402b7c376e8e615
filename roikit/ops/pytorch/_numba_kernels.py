"""numba kernels of the CPU fast path: RoIAlign (average), forward and backward. RoIPool's are in
:mod:`._numba_pool_kernels`, the helpers both use (bfloat16 bits, channels-last blocks) in :mod:`._numba_common`.

Imported only through :mod:`roikit.ops.pytorch.jit`, which builds their tables with :mod:`roikit.ops.geometry`
(the same code as the plain path) and falls back to the plain path when numba is missing.

Every kernel is serial and releases the GIL: it runs boxes (forward) or channels (backward) ``begin .. end``, and
:mod:`~roikit.ops.pytorch.jit` runs ranges on a thread pool (numba's own ``prange`` compiled these loops about 2x
slower here, and its thread pools fight torch's).

**Forward** (a range of boxes per call): the cells a box reads are copied, a block of channels at a time, from the
[N, C, H, W] map into a small channels-last scratch [rows, cols, block]; every bin is then computed for the whole
block of channels at once (one vector per tap), in the order torchvision's C++ loop uses for each channel:
``acc += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4`` over the bin's samples (``w1 = hy * hx`` ...), then ``acc /
count``: bit for bit torchvision's sum (no fused multiply-add: numba does not contract without ``fastmath``). A
sample off the map reads nothing (torchvision reads cell (0, 0) with weight 0; see tests/test_hostile_values.py
for that deviation).

The rows (columns) copied are the box's contiguous span of read cells, or, when that is longer, the two taps of
each sample listed one after the other: at most ``min(map, 2 * P * G)`` per axis. Scratch memory per thread is
``rows * cols * block`` values: bounded by the map and the block, whatever the box.

**Backward** (a range of channels per call, so no two threads write one cell): every box in order adds its bins'
gradients into its image's plane of that channel, in torchvision's order (boxes, bins, samples, then the taps
``g1 .. g4``): the same additions in the same order, so bit for bit torchvision's gradient, on any thread count.
It does so a block of channels at a time through a channels-last copy of the cells the box's taps touch (one
vector per tap), written back before the next box; a bfloat16 map adds up in float32 planes per block.

RoIAlign's tables (sample taps and weights) are built here too, box by box (``roi_align_tables``), with
:mod:`roikit.ops.geometry`'s operations in its order; ps_roi_align's kernels take the same per-axis arithmetic
(``align_axis``, ``align_taps``). A RoIAlign call reads the map by per-box copies or by
channels-last blocks of the whole map, whichever :func:`jit._use_channels_last` expects to be cheaper (decided per
call, so per pyramid level); the per-box copies prefetch the next block's cells (``_prefetch_cells``).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..geometry import MAX_CELLS, MAX_GRID
from ._numba_common import narrow, transposed_block, widen


@intrinsic
def _prefetch(typingctx, array, i, j):
    """A hint that ``array[i, j]`` (a 2-D array) will be read soon: LLVM's ``prefetch`` (read, keep in all cache
    levels). It changes no value; a kernel that copies many short rows from a map far larger than the caches (a fine
    pyramid level) waits on one row at a time without it (measured: copies 2-3x slower)."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1], args[2]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8")
        builder.call(function, [builder.bitcast(pointer, byte_pointer), int32(0), int32(3), int32(1)])
        return context.get_dummy_value()

    return types.void(array, i, j), codegen


@nb.njit(cache=True, nogil=True)
def _prefetch_cells(feat, n, c0, c1, rows, cols):
    """Prefetch cells ``rows x cols`` of channels ``c0 .. c1`` (clipped to the map) of image ``n`` of ``feat``
    [N, C, H, W]: a hint for every 32 bytes of a row's run of cells (so every cache line it touches gets one)."""
    step = max(1, 32 // feat.itemsize)
    for c in range(c0, min(c1, feat.shape[1])):
        plane = feat[n, c]
        for i in range(rows.shape[0]):
            r = rows[i]
            last = -(1 << 62)
            for j in range(cols.shape[0]):
                q = cols[j]
                if q < last or q >= last + step or j == cols.shape[0] - 1:
                    _prefetch(plane, r, q)
                    last = q


# ---------------------------------------------------------------- RoIAlign's tables
# geometry's sampling_grid, sample_coord and sample_taps box by box, operation by operation in the boxes' compute
# dtype (float32 boxes: float32, the scale rounded to float32 first as torch multiplies a float32 tensor by a Python
# float), so the kernels sample the plain path's points (tests/test_jit_kernels.py compares the tables): a few
# microseconds a call where the torch ops took 0.3-0.6 ms, most of a call with few boxes.
@nb.njit(cache=True, nogil=True)
def _clamp(x, lo, hi):
    """``torch.clamp``: NaN stays NaN."""
    return lo if x < lo else hi if x > hi else x


@nb.njit(cache=True, nogil=True)
def align_axis(rois, k, scale, pooled, sampling_ratio, aligned, lo, hi):
    """Box ``k``'s axis from columns ``lo`` to ``hi`` (y: 2, 4; x: 1, 3) as ``geometry.sampling_grid``:
    ``(start, bin size, samples per bin)``; an adaptive count is ``ceil(bin size)`` capped at MAX_GRID, negative
    for a reversed ``aligned`` box (this path does not take it; ps_roi_align's bins give 0), -1 where it is NaN.
    Shared with ps_roi_align's kernels (``_numba_ps_kernels``, ``aligned=True``)."""
    t = rois.dtype.type
    offset = t(0.5) if aligned else t(0.0)
    start = _clamp(rois[k, lo] * scale, t(-MAX_CELLS), t(MAX_CELLS)) - offset
    stop = _clamp(rois[k, hi] * scale, t(-MAX_CELLS), t(MAX_CELLS)) - offset
    extent = stop - start
    if not aligned and extent < t(1.0):  # malformed boxes forced to 1 cell (torchvision's legacy rule)
        extent = t(1.0)
    size = extent / t(pooled)
    if sampling_ratio > 0:
        return start, size, np.int64(min(sampling_ratio, MAX_GRID))
    grid = np.ceil(size)
    if grid != grid:
        return start, size, np.int64(-1)
    return start, size, np.int64(min(grid, t(MAX_GRID)))


@nb.njit(cache=True, nogil=True)
def roi_align_samples(rois, scale, pooled_height, pooled_width, sampling_ratio, aligned):
    """``(least, most_y, most_x)``: the fewest samples per bin on any axis of any box (negative: a count this
    path does not take), and the most along each axis (at least 1)."""
    least, most_y, most_x = np.int64(1) << 62, 1, 1
    for k in range(rois.shape[0]):
        gh = align_axis(rois, k, scale, pooled_height, sampling_ratio, aligned, 2, 4)[2]
        gw = align_axis(rois, k, scale, pooled_width, sampling_ratio, aligned, 1, 3)[2]
        least, most_y, most_x = min(least, gh, gw), max(most_y, gh), max(most_x, gw)
    return least, most_y, most_x


@nb.njit(cache=True, nogil=True)
def align_taps(start, size, grid, length, low, high, w_low, w_high, valid, row):
    """Row ``row`` of one axis's tables [*, P, G] (G at least ``grid``, P the bins): sample ``i`` of bin ``p`` at
    ``geometry.sample_coord`` and its taps as ``geometry.sample_taps`` (low, high cells; their weights; valid:
    ``i < grid`` and on the map). Shared with ps_roi_align's kernels."""
    t = w_low.dtype.type
    g = t(max(grid, 1))
    for p in range(low.shape[1]):
        for i in range(low.shape[2]):
            coord = (start + t(p) * size) + ((t(i) + t(0.5)) * size) / g
            inside = i < grid and coord >= t(-1.0) and coord <= t(length)
            y = t(0.0) if coord < t(0.0) else coord
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
def roi_align_tables(rois, first, scale, sampling_ratio, aligned, height, width, batch, y_low, y_high, y_wlow,
                     y_whigh, y_valid, x_low, x_high, x_wlow, x_whigh, x_valid, count):
    """Tables of boxes ``first ..`` (as many as ``batch`` holds): batch [B] (int64), y [B, PH, GY], x [B, PW, GX]
    (low, high int32; weights in the boxes' dtype; valid), count [B] (``gh * gw``, int64). Returns the cells the
    per-box forward copies for these boxes (:func:`_local_axis`'s rows x columns, summed)."""
    cells = 0
    for row in range(batch.shape[0]):
        k = first + row
        batch[row] = np.int64(rois[k, 0])
        y1, bin_h, gh = align_axis(rois, k, scale, y_low.shape[1], sampling_ratio, aligned, 2, 4)
        x1, bin_w, gw = align_axis(rois, k, scale, x_low.shape[1], sampling_ratio, aligned, 1, 3)
        align_taps(y1, bin_h, gh, height, y_low, y_high, y_wlow, y_whigh, y_valid, row)
        align_taps(x1, bin_w, gw, width, x_low, x_high, x_wlow, x_whigh, x_valid, row)
        count[row] = gh * gw
        cells += _copied(y_low[row], y_high[row], y_valid[row]) * _copied(x_low[row], x_high[row], x_valid[row])
    return cells


@nb.njit(cache=True, nogil=True)
def _copied(low, high, valid):
    """The length of :func:`_local_axis`'s list of cells: the span of the valid taps, at most two per sample."""
    first, last = np.int64(1) << 62, np.int64(-1)
    for p in range(low.shape[0]):
        for g in range(low.shape[1]):
            if valid[p, g]:
                first = min(first, np.int64(low[p, g]))
                last = max(last, np.int64(high[p, g]))
    return 0 if last < 0 else min(last - first + 1, 2 * low.size)


@nb.njit(cache=True, nogil=True)
def _tap_span(low, high, valid):
    """The lowest and highest cell one box's valid taps touch along an axis: low, high [P, G] (int32), valid [P, G]
    (bool) -> (first, last), int64; ``(2^62, -1)`` when no tap is valid."""
    first, last = np.int64(1) << 62, np.int64(-1)
    for p in range(low.shape[0]):
        for g in range(low.shape[1]):
            if valid[p, g]:
                first = min(first, np.int64(low[p, g]))
                last = max(last, np.int64(high[p, g]))
    return first, last


@nb.njit(cache=True, nogil=True)
def _local_axis(low, high, valid):
    """The cells one box reads along an axis and each sample's taps as positions in that list.

    low, high [P, G] (int32), valid [P, G] (bool) -> (cells [L], local low [P, G], local high [P, G])."""
    p_count, g_count = low.shape
    first, last = _tap_span(low, high, valid)
    local_low = np.zeros((p_count, g_count), np.int64)
    local_high = np.zeros((p_count, g_count), np.int64)
    if last < 0:
        return np.zeros(0, np.int64), local_low, local_high
    span = last - first + 1
    listed = 2 * p_count * g_count
    if span <= listed:  # the contiguous span
        cells = np.arange(first, last + 1)
        for p in range(p_count):
            for g in range(g_count):
                if valid[p, g]:
                    local_low[p, g] = low[p, g] - first
                    local_high[p, g] = high[p, g] - first
        return cells, local_low, local_high
    cells = np.zeros(listed, np.int64)  # the two taps of each sample, one after the other
    for p in range(p_count):
        for g in range(g_count):
            s = 2 * (p * g_count + g)
            if valid[p, g]:
                cells[s], cells[s + 1] = low[p, g], high[p, g]
            local_low[p, g], local_high[p, g] = s, s + 1
    return cells, local_low, local_high


@nb.njit(cache=True, nogil=True)
def _copy_cells(image, c0, cb, rows, cols, scratch):
    """``scratch[i, j, c] = image[c0 + c, rows[i], cols[j]]`` for ``c < cb``: image [C, H, W], scratch [rows, cols,
    >= cb]. 8 channels' rows at a time, so each scratch cell gets 8 consecutive values per pass (measured: 1.3x
    faster than a channel at a time)."""
    nr, nc = rows.shape[0], cols.shape[0]
    whole = cb - cb % 8
    for i in range(nr):
        r, dst = rows[i], scratch[i]
        for c in range(c0, c0 + whole, 8):
            p0, p1, p2, p3 = image[c, r], image[c + 1, r], image[c + 2, r], image[c + 3, r]
            p4, p5, p6, p7 = image[c + 4, r], image[c + 5, r], image[c + 6, r], image[c + 7, r]
            d = c - c0
            for j in range(nc):
                q, cell = cols[j], dst[j]
                cell[d], cell[d + 1], cell[d + 2], cell[d + 3] = p0[q], p1[q], p2[q], p3[q]
                cell[d + 4], cell[d + 5], cell[d + 6], cell[d + 7] = p4[q], p5[q], p6[q], p7[q]
        for c in range(c0 + whole, c0 + cb):
            row = image[c, r]
            for j in range(nc):
                dst[j, c - c0] = row[cols[j]]


@nb.njit(cache=True, nogil=True)
def _store_cells(scratch, image, c0, cb, rows, cols):
    """The reverse of :func:`_copy_cells`: ``image[c0 + c, rows[i], cols[j]] = scratch[i, j, c]``."""
    nr, nc = rows.shape[0], cols.shape[0]
    whole = cb - cb % 8
    for i in range(nr):
        r, src = rows[i], scratch[i]
        for c in range(c0, c0 + whole, 8):
            p0, p1, p2, p3 = image[c, r], image[c + 1, r], image[c + 2, r], image[c + 3, r]
            p4, p5, p6, p7 = image[c + 4, r], image[c + 5, r], image[c + 6, r], image[c + 7, r]
            d = c - c0
            for j in range(nc):
                q, cell = cols[j], src[j]
                p0[q], p1[q], p2[q], p3[q] = cell[d], cell[d + 1], cell[d + 2], cell[d + 3]
                p4[q], p5[q], p6[q], p7[q] = cell[d + 4], cell[d + 5], cell[d + 6], cell[d + 7]
        for c in range(c0 + whole, c0 + cb):
            row = image[c, r]
            for j in range(nc):
                row[cols[j]] = src[j, c - c0]


@nb.njit(cache=True, nogil=True)
def roi_align_forward(begin, end, feat, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low, x_high, x_wlow,
                      x_whigh, x_valid, count, out, block):
    """feat [N, C, H, W] (float, or bfloat16 as its bits, widened exactly as read); batch [K]; y tables [K, PH, GY];
    x tables [K, PW, GX]; count [K] (``max(gh * gw, 1)`` in the compute dtype); out [K, C, PH, PW] (compute dtype),
    written."""
    channels = feat.shape[1]
    ph_count, gy_count = y_low.shape[1], y_low.shape[2]
    pw_count, gx_count = x_low.shape[1], x_low.shape[2]
    for k in range(begin, end):
        n = batch[k]
        rows, ry0, ry1 = _local_axis(y_low[k], y_high[k], y_valid[k])
        cols, rx0, rx1 = _local_axis(x_low[k], x_high[k], x_valid[k])
        nr, nc = rows.shape[0], cols.shape[0]
        scratch = np.empty((nr, nc, block), feat.dtype)
        acc = np.empty(block, out.dtype)
        _prefetch_cells(feat, n, 0, block, rows, cols)
        for c0 in range(0, channels, block):
            cb = min(block, channels - c0)
            _prefetch_cells(feat, n, c0 + block, c0 + 2 * block, rows, cols)  # on their way while this block runs
            _copy_cells(feat[n], c0, cb, rows, cols, scratch)
            for ph in range(ph_count):
                for pw in range(pw_count):
                    acc[:] = 0
                    for iy in range(gy_count):
                        if not y_valid[k, ph, iy]:
                            continue
                        a0, a1 = ry0[ph, iy], ry1[ph, iy]
                        hy, ly = y_wlow[k, ph, iy], y_whigh[k, ph, iy]
                        for ix in range(gx_count):
                            if not x_valid[k, pw, ix]:
                                continue
                            b0, b1 = rx0[pw, ix], rx1[pw, ix]
                            hx, lx = x_wlow[k, pw, ix], x_whigh[k, pw, ix]
                            w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
                            s00, s01 = scratch[a0, b0], scratch[a0, b1]
                            s10, s11 = scratch[a1, b0], scratch[a1, b1]
                            for cc in range(cb):
                                acc[cc] += (w1 * widen(s00[cc]) + w2 * widen(s01[cc]) + w3 * widen(s10[cc])
                                            + w4 * widen(s11[cc]))
                    for cc in range(cb):
                        out[k, c0 + cc, ph, pw] = acc[cc] / count[k]


@nb.njit(cache=True, nogil=True)
def roi_align_forward_cl(begin, end, feat, c0, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low, x_high, x_wlow,
                         x_whigh, x_valid, count, out):
    """As :func:`roi_align_forward`, reading a channels-last block ``feat`` [N, H, W, B] (the map's channels
    ``c0 .. c0 + B``) in place of per-box copies: for boxes that together read more cells than the map has."""
    cb = feat.shape[3]
    ph_count, gy_count = y_low.shape[1], y_low.shape[2]
    pw_count, gx_count = x_low.shape[1], x_low.shape[2]
    for k in range(begin, end):
        image = feat[batch[k]]
        acc = np.empty(cb, out.dtype)
        for ph in range(ph_count):
            for pw in range(pw_count):
                acc[:] = 0
                for iy in range(gy_count):
                    if not y_valid[k, ph, iy]:
                        continue
                    a0, a1 = y_low[k, ph, iy], y_high[k, ph, iy]
                    hy, ly = y_wlow[k, ph, iy], y_whigh[k, ph, iy]
                    for ix in range(gx_count):
                        if not x_valid[k, pw, ix]:
                            continue
                        b0, b1 = x_low[k, pw, ix], x_high[k, pw, ix]
                        hx, lx = x_wlow[k, pw, ix], x_whigh[k, pw, ix]
                        w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
                        s00, s01 = image[a0, b0], image[a0, b1]
                        s10, s11 = image[a1, b0], image[a1, b1]
                        for cc in range(cb):
                            acc[cc] += (w1 * widen(s00[cc]) + w2 * widen(s01[cc]) + w3 * widen(s10[cc])
                                        + w4 * widen(s11[cc]))
                for cc in range(cb):
                    out[k, c0 + cc, ph, pw] = acc[cc] / count[k]


@nb.njit(cache=True, nogil=True)
def _tapped_axis(low, high, valid):
    """The distinct cells one box's taps touch along an axis, ascending, and each sample's taps as positions in
    that list (as :func:`_local_axis`, but no cell twice: the backward adds into each cell of its copy).

    low, high [P, G] (int32), valid [P, G] (bool) -> (cells [L], local low [P, G], local high [P, G])."""
    p_count, g_count = low.shape
    first, last = _tap_span(low, high, valid)
    local_low = np.zeros((p_count, g_count), np.int64)
    local_high = np.zeros((p_count, g_count), np.int64)
    if last < 0:
        return np.zeros(0, np.int64), local_low, local_high
    position = np.zeros(last - first + 1, np.int64)  # 1 where a tap lands, then each cell's place in the list
    for p in range(p_count):
        for g in range(g_count):
            if valid[p, g]:
                position[low[p, g] - first] = 1
                position[high[p, g] - first] = 1
    cells = np.empty(position.sum(), np.int64)
    listed = 0
    for s in range(position.shape[0]):
        if position[s]:
            cells[listed] = first + s
            position[s] = listed
            listed += 1
    for p in range(p_count):
        for g in range(g_count):
            if valid[p, g]:
                local_low[p, g] = position[low[p, g] - first]
                local_high[p, g] = position[high[p, g] - first]
    return cells, local_low, local_high


@nb.njit(cache=True, nogil=True)
def roi_align_backward(begin, end, grad, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low, x_high, x_wlow,
                       x_whigh, x_valid, count, out, block):
    """grad [K, C, PH, PW]; tables as the forward's (count: ``gh * gw``); out [N, C, H, W] (zeros), added into;
    channels ``begin .. end``, ``block`` at a time (see :func:`_backward_block`)."""
    grads = np.empty((y_low.shape[1], x_low.shape[1], block), grad.dtype)
    for c0 in range(begin, end, block):
        _backward_block(c0, min(block, end - c0), grad, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low,
                        x_high, x_wlow, x_whigh, x_valid, count, out, c0, grads)


@nb.njit(cache=True, nogil=True)
def roi_align_backward_bits(begin, end, grad, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low, x_high, x_wlow,
                            x_whigh, x_valid, count, out, block):
    """As :func:`roi_align_backward` into a bfloat16 map given as its bits, out [N, C, H, W] (uint16, every value
    written): a block of channels is added up in this thread's float32 planes [N, block, H, W] (zeros first), then
    rounded once into ``out``: torchvision's float32 gradient rounded, without a float32 map of all channels."""
    n_count, _, height, width = out.shape
    planes = np.empty((n_count, block, height, width), grad.dtype)
    grads = np.empty((y_low.shape[1], x_low.shape[1], block), grad.dtype)
    for c0 in range(begin, end, block):
        cb = min(block, end - c0)
        planes[:, :cb] = 0
        _backward_block(c0, cb, grad, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low, x_high, x_wlow,
                        x_whigh, x_valid, count, planes, 0, grads)
        for n in range(n_count):
            for cc in range(cb):
                src, dst = planes[n, cc], out[n, c0 + cc]
                for h in range(height):
                    for w in range(width):
                        dst[h, w] = narrow(src[h, w], out)


@nb.njit(cache=True, nogil=True)
def _backward_block(c0, cb, grad, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low, x_high, x_wlow, x_whigh,
                    x_valid, count, planes, p0, grads):
    """Every box's gradient of channels ``c0 .. c0 + cb`` added into ``planes`` [N, *, H, W] at channels ``p0 ..``;
    grads: scratch [PH, PW, >= cb].

    Per box, the cells its taps touch are copied from ``planes`` into a channels-last scratch [rows, cols, cb],
    every tap's ``g * w / count`` is added there for the block's channels at once (one vector per tap: the
    divisions, most of the time, run 8-16 to an instruction), and the cells are written back before the next box:
    each cell of each channel receives the same additions in the same order as torchvision's loop, so the same
    bits."""
    k_count = grad.shape[0]
    ph_count, gy_count = y_low.shape[1], y_low.shape[2]
    pw_count, gx_count = x_low.shape[1], x_low.shape[2]
    for k in range(k_count):
        n = batch[k]
        rows, ry0, ry1 = _tapped_axis(y_low[k], y_high[k], y_valid[k])
        cols, rx0, rx1 = _tapped_axis(x_low[k], x_high[k], x_valid[k])
        nr, nc = rows.shape[0], cols.shape[0]
        if nr == 0 or nc == 0:
            continue
        scratch = np.empty((nr, nc, cb), planes.dtype)
        _copy_cells(planes[n], p0, cb, rows, cols, scratch)
        for cc in range(cb):
            g = grad[k, c0 + cc]
            for ph in range(ph_count):
                for pw in range(pw_count):
                    grads[ph, pw, cc] = g[ph, pw]
        total = count[k]
        for ph in range(ph_count):
            for pw in range(pw_count):
                g = grads[ph, pw]
                for iy in range(gy_count):
                    if not y_valid[k, ph, iy]:
                        continue
                    a0, a1 = ry0[ph, iy], ry1[ph, iy]
                    hy, ly = y_wlow[k, ph, iy], y_whigh[k, ph, iy]
                    for ix in range(gx_count):
                        if not x_valid[k, pw, ix]:
                            continue
                        b0, b1 = rx0[pw, ix], rx1[pw, ix]
                        hx, lx = x_wlow[k, pw, ix], x_whigh[k, pw, ix]
                        w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
                        s = scratch[a0, b0]  # one loop per tap: two taps on one cell add in turn
                        for cc in range(cb):
                            s[cc] += g[cc] * w1 / total
                        s = scratch[a0, b1]
                        for cc in range(cb):
                            s[cc] += g[cc] * w2 / total
                        s = scratch[a1, b0]
                        for cc in range(cb):
                            s[cc] += g[cc] * w3 / total
                        s = scratch[a1, b1]
                        for cc in range(cb):
                            s[cc] += g[cc] * w4 / total
        _store_cells(scratch, planes[n], p0, cb, rows, cols)


@nb.njit(cache=True, nogil=True)
def roi_align_forward_blocks(begin, end, feat, block, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low, x_high,
                             x_wlow, x_whigh, x_valid, count, out):
    """Channel blocks ``begin .. end`` (of ``block`` channels) of RoIAlign over every box: each block of the map is
    made channels-last here (one block per thread at a time) and read by :func:`roi_align_forward_cl`."""
    channels = feat.shape[1]
    for b in range(begin, end):
        c0 = b * block
        cl = transposed_block(feat, c0, min(block, channels - c0))
        roi_align_forward_cl(0, batch.shape[0], cl, c0, batch, y_low, y_high, y_wlow, y_whigh, y_valid, x_low,
                             x_high, x_wlow, x_whigh, x_valid, count, out)
