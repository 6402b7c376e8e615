"""Rotated RoIAlign in plain PyTorch: the CPU path, the fallback on any device, and the reference for the kernels.

Box k is ``(n, cx, cy, w, h, angle)``. In cells: centre ``(cx s - o, cy s - o)`` with ``o = 0.5`` when aligned
(0 when not), size ``(w s, h s)``, forced to at least 1 x 1 cell when not aligned. Bin (ph, pw) averages
``gh * gw`` bilinear samples placed on the unrotated box, relative to its centre,

    yy = -h / 2 + ph * bin_h + (iy + 0.5) * bin_h / gh,    xx = -w / 2 + pw * bin_w + (ix + 0.5) * bin_w / gw

and turned by ``theta`` about the centre (``theta`` = the angle in radians, negated with ``clockwise``):

    y = yy cos(theta) - xx sin(theta) + cy,    x = yy sin(theta) + xx cos(theta) + cx

``gh = sampling_ratio``, or ``ceil(bin_h)`` when it is <= 0; the mean divides by ``max(gh * gw, 1)``. A sample
outside ``[-1, H] x [-1, W]`` is 0 and reads nothing; one inside is clamped to the map and read through its 4
bilinear taps (taps of weight 0 too: ``0 * inf`` is NaN, as in torchvision's RoIAlign).

**Bounded work.** The samples that can land on the map are found before any is computed: the map's rectangle
``[-1, H] x [-1, W]``, turned back into the box's frame, has a bounding box ``[Y0, Y1] x [X0, X1]`` in
``(yy, xx)``; the samples of bin (ph, pw) inside it are a window of rows ``[lo_y, lo_y + ny)`` and columns
``[lo_x, lo_x + nx)`` of the bin's sample grid (widened by one sample, and by the rounding of the positions, each
side). Only the window is visited, and every sample in it is tested exactly. With adaptive sampling the samples
are at least half a cell apart, so a window has at most about ``2 (H + W + 2)`` rows and columns, whatever the
box: a 10,000 px or 1e30 px box costs what the map holds. A ``sampling_ratio`` of ``r`` costs up to ``r * r``
samples for a bin on the map (what it asks for). Memory: the map (one channels-last copy), the output, and blocks
of samples of at most ``CHUNK_BUDGET`` values.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._utils import numba_module
from ..geometry import MAX_CELLS, MAX_GRID, compute_dtype, sample_coord, sample_taps
from . import jit
from ._crops import CHUNK_BUDGET, box_slices, channels_last_rows, groups

# the windows are widened by the rounding of the positions, up to this many samples (past it the positions are
# rounding noise: float32 boxes over about 2^24 cells)
MAX_ROUNDING_MARGIN = 8.0


class RotatedGrid(NamedTuple):
    """Per box [B]: image, centre (cy, cx) in cells, cos and sin of theta, the bins' start (-h / 2, -w / 2) and
    size, and the samples per bin along each axis (int64, 0 when there are none)."""
    batch: Tensor
    cy: Tensor
    cx: Tensor
    cos: Tensor
    sin: Tensor
    y0: Tensor
    x0: Tensor
    bin_h: Tensor
    bin_w: Tensor
    gh: Tensor
    gw: Tensor


def rotated_grid(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool,
                 clockwise: bool, radians: bool) -> RotatedGrid:
    """The sample grid of every box, in the compute dtype (float64 for float64 boxes, else float32).

    Coordinates in cells are clamped to +-2^52; ``theta`` is computed in float64 and rounded to the compute dtype
    (detectron2's order: degrees * pi / 180 in double, then the box's type).
    """
    dtype = compute_dtype(rois)
    r = rois.to(dtype)
    offset = 0.5 if aligned else 0.0
    cx, cy, w, h = ((r[:, i] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS) for i in (1, 2, 3, 4))
    cx, cy = cx - offset, cy - offset
    if not aligned:  # mmcv's legacy rule: at least 1 x 1 cell
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    theta = rois[:, 5].to(torch.float64)
    if not radians:
        theta = theta * math.pi / 180.0
    if clockwise:
        theta = -theta
    theta = theta.to(dtype)
    bin_h, bin_w = h / pooled[0], w / pooled[1]
    if sampling_ratio > 0:
        gh = torch.full(bin_h.shape, min(sampling_ratio, MAX_GRID), dtype=torch.int64, device=rois.device)
        gw = gh.clone()
    else:  # ceil(bin); none for an empty, reversed or NaN bin
        gh, gw = (torch.ceil(b).nan_to_num(0.0).clamp(0, MAX_GRID).long().clamp(max=MAX_GRID) for b in (bin_h, bin_w))
    return RotatedGrid(rois[:, 0].long(), cy, cx, torch.cos(theta), torch.sin(theta), -h / 2.0, -w / 2.0, bin_h, bin_w,
                       gh, gw)


def map_extent(g: RotatedGrid, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The map ``[-1, H] x [-1, W]`` in each box's frame: its bounding box ``(Y0, Y1, X0, X1)`` in ``(yy, xx)``, and
    the rounding error of a sample position (cells) to widen it by."""
    corners = [(y - g.cy, x - g.cx) for y in (-1.0, float(height)) for x in (-1.0, float(width))]
    yy = torch.stack([g.cos * dy + g.sin * dx for dy, dx in corners])  # [4, B]
    xx = torch.stack([g.cos * dx - g.sin * dy for dy, dx in corners])
    eps = torch.finfo(g.cy.dtype).eps
    size = g.cy.abs() + g.cx.abs() + g.y0.abs() + g.x0.abs() + height + width + 2.0
    return yy.amin(0), yy.amax(0), xx.amin(0), xx.amax(0), 16 * eps * size


