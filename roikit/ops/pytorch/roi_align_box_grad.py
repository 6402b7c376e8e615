"""The gradient of RoIAlign with respect to the box corners, in plain PyTorch (any device).

RoIAlign's bin (ph, pw) is ``1 / (gh gw) sum_{iy, ix} f(y, x)`` (avg) or the largest ``f(y, x)`` (max) over the
samples (see ``roi_align.py``)::

    y = s + ph * b + (iy + 0.5) * b / gh,    b = (e - s) / PH,    s = y1 * scale (- 0.5 when aligned)

so a sample moves with the box's edges: ``dy / ds = 1 - t``, ``dy / de = t`` with ``t = (ph + (iy + 0.5) / gh) / PH``
its place along the box (``dy / ds = 1``, ``dy / de = 0`` where ``aligned=False`` holds a box under one cell at one
cell, and 0 for an edge clamped at +-2^52 cells). The bilinear surface moves under it: ``f`` is linear between cells,
so ``df / dy = (1 - lx) (F[y_hi, x_lo] - F[y_lo, x_lo]) + lx (F[y_hi, x_hi] - F[y_lo, x_hi])``, where the sample is
not clamped (``0 < y`` and below the last row; else 0), and a sample outside ``[-1, H]`` is 0 and stays 0. The
number of samples (``ceil(bin)`` when adaptive) is piecewise constant and the weights piecewise linear, so the
result is the exact derivative almost everywhere: it jumps where a sample crosses a cell line or the map's border,
where the adaptive count changes, and (max) where the winning sample changes.

The avg gradient keeps the factored form of the forward: the derivative of a row weight ``dWy[ph, i]`` (the tap
weights' slope ``-1, +1`` times ``dy / ds``) replaces ``Wy`` in ``Wy F Wx^T``, so for every box

    d loss / d s_y = sum_{ph, i} dWy_s[ph, i] * M[ph, i],     M[ph, i] = sum_{j, c} F[i, j, c] (G Wx)[ph, j, c]

with ``G = grad[k]``: two products of the crop (one per axis) per group of boxes, the groups bounded as the
forward's (``CHUNK_BUDGET``). Max pooling differentiates each bin's winning sample only (its 4 taps).

A box whose output has a non-finite value gets a NaN box gradient (the slope of the surface is not defined there).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import MAX_CELLS, compute_dtype, sample_coord, sample_taps, sampling_grid
from ._crops import FeatureRows, box_slices, crop_index, groups
from .roi_align import _box_costs, _samples


def _edge_slopes(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], aligned: bool):
    """Per axis (y, then x): ``(free_s, free_e, fixed)`` [K] each: whether the edge in cells is not clamped at
    +-2^52 (1.0 or 0.0), and whether ``aligned=False`` holds the box at one cell (its bin then ignores the edges)."""
    r = rois.to(compute_dtype(rois))
    axes = []
    for lo, hi in ((2, 4), (1, 3)):
        s, e = r[:, lo] * spatial_scale, r[:, hi] * spatial_scale
        free_s = (s.abs() < MAX_CELLS).to(r.dtype)
        free_e = (e.abs() < MAX_CELLS).to(r.dtype)
        size = e.clamp(-MAX_CELLS, MAX_CELLS) - s.clamp(-MAX_CELLS, MAX_CELLS)
        fixed = (size < 1.0) if not aligned else torch.zeros_like(size, dtype=torch.bool)
        axes.append((free_s, free_e, fixed))
    return axes


def _slope_factors(p, index, grid, pooled: int, slopes) -> tuple[Tensor, Tensor]:
    """``dy / ds`` and ``dy / de`` of sample ``index`` of bin ``p`` (every argument broadcast to one shape)."""
    free_s, free_e, fixed = slopes
    t = (p + (index.to(free_s.dtype) + 0.5) / grid.clamp(min=1).to(free_s.dtype)) / pooled  # its place in the box
    return torch.where(fixed, 1.0, 1.0 - t) * free_s, torch.where(fixed, 0.0, t) * free_e


def _axis_with_slopes(start, bin_size, grid, pooled: int, length: int, slopes):
    """One axis of a group of boxes: the cells ``[B, L]`` the bins read, each bin's weights ``W`` on them and the
    derivatives of the weights with respect to the two edges, ``dW_s`` and ``dW_e`` ([B, P, L] each); None when no
    sample of the group lands on the map.

    The layout is ``roi_align._axis``'s: a box's contiguous span of cells, or its samples' taps listed one after the
    other when that is shorter; so at most ``length`` cells or ``2 P M``."""
    index, mask, valid, low, high, w_low, w_high = _samples(start, bin_size, grid, pooled, length, False)
    b, _, m = index.shape
    if m == 0:
        return None
    p = torch.arange(pooled, device=start.device)[None, :, None]
    coord = sample_coord(start[:, None, None], bin_size[:, None, None], grid[:, None, None], p, index)
    moves = (valid & (coord > 0) & (low < length - 1)).to(start.dtype)  # d frac / d y: 1 between the cells
    dy_s, dy_e = _slope_factors(p, index, grid[:, None, None], pooled, [v[:, None, None] for v in slopes])

    first = torch.where(valid, low, length).flatten(1).amin(dim=1)
    last = torch.where(valid, high, -1).flatten(1).amax(dim=1)
    first = torch.where(last >= 0, first, 0)
    span = (last - first + 1).clamp(min=1)
    taps = 2 * pooled * m
    listed = span > taps
    size = max(int(torch.where(listed, taps, span).max()), 1)
    contiguous = (first[:, None] + torch.arange(size, device=start.device)).clamp(max=length - 1)
    by_sample = torch.stack([low, high], dim=-1).reshape(b, taps)
    cells = torch.where(listed[:, None], torch.nn.functional.pad(by_sample, (0, max(size - taps, 0)))[:, :size],
                        contiguous)
    s = torch.arange(pooled * m, device=start.device).reshape(1, pooled, m)
    pos_low = torch.where(listed[:, None, None], 2 * s, low - first[:, None, None])
    pos_high = torch.where(listed[:, None, None], 2 * s + 1, high - first[:, None, None])
    pos_low = torch.where(valid, pos_low, 0).clamp(0, size - 1)
    pos_high = torch.where(valid, pos_high, 0).clamp(0, size - 1)

    scale = 1.0 / grid.clamp(min=1).to(start.dtype)[:, None, None]
    out = []
    for on_low, on_high in ((w_low, w_high), (-moves * dy_s, moves * dy_s), (-moves * dy_e, moves * dy_e)):
        weight = start.new_zeros((b, pooled, size))
        weight.scatter_add_(2, pos_low, torch.where(valid, on_low, 0.0) * scale)
        weight.scatter_add_(2, pos_high, torch.where(valid, on_high, 0.0) * scale)
        out.append(weight)
    return cells, *out


def _avg_groups(sizes, pooled, height_width, channels: int):
    """Groups of boxes whose crop, the two products with it and the weights fit CHUNK_BUDGET together."""
    (_, bin_h, gh), (_, bin_w, gw) = sizes
    my, ly = _box_costs(gh, bin_h, pooled[0], height_width[0])
    mx, lx = _box_costs(gw, bin_w, pooled[1], height_width[1])
    weights = 12 * (pooled[0] * my + pooled[1] * mx) + 12 * (pooled[0] * ly + pooled[1] * lx)
    values = (ly * lx + 2 * pooled[0] * lx) * channels  # the crop, G Wx and Wy F
    return groups((weights + values).clamp(max=2.0**62).long())


def roi_align_box_backward(grad: Tensor, input: Tensor, rois: Tensor, output: Tensor, argmax: Tensor,
                           spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                           aligned: bool, pool_max: bool) -> Tensor:
    """``d loss / d rois`` [K, 5] in rois' dtype: 0 for the batch index, then x1, y1, x2, y2 (image pixels).

    grad, output: [K, C, PH, PW]; argmax: the forward's ([K, C, PH, PW] for max pooling, empty for avg).
    Computed in float64 for float64 boxes, float32 otherwise.
    """
    k, pooled = rois.shape[0], (pooled_height, pooled_width)
    dtype = compute_dtype(rois)
    result = torch.zeros((k, 5), dtype=dtype, device=rois.device)
    n, c, h, w = input.shape
    if k == 0 or input.numel() == 0:
        return result.to(rois.dtype)
    feat = FeatureRows(input, dtype)
    for sl in box_slices(k):  # every per-box intermediate is bounded by the slice
        box, g = rois[sl], grad[sl].to(dtype)
        sizes = sampling_grid(box, spatial_scale, pooled, sampling_ratio, aligned)
        slopes = _edge_slopes(box, spatial_scale, pooled, aligned)
        if pool_max:
            _max_slice(feat, g, argmax[sl], box[:, 0].long(), sizes, slopes, result[sl])
        else:
            _avg_slice(feat, g, box[:, 0].long(), sizes, slopes, pooled, result[sl])
    result[:, 1:] *= spatial_scale
    bad = ~torch.isfinite(output).flatten(1).all(dim=1) if output.numel() else torch.zeros_like(result[:, 0]).bool()
    result[:, 1:] = torch.where(bad[:, None], float("nan"), result[:, 1:])
    return result.to(rois.dtype)


def _avg_slice(feat: FeatureRows, grad: Tensor, batch: Tensor, sizes, slopes, pooled, result: Tensor) -> None:
    """Adds the avg box gradient of a slice of boxes into ``result`` [B, 5] (columns x1, y1, x2, y2)."""
    _, c, h, w = feat.shape
    (y1, bin_h, gh), (x1, bin_w, gw) = sizes
    for idx in _avg_groups(sizes, pooled, (h, w), c):
        ay = _axis_with_slopes(y1[idx], bin_h[idx], gh[idx], pooled[0], h, [v[idx] for v in slopes[0]])
        ax = _axis_with_slopes(x1[idx], bin_w[idx], gw[idx], pooled[1], w, [v[idx] for v in slopes[1]])
        if ay is None or ax is None:  # no sample on the map: every bin is 0, whatever the edges
            continue
        (cells_y, wy, dys, dye), (cells_x, wx, dxs, dxe) = ay, ax
        b, ly, lx = idx.numel(), cells_y.shape[1], cells_x.shape[1]
        index = crop_index(batch[idx], cells_y, cells_x, h, w)
        crop = feat.rows.index_select(0, index.reshape(-1)).reshape(b, ly, lx, c)  # [B, Ly, Lx, C]
        g = grad[idx]  # [B, C, PH, PW]
        gx = torch.einsum("bcpq,bqj->bpjc", g, wx)  # [B, PH, Lx, C]: the gradient carried to the columns
        rows = torch.bmm(gx.reshape(b, -1, lx * c), crop.reshape(b, ly, lx * c).transpose(1, 2))  # [B, PH, Ly]
        rows_read = torch.bmm(wy.to(crop.dtype), crop.reshape(b, ly, lx * c)).reshape(b, -1, lx, c)  # Wy F
        cols = torch.einsum("bcpq,bpjc->bqj", g, rows_read)  # [B, PW, Lx]
        edges = torch.stack([(dxs * cols).sum((1, 2)), (dys * rows).sum((1, 2)), (dxe * cols).sum((1, 2)),
                             (dye * rows).sum((1, 2))], dim=1)  # [B, 4]: x1, y1, x2, y2
        result[:, 1:].index_add_(0, idx, edges)


def _max_slice(feat: FeatureRows, grad: Tensor, argmax: Tensor, batch: Tensor, sizes, slopes, result: Tensor) -> None:
    """Adds the max box gradient of a slice of boxes into ``result``: each bin's winning sample (argmax
    ``iy * gw + ix``, -1 for none) moves with the edges; its 4 taps give the slope of the surface there."""
    _, c, h, w = feat.shape
    (y1, bin_h, gh), (x1, bin_w, gw) = sizes
    k, _, ph, pw = grad.shape
    per_box = c * ph * pw
    view = (slice(None), None, None, None)
    for idx in groups(torch.full((k,), 24 * per_box, dtype=torch.int64)):
        arg = argmax[idx]  # [B, C, PH, PW]
        a = arg.clamp(min=0)
        g_w = gw[idx].clamp(min=1)[view]
        iy, ix = a // g_w, a % g_w
        p = torch.arange(ph, device=grad.device)[None, None, :, None]
        q = torch.arange(pw, device=grad.device)[None, None, None, :]
        cy = sample_coord(y1[idx][view], bin_h[idx][view], gh[idx][view], p, iy)
        cx = sample_coord(x1[idx][view], bin_w[idx][view], gw[idx][view], q, ix)
        valid = (arg >= 0) & (cy >= -1.0) & (cy <= h) & (cx >= -1.0) & (cx <= w)
        y_lo, y_hi, wy_lo, wy_hi = sample_taps(cy, valid, h)
        x_lo, x_hi, wx_lo, wx_hi = sample_taps(cx, valid, w)
        base = batch[idx][view] * h
        channel = torch.arange(c, device=grad.device)[None, :, None, None]

        def tap(rows, cols):  # [B, C, PH, PW]: the map at (rows, cols) of each bin's channel
            cell = (base + rows) * w + cols
            return feat.rows.reshape(-1)[(cell * c + channel).reshape(-1)].reshape(arg.shape)

        v11, v12, v21, v22 = tap(y_lo, x_lo), tap(y_lo, x_hi), tap(y_hi, x_lo), tap(y_hi, x_hi)
        moves_y = (valid & (cy > 0) & (y_lo < h - 1)).to(grad.dtype)
        moves_x = (valid & (cx > 0) & (x_lo < w - 1)).to(grad.dtype)
        df_dy = moves_y * (wx_lo * (v21 - v11) + wx_hi * (v22 - v12))
        df_dx = moves_x * (wy_lo * (v12 - v11) + wy_hi * (v22 - v21))
        g = torch.where(valid, grad[idx], 0.0)
        ys, ye = _slope_factors(p, iy, gh[idx][view], ph, [v[idx][view] for v in slopes[0]])
        xs, xe = _slope_factors(q, ix, gw[idx][view], pw, [v[idx][view] for v in slopes[1]])
        dy, dx = g * df_dy, g * df_dx
        edges = torch.stack([(dx * xs).sum((1, 2, 3)), (dy * ys).sum((1, 2, 3)), (dx * xe).sum((1, 2, 3)),
                             (dy * ye).sum((1, 2, 3))], dim=1)
        result[:, 1:].index_add_(0, idx, edges)
