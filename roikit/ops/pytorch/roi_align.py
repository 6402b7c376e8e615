"""RoIAlign in plain PyTorch: the CPU path, the fallback on any device, and the reference for the kernels.

Bin (ph, pw) of box k averages (or, with ``pool="max"``, takes the largest of) ``gh * gw`` bilinear samples at

    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh,    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw

with torchvision's conventions: ``y1 = box_y1 * scale - 0.5`` when aligned, a box at least 1 cell wide when not
aligned, ``gh = sampling_ratio`` or ``ceil(bin_h)`` when it is <= 0, a sample outside ``[-1, H] x [-1, W]`` is 0,
one inside is clamped to the map.

A bilinear sample's weight on cell (i, j) is ``a(y, i) * b(x, j)``: it factors into a row part and a column
part, and so does the rule that zeroes outside samples. So every bin is ``Wy[ph] @ F @ Wx[pw]^T`` with
``Wy[k, ph, i] = sum_iy a(y, i) / gh``: two small matrices per box instead of 4 * gh * gw reads per bin and
channel (see ``_crops.py``). Max pooling needs each sample's value, so it uses one row of Wy and Wx per sample.

**Bounded work.** The samples of a bin are monotone in their index, so the ones inside ``[-1, H]`` form one run
``[lo, hi)``, found by bisection; only that run is read (the others are 0). A box far larger than the map, or a
huge ``sampling_ratio``, costs the samples that land on the map, never the box's size: with adaptive sampling a bin
has at most about ``H + 3`` such samples per axis. Memory: the map (one channels-last copy, plus 0/1 maps of its
non-finite cells when it has any), the output, and groups of boxes of at most ``CHUNK_BUDGET`` values.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..geometry import MAX_GRID, compute_dtype, sample_coord, sample_taps, sampling_grid
from . import jit
from ._crops import CHUNK_BUDGET, Axis, FeatureRows, add_back, box_slices, groups


def _first_true(cond, lo: Tensor, hi: Tensor) -> Tensor:
    """The smallest i in [lo, hi] with ``cond(i)`` (monotone: false then true), ``hi`` if none; by bisection."""
    steps = int(hi.max()).bit_length() + 1 if hi.numel() else 0
    for _ in range(steps):
        mid = (lo + hi) // 2
        c = cond(mid) & (mid < hi)
        hi = torch.where(c, mid, hi)
        lo = torch.where(c | (lo >= hi), lo, mid + 1)
    return hi


def _sample_run(start, bin_size, grid, pooled: int, length: int, with_first_invalid: bool):
    """The samples of every bin that can be non-zero: [B, P, M] sample indices and a mask.

    They are the run ``[lo, hi)`` inside ``[-1, length]`` (positions are monotone in the index: rising, or falling
    for a reversed box); with ``with_first_invalid`` also the bin's first sample outside it (value 0, which max
    pooling compares like any other sample)."""
    b = start.shape[0]
    p = torch.arange(pooled, device=start.device)[None, :]  # [1, P]
    g = grid[:, None].expand(b, pooled).clamp(min=0)  # [B, P]
    zero = torch.zeros_like(g)

    def coord(i):
        return sample_coord(start[:, None], bin_size[:, None], grid[:, None], p, i)

    # positions rise with i, or fall for a reversed box (aligned=True keeps its negative size): either way the
    # samples inside [-1, length] are one run, entered at one end and left at the other
    falling = (bin_size < 0)[:, None]
    lo = _first_true(lambda i: torch.where(falling, coord(i) <= length, coord(i) >= -1.0), zero, g)
    hi = _first_true(lambda i: torch.where(falling, coord(i) < -1.0, coord(i) > length), zero, g)
    count = hi - lo
    m = max(int(count.max()), 0) if count.numel() else 0
    index = lo[:, :, None] + torch.arange(m, device=start.device)  # [B, P, M]
    mask = torch.arange(m, device=start.device) < count[:, :, None]
    if with_first_invalid:
        first = torch.where(lo > 0, 0, hi)
        exists = (g > 0) & ((lo > 0) | (hi < g))
        index = torch.cat([index, first[:, :, None]], dim=2)
        mask = torch.cat([mask, exists[:, :, None]], dim=2)
        # slots in sample order (the first invalid sample may come before the run), empty slots last
        index, order = torch.sort(torch.where(mask, index, torch.iinfo(torch.int64).max), dim=2, stable=True)
        mask = torch.gather(mask, 2, order)
        index = torch.where(mask, index, 0)
    return index, mask


def _samples(start, bin_size, grid, pooled: int, length: int, with_first_invalid: bool):
    """The sample slots of a group of boxes along one axis, each [B, P, M]: sample index, "the slot holds a sample",
    "the sample is inside [-1, length]", and its taps ``low, high, w_low, w_high`` (see :func:`sample_taps`)."""
    index, mask = _sample_run(start, bin_size, grid, pooled, length, with_first_invalid)  # [B, P, M]
    p = torch.arange(pooled, device=start.device)[None, :, None]
    coord = sample_coord(start[:, None, None], bin_size[:, None, None], grid[:, None, None], p, index)
    valid = mask & (coord >= -1.0) & (coord <= length)
    return (index, mask, valid, *sample_taps(coord, valid, length))


def _axis(start, bin_size, grid, pooled: int, length: int, with_taps: bool = True) -> Axis:
    """The :class:`Axis` of a group of boxes along one axis: each bin's mean over its samples, with the tap matrices
    of the non-finite rules when ``with_taps`` (a finite map, and the backward, need the weights only).

    A box reads its contiguous span of cells or, when that is longer, the two taps of each sample listed one after
    the other (a big box with few samples): whichever is shorter. Either way at most ``length`` cells or ``2 P M``.
    """
    b = start.shape[0]
    _, _, valid, low, high, w_low, w_high = _samples(start, bin_size, grid, pooled, length, False)
    m = low.shape[2]
    first = torch.where(valid, low, length).flatten(1).amin(dim=1) if m else torch.zeros(b, dtype=torch.int64)
    last = torch.where(valid, high, -1).flatten(1).amax(dim=1) if m else torch.full((b,), -1)
    first = torch.where(last >= 0, first, 0)
    span = (last - first + 1).clamp(min=1)  # [B]
    taps = 2 * pooled * m
    listed = span > taps
    size = max(int(torch.where(listed, taps, span).max()), 1)
    contiguous = (first[:, None] + torch.arange(size, device=start.device)).clamp(max=length - 1)  # [B, L]
    by_sample = torch.stack([low, high], dim=-1).reshape(b, taps)
    cells = torch.where(listed[:, None], torch.nn.functional.pad(by_sample, (0, max(size - taps, 0)))[:, :size],
                        contiguous)
    s = torch.arange(pooled * m, device=start.device).reshape(1, pooled, m)
    pos_low = torch.where(listed[:, None, None], 2 * s, low - first[:, None, None])
    pos_high = torch.where(listed[:, None, None], 2 * s + 1, high - first[:, None, None])
    pos_low = torch.where(valid, pos_low, 0).clamp(0, size - 1)  # invalid samples carry weight 0 and no tap
    pos_high = torch.where(valid, pos_high, 0).clamp(0, size - 1)

    scale = 1.0 / grid.clamp(min=1).to(start.dtype)[:, None, None]
    weight = start.new_zeros((b, pooled, size))
    weight.scatter_add_(2, pos_low, w_low * scale)
    weight.scatter_add_(2, pos_high, w_high * scale)
    if not with_taps:  # a finite map: only the weights are read
        return Axis(cells, weight)
    tap = start.new_zeros((b, pooled, size))
    tap.scatter_add_(2, pos_low, valid.to(start.dtype))
    tap.scatter_add_(2, pos_high, valid.to(start.dtype))
    zero = start.new_zeros((b, pooled, size))
    zero.scatter_add_(2, pos_low, (valid & (w_low == 0)).to(start.dtype))
    zero.scatter_add_(2, pos_high, (valid & (w_high == 0)).to(start.dtype))
    return Axis(cells, weight, tap > 0, zero > 0)


def _box_costs(grid, bin_size, pooled: int, length: int) -> tuple[Tensor, Tensor]:
    """Upper bounds of the sample slots M [K] and the crop cells L [K] of one axis."""
    spacing = bin_size.abs() / grid.clamp(min=1).to(bin_size.dtype)
    on_map = torch.floor((length + 2) / spacing.clamp(min=1e-30)).clamp(max=MAX_GRID) + 2
    m = torch.minimum(grid.clamp(min=0).to(bin_size.dtype), on_map) + 1
    span = torch.ceil(bin_size.abs() * pooled).clamp(max=length) + 3  # the box's cells and the taps past it
    cells = torch.minimum(torch.minimum(span, torch.full_like(m, float(length))), 2 * pooled * m)
    return m, cells


def _groups(sizes, pooled, height_width, channels: int, per_sample: bool, reads: int):
    """Groups of boxes whose samples, weights, ``reads`` crops and results fit CHUNK_BUDGET together."""
    (_, bin_h, gh), (_, bin_w, gw) = sizes
    my, ly = _box_costs(gh, bin_h, pooled[0], height_width[0])
    mx, lx = _box_costs(gw, bin_w, pooled[1], height_width[1])
    ry, rx = (pooled[0] * my, pooled[1] * mx) if per_sample else (pooled[0], pooled[1])
    samples = 12 * (pooled[0] * my + pooled[1] * mx) + 4 * (ry * ly + rx * lx)
    values = (ry * rx * channels * torch.ones_like(my)).clamp(max=CHUNK_BUDGET)  # max pooling reads in blocks
    return groups((samples + reads * (ly * lx * channels + values)).clamp(max=2.0**62).long())


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                      sampling_ratio: int, aligned: bool, pool_max: bool) -> tuple[Tensor, Tensor]:
    """Returns ``output`` [K, C, PH, PW] and, for max pooling, ``argmax`` [K, C, PH, PW] (the winning sample's
    ``iy * gw + ix`` within its bin, -1 when no sample beat -inf or the bin has no sample); an empty argmax for
    average pooling."""
    n, c, h, w = input.shape
    k, pooled = rois.shape[0], (pooled_height, pooled_width)
    if not pool_max and k and input.numel():  # the numba kernels (roikit.ops.pytorch.jit), where they take the call
        fast = jit.roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
        if fast is not None:
            return fast, torch.full((0,), -1, dtype=torch.int64)
    out = input.new_zeros((k, c, pooled_height, pooled_width))
    argmax = torch.full((k, c, pooled_height, pooled_width) if pool_max else (0,), -1, dtype=torch.int64,
                        device=input.device)
    if k == 0 or input.numel() == 0:
        return out, argmax
    feat = FeatureRows(input, compute_dtype(rois))
    for sl in box_slices(k):  # every per-box intermediate is bounded by the slice
        _forward_slice(feat, rois[sl], spatial_scale, pooled, sampling_ratio, aligned, pool_max, out[sl],
                       argmax[sl] if pool_max else argmax)
    return out, argmax


def _forward_slice(feat: FeatureRows, rois: Tensor, spatial_scale: float, pooled: tuple[int, int],
                   sampling_ratio: int, aligned: bool, pool_max: bool, out: Tensor, argmax: Tensor) -> None:
    n, c, h, w = feat.shape
    pooled_height, pooled_width = pooled
    sizes = sampling_grid(rois, spatial_scale, pooled, sampling_ratio, aligned)
    (y1, bin_h, gh), (x1, bin_w, gw) = sizes
    batch = rois[:, 0].long()
    for idx in _groups(sizes, pooled, (h, w), c, pool_max, reads=1 if feat.finite else 6):
        if not pool_max:
            ay = _axis(y1[idx], bin_h[idx], gh[idx], pooled_height, h, not feat.finite)
            ax = _axis(x1[idx], bin_w[idx], gw[idx], pooled_width, w, not feat.finite)
            value = feat.read(batch[idx], ay, ax)  # [B, PH, PW, C]
            out.index_copy_(0, idx, value.permute(0, 3, 1, 2).to(out.dtype))
            continue
        sy = _samples(y1[idx], bin_h[idx], gh[idx], pooled_height, h, True)
        sx = _samples(x1[idx], bin_w[idx], gw[idx], pooled_width, w, True)
        value, arg = _max_over_samples(feat.raw, (n, c, h, w), batch[idx], sy, sx, gw[idx])
        empty = ((gh[idx] <= 0) | (gw[idx] <= 0))[:, None, None, None]  # no sample at all: 0
        out.index_copy_(0, idx, value.masked_fill(empty, 0.0).to(out.dtype))
        argmax.index_copy_(0, idx, arg.masked_fill(empty, -1))


def _max_over_samples(rows: Tensor, shape, batch: Tensor, sy, sx, gw: Tensor) -> tuple[Tensor, Tensor]:
    """The largest sample of every bin, [B, C, PH, PW], and its index ``iy * gw + ix``: the first in that order on
    ties; NaN never wins (as ``if (v > best)`` in C). Each sample is read through its 4 taps (``rows`` [N H W, C],
    non-finite cells included: a sample is NaN or infinite only if a tap is). Slots come in sample order and are
    read in blocks (rows of slots outer, columns inner) of at most CHUNK_BUDGET values, so a block's first maximum
    is the bin's."""
    _, channels, height, width = shape
    iy, my_, vy, y_lo, y_hi, wy_lo, wy_hi = sy  # [B, PH, My] each
    ix, mx_, vx, x_lo, x_hi, wx_lo, wx_hi = sx  # [B, PW, Mx] each
    b, ph, my = iy.shape
    pw, mx = ix.shape[1], ix.shape[2]
    best = rows.new_full((b, ph, pw, channels), float("-inf"))
    best_index = torch.full((b, ph, pw, channels), -1, dtype=torch.int64, device=rows.device)
    block = max(1, math.isqrt(max(CHUNK_BUDGET // max(4 * b * ph * pw * channels, 1), 1)))
    base = batch[:, None, None, None, None] * height
    for y0 in range(0, my, block):
        ys = slice(y0, min(y0 + block, my))
        for x0 in range(0, mx, block):
            xs = slice(x0, min(x0 + block, mx))

            def grid(a, b_):  # [B, PH, by, 1, 1] x [B, 1, 1, PW, bx] -> [B, PH, by, PW, bx]
                return a[:, :, ys, None, None], b_[:, None, None, :, xs]

            value = 0.0
            for rows_at, w_row in ((y_lo, wy_lo), (y_hi, wy_hi)):
                for cols_at, w_col in ((x_lo, wx_lo), (x_hi, wx_hi)):
                    r, q = grid(rows_at, cols_at)
                    cell = ((base + r) * width + q).reshape(-1)
                    wr, wq = grid(w_row, w_col)
                    tap = rows.index_select(0, cell).reshape(*(wr * wq).shape, channels)
                    value = value + (wr * wq).to(rows.dtype)[..., None] * tap  # [B, PH, by, PW, bx, C]
            valid_y, valid_x = grid(vy, vx)
            slot_y, slot_x = grid(my_, mx_)
            value = torch.where((valid_y & valid_x)[..., None], value, 0.0)  # off the map: 0, nothing read
            value = value.masked_fill(~(slot_y & slot_x)[..., None] | torch.isnan(value), float("-inf"))
            top, where = value.permute(0, 1, 3, 5, 2, 4).reshape(b, ph, pw, channels, -1).max(dim=-1)
            index = iy[:, :, ys, None, None] * gw[:, None, None, None, None] + ix[:, None, None, :, xs]
            index = index.permute(0, 1, 3, 2, 4).reshape(b, ph, pw, 1, -1).expand(b, ph, pw, channels, -1)
            first = torch.gather(index, 4, where[..., None]).squeeze(4)
            wins = top > best
            best = torch.where(wins, top, best)
            best_index = torch.where(wins, first, best_index)
    best_index = torch.where(best > float("-inf"), best_index, -1)  # nothing beat -inf: no winner
    return best.permute(0, 3, 1, 2), best_index.permute(0, 3, 1, 2)


def roi_align_backward(grad: Tensor, rois: Tensor, argmax: Tensor, spatial_scale: float, pooled_height: int,
                       pooled_width: int, batch_size: int, channels: int, height: int, width: int,
                       sampling_ratio: int, aligned: bool, pool_max: bool) -> Tensor:
    """Gradient with respect to the features, [N, C, H, W]."""
    shape = (batch_size, channels, height, width)
    if rois.shape[0] == 0 or batch_size * channels * height * width == 0:
        return grad.new_zeros(shape)
    if not pool_max:
        fast = jit.roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, shape, sampling_ratio,
                                      aligned)
        if fast is not None:
            return fast
    dtype = compute_dtype(rois)
    pooled = (pooled_height, pooled_width)
    out = grad.new_zeros((batch_size * height * width, channels), dtype=dtype)
    for sl in box_slices(rois.shape[0]):
        sizes = sampling_grid(rois[sl], spatial_scale, pooled, sampling_ratio, aligned)
        batch, g = rois[sl, 0].long(), grad[sl]
        if pool_max:
            _max_backward(g.to(dtype), argmax[sl], sizes, batch, shape, out)
            continue
        (y1, bin_h, gh), (x1, bin_w, gw) = sizes
        for idx in _groups(sizes, pooled, (height, width), channels, False, reads=1):
            ay = _axis(y1[idx], bin_h[idx], gh[idx], pooled_height, height, False)
            ax = _axis(x1[idx], bin_w[idx], gw[idx], pooled_width, width, False)
            add_back(g[idx].permute(0, 2, 3, 1).to(dtype), out, shape, batch[idx], ay, ax)
    return out.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2).to(grad.dtype).contiguous()


def _max_backward(grad: Tensor, argmax: Tensor, sizes, batch: Tensor, shape, out: Tensor) -> None:
    """Each bin's gradient goes to the 4 taps of its winning sample, with the sample's bilinear weights."""
    _, channels, height, width = shape
    (y1, bin_h, gh), (x1, bin_w, gw) = sizes
    k, _, ph, pw = grad.shape
    per_box = channels * ph * pw
    for idx in groups(torch.full((k,), 16 * per_box, dtype=torch.int64)):
        arg = argmax[idx]  # [B, C, PH, PW]
        won = arg >= 0
        a = arg.clamp(min=0)
        g_w = gw[idx].clamp(min=1)[:, None, None, None]
        i_y, i_x = a // g_w, a % g_w
        p = torch.arange(ph, device=grad.device)[None, None, :, None]
        q = torch.arange(pw, device=grad.device)[None, None, None, :]
        view = (slice(None), None, None, None)
        cy = sample_coord(y1[idx][view], bin_h[idx][view], gh[idx][view], p, i_y)
        cx = sample_coord(x1[idx][view], bin_w[idx][view], gw[idx][view], q, i_x)
        valid = won & (cy >= -1.0) & (cy <= height) & (cx >= -1.0) & (cx <= width)
        ylo, yhi, wyl, wyh = sample_taps(cy, valid, height)
        xlo, xhi, wxl, wxh = sample_taps(cx, valid, width)
        g = torch.where(valid, grad[idx], 0.0)
        base = batch[idx][view] * height
        c = torch.arange(channels, device=grad.device)[None, :, None, None].expand_as(g)
        for rows, wr in ((ylo, wyl), (yhi, wyh)):
            for cols, wc in ((xlo, wxl), (xhi, wxh)):
                cell = ((base + rows) * width + cols) * channels + c
                out.view(-1).index_add_(0, cell.reshape(-1), (g * wr * wc).reshape(-1))
