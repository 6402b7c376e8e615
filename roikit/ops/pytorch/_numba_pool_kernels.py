"""numba kernels of the CPU fast path: RoIPool, forward and backward (see :mod:`._numba_kernels` for how the
kernels run: serial, GIL released, ranges of boxes or channels on :mod:`~roikit.ops.pytorch.jit`'s threads).

**Forward** (a range of boxes per call): a box's cells are copied, a block of channels at a time, into a
channels-last scratch [rows, cols, block] (or a channels-last block of the whole map is read in place), and one bin
loop takes the first cell (row-major) that beats ``-FLT_MAX``, strictly, for the whole block at once: NaN never
wins, as in torchvision. Without argmax (inference) the loop only takes maxima.

**Backward** (a range of channels per call): each bin's gradient is added to its argmax cell, boxes and bins in
torchvision's order, into a thread's own planes of a few channels (a box's rows of those channels read together),
then written out whole: torchvision's bits.

**Tables** (:func:`roi_pool_tables`): the bins' cell edges, the plain path's ``geometry.box_cells`` and
``clip_edges`` operation for operation in the boxes' dtype (torch's rounding ops on a few hundred values run an
OpenMP parallel region each, which on busy cores cost more than the whole kernel; see :mod:`.jit`).
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ..geometry import MAX_CELLS
from ._numba_common import narrow, transposed_block, widen

LOWEST32 = np.float32(np.finfo(np.float32).min)  # torchvision's roi_pool starts every bin at -FLT_MAX


@nb.njit(cache=True, nogil=True)
def _cell(value, t):
    """A box corner in cells, clamped to +-MAX_CELLS, in the boxes' type ``t`` (as ``geometry.box_cells``)."""
    return t(-MAX_CELLS) if value < t(-MAX_CELLS) else t(MAX_CELLS) if value > t(MAX_CELLS) else value


@nb.njit(cache=True, nogil=True)
def _round_half_away(x, t):
    """``geometry.round_half_away`` on one value: C's ``round()``, in the boxes' type."""
    whole = np.trunc(x)
    return whole + np.sign(x) if abs(x - whole) >= t(0.5) else whole


