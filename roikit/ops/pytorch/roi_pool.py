"""Quantized RoI max pooling in plain PyTorch, with the rounding rule as a setting.

Both rules give each output bin a rectangle of whole cells, ``[hstart, hend) x [wstart, wend)``, clipped to the
map; the bin's value is the largest feature in it (the first in row-major order on ties), 0 for an empty bin.

``"torchvision"`` (Fast R-CNN / Caffe): corners rounded to the nearest cell (half away from zero), size
``end - start + 1`` (at least 1), float bin size ``b = size / P``; bin p spans ``[floor(p b), ceil((p + 1) b))``
from the start: neighbouring bins may share a cell, and every cell of the rounded box is read.

``"integer"`` (the double rounding as usually taught): start ``floor(x1 s)``, size ``floor((x2 - x1) s)``,
bin ``max(floor(size / P), 1)`` cells; bin p spans ``[start + p b, start + (p + 1) b)``: ``size - P b`` cells at the
far end are never read.

The max over a rectangle is taken in two passes: over the columns of each bin for every row the box covers,
then over the rows of each bin.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import box_cells, clip_edges
from . import jit
from ._crops import CHUNK_BUDGET, box_slices, channels_last_rows, chunks, crop_index


def _adaptive_edges(extent: Tensor, pooled: int):
    """Adaptive pooling's bins of ``extent`` cells, in exact integer arithmetic: [K, P] each."""
    p = torch.arange(pooled, device=extent.device)[None, :]
    return (p * extent[:, None]) // pooled, -((-(p + 1) * extent[:, None]) // pooled)


def _nan_never_wins(values: Tensor) -> Tensor:
    """NaN -> -inf in place, every other value (+-inf included) kept: ``nan_to_num`` would also turn +inf into the
    largest finite number."""
    return values.masked_fill_(torch.isnan(values), float("-inf"))


def _running_max(cell, count: int, has_nan: bool):
    """Max over ``count`` cells of every bin, taken in order, keeping the first on ties (C's ``if (v > best)``).

    ``cell(j)`` gives the j-th cell of every bin; a bin with fewer cells repeats its last one, which can never
    win again. Returns the max and the j it came from (-1 when no cell won). NaN never wins, as in torchvision.
    """
    best = _nan_never_wins(cell(0)) if has_nan else cell(0)
    which = torch.zeros(best.shape, dtype=torch.int32, device=best.device)
    for j in range(1, count):
        v = _nan_never_wins(cell(j)) if has_nan else cell(j)
        which = torch.where(v > best, j, which)
        torch.maximum(best, v, out=best)
    return best, which


def roi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                     rounding: str) -> tuple[Tensor, Tensor]:
    """Returns ``output`` [K, C, PH, PW] and ``argmax`` [K, C, PH, PW] (int32, as torchvision's): the cell
    ``h * W + w`` each bin took its value from, -1 for an empty bin (torchvision's convention).

    Both rules split a box of ``L`` whole cells into bins the way adaptive max pooling splits an ``L``-cell map
    (``floor(p L / P)`` to ``ceil((p + 1) L / P)``), so boxes are cut out (cells off the map as -inf) and pooled
    with ``adaptive_max_pool2d``, a batch of boxes of one size at a time. torchvision computes those edges in
    float, which on rare sizes (57 cells into 7 bins) lands one cell past the exact edge: such boxes take the
    general two-pass path, which follows the float edges.
    """
    n, c, height, width = input.shape
    k = rois.shape[0]
    pooled = (pooled_height, pooled_width)
    if k == 0 or input.numel() == 0:  # no box, or a map with no cell: every bin is empty
        return (input.new_zeros((k, c, pooled_height, pooled_width)),
                torch.full((k, c, pooled_height, pooled_width), -1, dtype=torch.int32, device=input.device))
    fast = jit.roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding)
    if fast is not None:  # the numba kernels (roikit.ops.pytorch.jit), where they take the call
        return fast
    out = input.new_empty((k, c, pooled_height, pooled_width))
    argmax = torch.empty((k, c, pooled_height, pooled_width), dtype=torch.int32, device=input.device)
    feat = channels_last_rows(input, input.dtype)  # [N * H * W, C]
    lowest = torch.finfo(torch.float32).min  # torchvision starts every bin at -FLT_MAX
    has_low = not bool((input > lowest).all())  # a value that cannot beat -FLT_MAX (-FLT_MAX, -inf, NaN)
    has_nan = has_low and bool(torch.isnan(input).any())
    for sl in box_slices(k):  # every per-box intermediate is bounded by the slice
        _forward_slice(feat, input.shape, rois[sl], spatial_scale, pooled, rounding, has_low, has_nan, out[sl],
                       argmax[sl])
    return out, argmax