def sample_window(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, low: Tensor, high: Tensor,
                  error: Tensor) -> tuple[Tensor, Tensor]:
    """The samples of each bin (``start``, ``bin_size``, ``grid``, ``low``, ``high``, ``error``: [B]) whose position
    along the axis can lie in ``[low, high]``: first index and count, each [B, P] int64 (count 0 for NaN)."""
    p = torch.arange(pooled, device=start.device).to(start.dtype)[None, :]
    first = start[:, None] + p * bin_size[:, None]  # [B, P], the bin's start (sample_coord's order)
    g = grid.clamp(min=1).to(start.dtype)[:, None]
    spacing = bin_size[:, None] / g
    lo, hi = low[:, None], high[:, None]
    # one sample, plus the rounding error of a position in samples (at most MAX_ROUNDING_MARGIN), each side
    margin = (error[:, None] / spacing.abs()).clamp(max=MAX_ROUNDING_MARGIN).nan_to_num(MAX_ROUNDING_MARGIN) + 1.0
    t0 = (lo - first) / spacing - 0.5
    t1 = (hi - first) / spacing - 0.5
    a = torch.minimum(t0, t1) - margin
    b = torch.maximum(t0, t1) + margin
    gf = grid.to(start.dtype)[:, None]
    begin = torch.minimum(torch.floor(a).clamp(min=0), gf).nan_to_num(0.0)
    end = torch.minimum((torch.floor(b) + 1).clamp(min=0), gf).nan_to_num(0.0)
    # zero spacing (a zero-size box with a fixed sampling_ratio): every sample sits at the bin's start
    at_start = (first >= lo - error[:, None]) & (first <= hi + error[:, None])
    flat = spacing == 0
    begin = torch.where(flat, 0.0, begin)
    end = torch.where(flat, torch.where(at_start, gf, 0.0), end)
    grid_i = grid[:, None]
    begin_i = torch.minimum(begin.long(), grid_i)
    count = (torch.minimum(end.long(), grid_i) - begin_i).clamp(min=0)
    return begin_i, count