@nb.njit(cache=True, nogil=True)
def _axis_edges(lo, hi, scale, t, torchvision, length, starts, ends):
    """One axis of one box, as ``geometry.box_cells`` then ``clip_edges``: bin ``p`` covers cells ``starts[p] ..
    ends[p]`` (int64, clipped to ``0 .. length``). ``lo``, ``hi``, ``scale``: the box's edges in pixels and the
    scale, in the boxes' type ``t``. Returns the span of the bins (``max(ends) - min(starts)``, at least 0)."""
    pooled = starts.shape[0]
    bin_size, step = t(0.0), np.int64(1)
    if torchvision:
        start = np.int64(_round_half_away(_cell(lo * scale, t), t))
        extent = max(np.int64(_round_half_away(_cell(hi * scale, t), t)) - start + 1, 1)
        bin_size = t(extent) / t(pooled)
    else:  # "integer"
        start = np.int64(np.floor(_cell(lo * scale, t)))
        cells = np.int64(np.floor(_cell((hi - lo) * scale, t)))
        step = max(cells // pooled, 1)  # floor division, as torch.div(..., rounding_mode="floor")
    first, last = length, 0
    for p in range(pooled):
        if torchvision:
            b0 = np.int64(np.floor(t(p) * bin_size))
            b1 = np.int64(np.ceil(t(p + 1) * bin_size))
        else:
            b0 = p * step
            b1 = b0 + step
        starts[p] = min(max(b0 + start, 0), length)
        ends[p] = min(max(b1 + start, 0), length)
        first, last = min(first, starts[p]), max(last, ends[p])
    return max(last - first, 0)


@nb.njit(cache=True, nogil=True)
def roi_pool_tables(rois, first, scale, torchvision, height, width, batch, h_start, h_end, w_start, w_end):
    """RoIPool's tables of boxes ``first ..`` (as many as ``batch`` holds), as the plain path's
    ``geometry.box_cells`` and ``clip_edges`` compute them (the same operations in the boxes' type ``rois.dtype``,
    float32 or float64; ``scale`` in that type): batch [B] and the bins' clipped cell edges [B, PH] / [B, PW]
    (int64). ``torchvision``: that rounding rule, else "integer". Returns the cells the per-box forward copies
    (each box's rows x columns, summed)."""
    t = rois.dtype.type
    cells = 0
    for row in range(batch.shape[0]):
        k = first + row
        batch[row] = np.int64(rois[k, 0])
        rows = _axis_edges(rois[k, 2], rois[k, 4], scale, t, torchvision, height, h_start[row], h_end[row])
        cols = _axis_edges(rois[k, 1], rois[k, 3], scale, t, torchvision, width, w_start[row], w_end[row])
        cells += rows * cols
    return cells


@nb.njit(cache=True, nogil=True)
def _copy_box(image, c0, cb, r0, q0, scratch):
    """``scratch[i, j, c] = image[c0 + c, r0 + i, q0 + j]`` for ``c < cb``: image [C, H, W], scratch [rows, cols,
    >= cb], in the map's dtype. 8 channels' rows at a time (8 consecutive values of a scratch cell per pass)."""
    nr, nc = scratch.shape[0], scratch.shape[1]
    whole = cb - cb % 8
    for i in range(nr):
        r, dst = r0 + i, scratch[i]
        for c in range(c0, c0 + whole, 8):
            p0, p1, p2, p3 = image[c, r], image[c + 1, r], image[c + 2, r], image[c + 3, r]
            p4, p5, p6, p7 = image[c + 4, r], image[c + 5, r], image[c + 6, r], image[c + 7, r]
            d = c - c0
            for j in range(nc):
                q, cell = q0 + j, dst[j]
                cell[d], cell[d + 1], cell[d + 2], cell[d + 3] = p0[q], p1[q], p2[q], p3[q]
                cell[d + 4], cell[d + 5], cell[d + 6], cell[d + 7] = p4[q], p5[q], p6[q], p7[q]
        for c in range(c0 + whole, c0 + cb):
            row = image[c, r]
            for j in range(nc):
                dst[j, c - c0] = row[q0 + j]


@nb.njit(cache=True, nogil=True)
def _max_bins(src, r0, q0, cb, h_start, h_end, w_start, w_end, width, best, where):
    """RoIPool's bins of one box for ``cb`` channels at once. ``src`` [rows, cols, >= cb]: channels-last cells,
    ``src[i, j]`` the map's cell ``(r0 + i, q0 + j)`` (a box's scratch, or a whole channels-last image); edges
    [PH] / [PW]. Writes ``best`` [PH * PW, >= cb] (compute dtype) and, unless it has no rows (no argmax wanted),
    ``where`` (int32: the cell ``h * W + w``, -1 when nothing won or the bin is empty). Empty bins give 0."""
    pw_count = w_start.shape[0]
    with_arg = where.shape[0] > 0
    for ph in range(h_start.shape[0]):
        hs, he = h_start[ph], h_end[ph]
        for pw in range(pw_count):
            ws, we = w_start[pw], w_end[pw]
            b = ph * pw_count + pw
            value = best[b]
            start = 0.0 if he <= hs or we <= ws else LOWEST32  # an empty bin reads nothing: 0
            for cc in range(cb):
                value[cc] = start
            if with_arg:
                cell = where[b]
                for cc in range(cb):
                    cell[cc] = -1
                for h in range(hs, he):
                    for w in range(ws, we):
                        here = np.int32(h * width + w)
                        v = src[h - r0, w - q0]
                        for cc in range(cb):
                            x = widen(v[cc])
                            wins = x > value[cc]
                            value[cc] = x if wins else value[cc]
                            cell[cc] = here if wins else cell[cc]
            else:
                for h in range(hs, he):
                    for w in range(ws, we):
                        v = src[h - r0, w - q0]
                        for cc in range(cb):
                            x = widen(v[cc])
                            value[cc] = x if x > value[cc] else value[cc]


@nb.njit(cache=True, nogil=True)
def _write_bins(best, where, cb, k, c0, out, argmax):
    """``out[k, c0 + c, b] = best[b, c]`` (in out's type) for ``c < cb``, and argmax from ``where`` unless that has
    no rows: a box's bins leave the kernel one channel's contiguous row at a time."""
    nbins = best.shape[0]
    for cc in range(cb):
        o = out[k, c0 + cc]
        for b in range(nbins):
            o[b] = narrow(best[b, cc], out)
    if where.shape[0] > 0:
        for cc in range(cb):
            a = argmax[k, c0 + cc]
            for b in range(nbins):
                a[b] = where[b, cc]


@nb.njit(cache=True, nogil=True)
def roi_pool_forward(begin, end, feat, batch, h_start, h_end, w_start, w_end, out, argmax, block, compute):
    """feat [N, C, H, W] (float, or bfloat16 bits as uint16); batch [K]; bin edges [K, PH] / [K, PW] (int64,
    clipped to the map); out [K, C, PH * PW] (the map's type) and argmax (int32, or an empty [0, 0, 0] array: not
    wanted), written; ``compute``: the dtype bins are compared in (float32 for bfloat16, exact)."""
    channels, width = feat.shape[1], feat.shape[3]
    nbins = h_start.shape[1] * w_start.shape[1]
    best = np.empty((nbins, block), compute)
    where = np.empty((nbins if argmax.shape[0] > 0 else 0, block), np.int32)
    for k in range(begin, end):
        n = batch[k]
        r0, r1 = h_start[k].min(), h_end[k].max()
        q0, q1 = w_start[k].min(), w_end[k].max()
        scratch = np.empty((max(r1 - r0, 0), max(q1 - q0, 0), block), feat.dtype)
        for c0 in range(0, channels, block):
            cb = min(block, channels - c0)
            _copy_box(feat[n], c0, cb, r0, q0, scratch)
            _max_bins(scratch, r0, q0, cb, h_start[k], h_end[k], w_start[k], w_end[k], width, best, where)
            _write_bins(best, where, cb, k, c0, out, argmax)


@nb.njit(cache=True, nogil=True)
def roi_pool_forward_cl(begin, end, feat, c0, batch, h_start, h_end, w_start, w_end, out, argmax, compute):
    """As :func:`roi_pool_forward`, reading a channels-last block ``feat`` [N, H, W, B] (channels ``c0 .. c0 + B``)
    through the same bin loop."""
    width, cb = feat.shape[2], feat.shape[3]
    nbins = h_start.shape[1] * w_start.shape[1]
    best = np.empty((nbins, cb), compute)
    where = np.empty((nbins if argmax.shape[0] > 0 else 0, cb), np.int32)
    for k in range(begin, end):
        _max_bins(feat[batch[k]], 0, 0, cb, h_start[k], h_end[k], w_start[k], w_end[k], width, best, where)
        _write_bins(best, where, cb, k, c0, out, argmax)


@nb.njit(cache=True, nogil=True)
def roi_pool_backward(begin, end, grad, batch, argmax, out, compute, block):
    """grad (float, or bfloat16 bits as uint16) and argmax [K, C, PH * PW]; out [N, C, H * W] (the gradient's
    type; any content: channels ``begin .. end`` are written whole). Each bin's gradient is added to its argmax
    cell in ``compute``, boxes and bins in torchvision's order, into ``block`` channels' planes (one per image, a
    thread's own) at a time, which are then written out (rounded once for bfloat16): each page of ``out`` is
    touched by the thread that owns it, and no zero-filled map is made first. A box's ``block`` channels are
    read together (consecutive in ``grad`` and ``argmax``); each channel's cells still take their additions in
    torchvision's order."""
    k_count, _, nbins = grad.shape
    n_count, _, cells = out.shape
    acc = np.empty((max(min(block, end - begin), 0), n_count, cells), compute)
    for c0 in range(begin, end, block):
        cb = min(block, end - c0)
        acc[:cb] = 0
        for k in range(k_count):
            planes, g, a = acc[:, batch[k]], grad[k], argmax[k]
            for cc in range(cb):
                plane, gc, ac = planes[cc], g[c0 + cc], a[c0 + cc]
                for b in range(nbins):
                    i = ac[b]
                    if i >= 0:
                        plane[i] += widen(gc[b])
        for cc in range(cb):
            for n in range(n_count):
                o, p = out[n, c0 + cc], acc[cc, n]
                for i in range(cells):
                    o[i] = narrow(p[i], out)


@nb.njit(cache=True, nogil=True)
def roi_pool_forward_blocks(begin, end, feat, block, batch, h_start, h_end, w_start, w_end, out, argmax, compute):
    """Channel blocks ``begin .. end`` of RoIPool over every box, as :func:`roi_align_forward_blocks` (bfloat16
    blocks stay bfloat16 bits)."""
    channels = feat.shape[1]
    for b in range(begin, end):
        c0 = b * block
        cl = transposed_block(feat, c0, min(block, channels - c0))
        roi_pool_forward_cl(0, batch.shape[0], cl, c0, batch, h_start, h_end, w_start, w_end, out, argmax, compute)