def roi_pool_values(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                    rounding: str) -> Tensor:
    """:func:`roi_pool_forward`'s output alone, for calls that need no gradient: the numba kernels then take only
    the maxima (no argmax written: half the memory traffic); the plain path computes both and drops argmax."""
    if rois.shape[0] and input.numel():
        fast = jit.roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding,
                                    with_argmax=False)
        if fast is not None:
            return fast[0]
    return roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width, rounding)[0]


def _forward_slice(feat: Tensor, shape, rois: Tensor, spatial_scale: float, pooled: tuple[int, int], rounding: str,
                   has_low: bool, has_nan: bool, out: Tensor, argmax: Tensor) -> None:
    n, c, height, width = shape
    axes = box_cells(rois, spatial_scale, pooled, rounding)
    # the one-size path cuts out whole boxes: only for boxes no larger than the map (a larger box is read through
    # its bins clipped to the map, below), so no crop is larger than the map whatever the box
    exact = (axes[0][1] <= height) & (axes[1][1] <= width)
    for (_, extent, b0, b1), p in zip(axes, pooled):
        a0, a1 = _adaptive_edges(extent.clamp(max=max(height, width)), p)
        exact &= ((a0 == b0) & (a1 == b1)).all(dim=1)
    (y0, len_y, _, _), (x0, len_x, _, _) = axes
    batch = rois[:, 0].long()
    (hs, he), (ws, we) = clip_edges(axes, (height, width))
    empty = (hs >= he)[:, None, :, None] | (ws >= we)[:, None, None, :]  # [K, 1, PH, PW] wholly off the map

    fast = torch.nonzero(exact).squeeze(1)
    size_key = len_y[fast] * (width + 1) + len_x[fast]
    order = torch.argsort(size_key, stable=True)
    fast, size_key = fast[order], size_key[order]
    _, counts = torch.unique_consecutive(size_key, return_counts=True)
    for same in torch.split(fast, counts.tolist()):
        ly, lx = int(len_y[same[0]]), int(len_x[same[0]])
        for idx in torch.split(same, max(CHUNK_BUDGET // max(ly * lx * c, 1), 1)):
            _pool_one_size(feat, (n, c, height, width), idx, batch, y0, x0, ly, lx, pooled, empty, has_low, has_nan,
                           out, argmax)

    slow = torch.nonzero(~exact).squeeze(1)
    if len(slow):
        o, a = _two_pass(feat, (n, c, height, width), batch[slow], (hs[slow], he[slow]), (ws[slow], we[slow]),
                         pooled, has_nan)
        out.index_copy_(0, slow, o.permute(0, 3, 1, 2).to(out.dtype))
        argmax.index_copy_(0, slow, a.permute(0, 3, 1, 2).to(torch.int32))


def _pool_one_size(feat, shape, idx, batch, y0, x0, ly: int, lx: int, pooled, empty, has_low: bool, has_nan: bool,
                   out: Tensor, argmax: Tensor) -> None:
    """Boxes ``idx`` of one size ``ly x lx`` cells (no larger than the map) through ``adaptive_max_pool2d``."""
    n, c, height, width = shape
    b = len(idx)
    lowest = torch.finfo(torch.float32).min
    rows = y0[idx, None] + torch.arange(ly, device=feat.device)  # [B, Ly] may leave the map
    cols = x0[idx, None] + torch.arange(lx, device=feat.device)
    row_in, col_in = (rows >= 0) & (rows < height), (cols >= 0) & (cols < width)
    rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    crop = feat.index_select(0, crop_index(batch[idx], rows, cols, height, width).reshape(-1))
    crop = crop.view(b, ly, lx, c)  # [B, Ly, Lx, C]
    inside = bool(row_in.all() and col_in.all())
    if not inside:
        crop.masked_fill_(~(row_in[:, :, None] & col_in[:, None, :])[..., None], float("-inf"))
    if has_nan:
        crop = _nan_never_wins(crop)  # as in torchvision
    value, where = torch.nn.functional.adaptive_max_pool2d(crop.permute(0, 3, 1, 2), pooled, return_indices=True)
    # where = iy * Lx + ix in the crop -> the map cell h * W + w, read from a per-box table of the crop's cells
    cells = (rows[:, :, None] * width + cols[:, None, :]).to(torch.int32).view(b, 1, ly * lx)
    cell = torch.gather(cells.expand(b, c, ly * lx), 2, where.view(b, c, -1)).view(value.shape)
    if inside and not has_low:  # every bin has cells and a value above -FLT_MAX: nothing to fix up
        out.index_copy_(0, idx, value)
        argmax.index_copy_(0, idx, cell)
        return
    found = value > lowest  # something beat -FLT_MAX
    value = torch.where(found, value, lowest).masked_fill_(empty[idx], 0.0)  # off the map: 0
    out.index_copy_(0, idx, value.to(out.dtype))
    argmax.index_copy_(0, idx, cell.masked_fill_(~found | empty[idx], -1))


def _two_pass(feat: Tensor, shape, batch: Tensor, h_edges, w_edges, pooled, has_nan: bool):
    """The max over every bin's rectangle in two passes (columns of each row, then rows), for any edges."""
    n, c, height, width = shape
    (hs, he), (ws, we) = h_edges, w_edges
    pooled_height, pooled_width = pooled
    k = batch.shape[0]
    out = feat.new_zeros((k, pooled_height, pooled_width, c))
    argmax = torch.full((k, pooled_height, pooled_width, c), -1, dtype=torch.int64, device=feat.device)
    row0 = hs.amin(dim=1)  # [K] first row any bin reads
    len_y = (he.amax(dim=1) - row0).clamp(min=1)
    bin_h = (he - hs).clamp(min=0).amax(dim=1)  # [K] tallest / widest bin per box
    bin_w = (we - ws).clamp(min=0).amax(dim=1)
    lowest = torch.finfo(torch.float32).min
    for idx, ly, _ in chunks(len_y, bin_w * pooled_width, c):
        b = idx.shape[0]
        rows = (row0[idx, None] + torch.arange(ly, device=feat.device)).clamp(max=height - 1)  # [B, Ly]
        w0, w1 = ws[idx], we[idx]  # [B, PW]
        h0, h1 = hs[idx] - row0[idx, None], he[idx] - row0[idx, None]  # [B, PH], rows relative to row0

        def column(j):  # pass 1: the j-th column of every bin, on every row the box covers: [B, Ly, PW, C]
            flat = crop_index(batch[idx], rows, torch.minimum(w0 + j, w1 - 1).clamp(0, width - 1), height, width)
            return feat.index_select(0, flat.reshape(-1)).reshape(b, ly, pooled_width, c)

        row_max, row_j = _running_max(column, max(int(bin_w[idx].max()), 1), has_nan)
        row_col = w0[:, None, :, None] + row_j  # [B, Ly, PW, C] column of each row's max
        base = (torch.arange(b, device=feat.device) * ly)[:, None]

        def row(j):  # pass 2: the j-th row of every bin: [B, PH, PW, C]
            sel = (base + torch.minimum(h0 + j, h1 - 1).clamp(0, ly - 1)).reshape(-1)
            rows_of = row_max.reshape(b * ly, pooled_width * c).index_select(0, sel)
            return rows_of.reshape(b, pooled_height, pooled_width, c)

        best, best_j = _running_max(row, max(int(bin_h[idx].max()), 1), False)
        best_row = (h0[:, :, None, None] + best_j).long()  # [B, PH, PW, C]
        col = torch.gather(row_col, 1, best_row.clamp(0, ly - 1))  # the winning row's column
        found = best > lowest
        empty = (hs[idx] >= he[idx])[:, :, None, None] | (ws[idx] >= we[idx])[:, None, :, None]  # [B, PH, PW, 1]
        out[idx] = torch.where(empty, 0.0, torch.where(found, best, lowest)).to(out.dtype)
        argmax[idx] = torch.where(empty | ~found, -1, (row0[idx, None, None, None] + best_row) * width + col)
    return out, argmax


def roi_pool_backward(grad: Tensor, rois: Tensor, argmax: Tensor, batch_size: int, channels: int, height: int,
                      width: int) -> Tensor:
    """Each bin's gradient goes to the cell it took its value from."""
    if rois.shape[0] and batch_size * channels * height * width:
        fast = jit.roi_pool_backward(grad, rois, argmax, (batch_size, channels, height, width))
        if fast is not None:
            return fast
    out = grad.new_zeros((batch_size * channels * height * width,))
    if rois.shape[0] == 0 or out.numel() == 0:
        return out.reshape(batch_size, channels, height, width)
    # int32 indices where they fit: half the memory of int64 on the largest tensor of the backward
    index_dtype = torch.int32 if out.numel() < 2**31 else torch.int64
    plane = (rois[:, 0].to(index_dtype)[:, None] * channels + torch.arange(channels, dtype=index_dtype,
                                                                             device=grad.device)) * (height * width)
    missing = argmax < 0
    # empty bins add 0 at cell 0
    flat = argmax.to(index_dtype, copy=True).add_(plane[:, :, None, None]).masked_fill_(missing, 0)
    out.index_add_(0, flat.reshape(-1), grad.masked_fill(missing, 0).reshape(-1))
    return out.reshape(batch_size, channels, height, width)