def sample_windows(g: RotatedGrid, pooled: tuple[int, int], height: int, width: int):
    """The window of samples of each bin that can land on the map (see the module docstring): ``((lo_y, n_y),
    (lo_x, n_x))``, first sample and count per box and bin row [B, PH] / column [B, PW] (int64)."""
    y_lo, y_hi, x_lo, x_hi, error = map_extent(g, height, width)
    rows = sample_window(g.y0, g.bin_h, g.gh, pooled[0], y_lo, y_hi, error)  # [B, PH] each
    cols = sample_window(g.x0, g.bin_w, g.gw, pooled[1], x_lo, x_hi, error)  # [B, PW] each
    return rows, cols


def _groups(g: RotatedGrid, rows, cols, pooled: tuple[int, int], height: int, width: int, channels: int):
    """Groups of boxes, each with an iterator over blocks of their sample windows of at most CHUNK_BUDGET values:
    yields ``(idx, blocks)``; a block is ``(taps, weights, valid)`` with ``taps`` [B, PH, PW, S, 4] (flat row index
    into the channels-last map), ``weights`` [B, PH, PW, S, 4] and ``valid`` [B, PH, PW, S, 1] (the sample lies in
    ``[-1, H] x [-1, W]``). Boxes without a sample on the map are in no group."""
    (lo_y, n_y), (lo_x, n_x) = rows, cols
    ph_n, pw_n = pooled
    per_slot = 4 * (channels + 8)  # 4 taps: gathered values, indices, weights
    m_y, m_x = n_y.amax(1), n_x.amax(1)  # [B]
    cost = (m_y.double() * m_x.double() * (ph_n * pw_n * per_slot)).clamp(max=2.0**62).long()
    for idx in groups(cost):
        my, mx = int(m_y[idx].max()), int(m_x[idx].max())
        if my == 0 or mx == 0:
            continue
        unit = len(idx) * ph_n * pw_n * per_slot
        sx = min(mx, max(1, CHUNK_BUDGET // unit))
        sy = min(my, max(1, CHUNK_BUDGET // (unit * sx)))
        window = (lo_y[idx], n_y[idx]), (lo_x[idx], n_x[idx])
        yield idx, (_samples(g, idx, *window, ty, min(sy, my - ty), tx, min(sx, mx - tx), pooled, height, width)
                    for ty in range(0, my, sy) for tx in range(0, mx, sx))


def _samples(g: RotatedGrid, idx: Tensor, rows, cols, ty: int, sy: int, tx: int, sx: int, pooled, height: int,
             width: int):
    (lo_y, n_y), (lo_x, n_x) = rows, cols
    dev = lo_y.device
    b = idx.shape[0]
    ph = torch.arange(pooled[0], device=dev)[None, :, None]
    pw = torch.arange(pooled[1], device=dev)[None, :, None]
    ry = ty + torch.arange(sy, device=dev)  # window rows of this block
    rx = tx + torch.arange(sx, device=dev)
    iy = lo_y[:, :, None] + ry  # [B, PH, sy]
    ix = lo_x[:, :, None] + rx  # [B, PW, sx]
    box = (idx, None, None)
    yy = sample_coord(g.y0[box], g.bin_h[box], g.gh[box], ph, iy)  # [B, PH, sy]
    xx = sample_coord(g.x0[box], g.bin_w[box], g.gw[box], pw, ix)  # [B, PW, sx]
    yy, xx = yy[:, :, :, None, None], xx[:, None, None, :, :]  # -> [B, PH, sy, PW, sx]
    five = (idx, None, None, None, None)
    cos, sin = g.cos[five], g.sin[five]
    y = yy * cos - xx * sin + g.cy[five]
    x = yy * sin + xx * cos + g.cx[five]
    in_window = (ry < n_y[:, :, None])[:, :, :, None, None] & (rx < n_x[:, :, None])[:, None, None, :, :]
    valid = in_window & (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y_low, y_high, wy_low, wy_high = sample_taps(y, valid, height)
    x_low, x_high, wx_low, wx_high = sample_taps(x, valid, width)
    base = g.batch[five] * height
    taps = torch.stack([(base + r) * width + c for r in (y_low, y_high) for c in (x_low, x_high)], dim=-1)
    weights = torch.stack([wr * wc for wr in (wy_low, wy_high) for wc in (wx_low, wx_high)], dim=-1)
    # bin-major: [B, PH, PW, sy * sx, 4]
    taps = taps.permute(0, 1, 3, 2, 4, 5).reshape(b, pooled[0], pooled[1], sy * sx, 4)
    weights = weights.permute(0, 1, 3, 2, 4, 5).reshape(b, pooled[0], pooled[1], sy * sx, 4)
    valid = valid.permute(0, 1, 3, 2, 4).reshape(b, pooled[0], pooled[1], sy * sx, 1)
    return taps, weights, valid


def _counts(g: RotatedGrid, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """``max(gh * gw, 1)`` of the boxes ``idx``: [B, 1, 1, 1]."""
    return (g.gh[idx] * g.gw[idx]).clamp(min=1).to(dtype)[:, None, None, None]


def roi_align_rotated_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                              pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool,
                              radians: bool) -> Tensor:
    """``output`` [K, C, PH, PW]: every bin's mean over its samples (see the module docstring); on the CPU by the
    numba kernels when they take the call (:func:`jit_forward`)."""
    fast = jit_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise,
                       radians)
    if fast is not None:
        return fast
    n, c, h, w = input.shape
    k, pooled = rois.shape[0], (pooled_height, pooled_width)
    out = input.new_zeros((k, c, pooled_height, pooled_width))
    if k == 0 or input.numel() == 0:
        return out
    dtype = compute_dtype(rois)
    values = channels_last_rows(input, dtype)  # [N H W, C]
    finite = bool(torch.isfinite(values).all())
    for sl in box_slices(k):
        g = rotated_grid(rois[sl], spatial_scale, pooled, sampling_ratio, aligned, clockwise, radians)
        rows, cols = sample_windows(g, pooled, h, w)
        acc = torch.zeros((sl.stop - sl.start, pooled_height, pooled_width, c), dtype=dtype, device=input.device)
        for idx, blocks in _groups(g, rows, cols, pooled, h, w, c):
            b, total = idx.shape[0], 0.0
            for taps, weights, valid in blocks:
                read = values.index_select(0, taps.reshape(-1)).reshape(*taps.shape, c)  # [B, PH, PW, S, 4, C]
                if finite:  # off-map samples have weight 0 and read a cell of the map: one product per bin
                    wt = weights.reshape(b * pooled_height * pooled_width, 1, -1)
                    part = torch.bmm(wt, read.reshape(wt.shape[0], -1, c))
                    total = total + part.reshape(b, pooled_height, pooled_width, c)
                else:  # a sample off the map must not read (its cell may hold NaN): per-sample sums, then masked
                    sample = (weights[..., None] * read).sum(dim=-2)  # [B, PH, PW, S, C]
                    total = total + torch.where(valid, sample, 0.0).sum(dim=-2)
            acc.index_copy_(0, idx, total / _counts(g, idx, dtype))  # the groups are disjoint
        out[sl] = acc.permute(0, 3, 1, 2).to(out.dtype)
    return out


def roi_align_rotated_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                               pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool, radians: bool,
                               batch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Gradient with respect to the features, [N, C, H, W]: each bin's gradient / count goes to the 4 taps of each
    of its samples on the map, with their bilinear weights. ``index_add_`` runs in a fixed order on the CPU: the same
    bits on every run. On the CPU by the numba kernels when they take the call (:func:`jit_backward`)."""
    fast = jit_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise,
                        radians, batch_size, channels, height, width)
    if fast is not None:
        return fast
    shape = (batch_size, channels, height, width)
    if rois.shape[0] == 0 or batch_size * channels * height * width == 0:
        return grad.new_zeros(shape)
    dtype = compute_dtype(rois)
    pooled = (pooled_height, pooled_width)
    out = torch.zeros((batch_size * height * width, channels), dtype=dtype, device=grad.device)
    for sl in box_slices(rois.shape[0]):
        g = rotated_grid(rois[sl], spatial_scale, pooled, sampling_ratio, aligned, clockwise, radians)
        rows, cols = sample_windows(g, pooled, height, width)
        per_bin = grad[sl].to(dtype).permute(0, 2, 3, 1)  # [B, PH, PW, C]
        for idx, blocks in _groups(g, rows, cols, pooled, height, width, channels):
            gb = (per_bin[idx] / _counts(g, idx, dtype))[:, :, :, None, None, :]  # [B, PH, PW, 1, 1, C]
            for taps, weights, valid in blocks:
                part = torch.where(valid[..., None], weights[..., None] * gb, 0.0)  # [B, PH, PW, S, 4, C]
                out.index_add_(0, taps.reshape(-1), part.reshape(-1, channels))
    return out.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2).to(grad.dtype).contiguous()


# ---------------------------------------------------------------- the numba path (CPU)
def _kernels():
    """The numba kernels (:mod:`~roikit.ops.pytorch._numba_rotated`), or None when numba cannot be imported."""
    return numba_module("pytorch._numba_rotated")


def _jit_takes(channels: int, *tensors: Tensor) -> bool:
    """As :mod:`~roikit.ops.pytorch.jit`: numba there, the path on, CPU tensors, at least ``jit.MIN_CHANNELS``."""
    return jit._takes(*tensors) and _kernels() is not None and channels >= jit.MIN_CHANNELS


def _grids(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool,
           clockwise: bool, radians: bool, height: int, width: int):
    """``(slice, arrays)``, a slice of boxes at a time: the grid (:func:`rotated_grid`) and windows
    (:func:`sample_windows`) the kernels take, as numpy arrays."""
    for sl in box_slices(rois.shape[0]):
        g = rotated_grid(rois[sl], spatial_scale, pooled, sampling_ratio, aligned, clockwise, radians)
        (lo_y, n_y), (lo_x, n_x) = sample_windows(g, pooled, height, width)
        yield sl, tuple(a.contiguous().numpy() for a in (*g, lo_y, n_y, lo_x, n_x))


def jit_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                sampling_ratio: int, aligned: bool, clockwise: bool, radians: bool) -> Tensor | None:
    """The forward by the numba kernels, [K, C, PH, PW] in the map's dtype; None for a call they do not take (numba
    missing, ``ROIKIT_JIT=0`` or ``with jit.disabled():``, off the CPU, fewer than ``jit.MIN_CHANNELS`` channels, no
    box or an empty map): the plain path runs. Threads: ranges of boxes."""
    n, c, h, w = input.shape
    if not _jit_takes(c, input, rois) or rois.shape[0] == 0 or input.numel() == 0:
        return None
    dtype = compute_dtype(rois)
    values = channels_last_rows(input, dtype).contiguous().numpy()  # [N H W, C], as the plain path
    out = jit.fresh_tensor((rois.shape[0], c, pooled_height, pooled_width), dtype, zeros=False)
    for sl, grid in _grids(rois, spatial_scale, (pooled_height, pooled_width), sampling_ratio, aligned, clockwise,
                           radians, h, w):
        jit._run(_kernels().rotated_forward, sl.stop - sl.start, values, h, w, *grid, out[sl].numpy())
    return out.to(input.dtype)


def jit_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                 sampling_ratio: int, aligned: bool, clockwise: bool, radians: bool, batch_size: int, channels: int,
                 height: int, width: int) -> Tensor | None:
    """The gradient by the numba kernels, [N, C, H, W] in ``grad``'s dtype, or None (as :func:`jit_forward`).
    Threads: ranges of channels, each adding into its channels of channels-last rows [N H W, C]."""
    if (not _jit_takes(channels, grad, rois) or rois.shape[0] == 0
            or batch_size * channels * height * width == 0):
        return None
    dtype = compute_dtype(rois)
    rows = jit.fresh_tensor((batch_size * height * width, channels), dtype)
    for sl, grid in _grids(rois, spatial_scale, (pooled_height, pooled_width), sampling_ratio, aligned, clockwise,
                           radians, height, width):
        g = grad[sl].to(dtype).contiguous().numpy()
        jit._run(_kernels().rotated_backward, channels, g, height, width, *grid, rows.numpy())
    return rows.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2).to(grad.dtype).contiguous()
