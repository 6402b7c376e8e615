"""Position-sensitive RoI pooling (R-FCN) in Triton: ``ps_roi_align`` and ``ps_roi_pool``, forward, backward with
atomics, and a deterministic backward without them.

The input has ``C = C' * PH * PW`` channels; bin ``p = ph * PW + pw`` of output channel ``c`` reads only input
channel ``c * PH * PW + p`` (torchvision's mapping). See ``roikit/ops/pytorch/ps_roi.py``, the reference.

``ps_roi_align``: RoIAlign's average with ``aligned=True`` geometry (``roi_align.py``'s helpers: the box shifted by
-0.5 cell, no minimum size, ``gh = sampling_ratio`` or ``ceil(bin_h)``, a sample outside ``[-1, H] x [-1, W]`` is 0)::

    out[k, c, ph, pw] = 1 / max(gh * gw, 1) * sum_{iy, ix} f_{c P + p}(y, x)

Only each bin's run of samples on the map is read (bisection), so the work is bounded by the map, not the box.

``ps_roi_pool``: the mean of whole cells. Corners rounded half away from zero, extent ``max(end - start, 1)`` cells,
float bin ``b = extent / P``, bin ``p`` reads ``[start + floor(p b), start + ceil((p + 1) b))`` clipped to
``[0, size - 1]`` (torchvision's forward never reads the last row and column; ``geometry.ps_roi_pool_edges``)::

    out[k, c, ph, pw] = sum of the bin's cells of channel c P + p / their count     (0 for an empty bin)

A bin is clipped to the map, so it reads at most ``(H - 1) x (W - 1)`` cells whatever the box.

Backward: each bin's gradient goes back to the cells it read, in channel ``c P + p`` (atomics), or, deterministic,
as entries sorted by cell and added up in a fixed order (``_deterministic.gather_bins``). The trick that lets the
shared gather serve position-sensitive maps: ``grad_input`` [N, C' P, H, W] viewed as [N, C', P H, W] has one
"cell" per (bin p, y, x), and each entry names the bin whose gradient it carries, so every channel c' of that cell
reads ``grad[k, c', p]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._deterministic import MAX_ENTRIES, entry_batches, entry_slots, gather_bins
from ._tiles import box_grid, box_tile, load_box
from .roi_align import (
    _align_box,
    _axis_taps,
    _grid_arg,
    _roi_align_entries_kernel,
    _sample_coord,
    _sample_run,
    sample_runs,
)
from .roi_pool import _clamp_cells, _round_half_away


# ---------------------------------------------------------------- ps_roi_align
@triton.jit
def _ps_align_runs(rois_ptr, k, ps, spatial_scale, sampling_ratio, H, W, PH: tl.constexpr, PW: tl.constexpr):
    """Box k's batch index and, per bin ``ps`` [BLOCK_P]: start (y0, x0), bin size, samples per axis as floats at
    least 1 (gh_f, gw_f: they divide), and the run of samples on the map ``[lo, lo + count)`` per axis (aligned
    geometry)."""
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, True)
    p_ok = ps < PH * PW
    y0 = y1 + (ps // PW).to(tl.float32) * bin_h
    x0 = x1 + (ps % PW).to(tl.float32) * bin_w
    lo_y, hi_y = _sample_run(y0, bin_h, gh, H)
    lo_x, hi_x = _sample_run(x0, bin_w, gw, W)
    count_y = tl.where(p_ok, hi_y - lo_y, 0)
    count_x = tl.where(p_ok, hi_x - lo_x, 0)
    gh_f = tl.maximum(gh, 1).to(tl.float32)
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    return n, y0, x0, bin_h, bin_w, gh_f, gw_f, lo_y, count_y, lo_x, count_x


@triton.jit
def _ps_align_fwd_kernel(
    feat_ptr, rois_ptr, out_ptr, CO, H, W, s_n, s_c, s_h, s_w, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k, c, p] = 1 / max(gh gw, 1) * sum over the bin's samples on the map of f_{c P + p}(y, x); the 4 taps of a
    # sample are read even with weight 0 (0 * inf = NaN, as the reference and torchvision)
    k, cs, ps, offs, m = box_tile(CO, PH, PW, BLOCK_C, BLOCK_P)
    n, y0, x0, bin_h, bin_w, gh_f, gw_f, lo_y, count_y, lo_x, count_x = _ps_align_runs(
        rois_ptr, k, ps, spatial_scale, sampling_ratio, H, W, PH, PW)
    chan = feat_ptr + n * s_n + (cs.to(tl.int64)[:, None] * (PH * PW) + ps[None, :]) * s_c  # [BLOCK_C, BLOCK_P]
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for ty in range(tl.max(count_y)):  # the tile's longest run; shorter ones are masked
        y = _sample_coord(y0, bin_h, gh_f, lo_y + ty)
        y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
        y_ok = y_in & (ty < count_y)
        for tx in range(tl.max(count_x)):
            x = _sample_coord(x0, bin_w, gw_f, lo_x + tx)
            x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
            t = m & (y_ok & x_in & (tx < count_x))[None, :]
            v1 = tl.load(chan + (y_lo * s_h + x_lo * s_w)[None, :], mask=t, other=0.0).to(tl.float32)
            v2 = tl.load(chan + (y_lo * s_h + x_hi * s_w)[None, :], mask=t, other=0.0).to(tl.float32)
            v3 = tl.load(chan + (y_hi * s_h + x_lo * s_w)[None, :], mask=t, other=0.0).to(tl.float32)
            v4 = tl.load(chan + (y_hi * s_h + x_hi * s_w)[None, :], mask=t, other=0.0).to(tl.float32)
            acc += (hy * hx)[None, :] * v1 + (hy * lx)[None, :] * v2 + (ly * hx)[None, :] * v3 + (ly * lx)[None, :] * v4
    tl.store(out_ptr + offs, tl.div_rn(acc, gh_f * gw_f), mask=m)


@triton.jit
def _ps_align_bwd_kernel(
    grad_ptr, rois_ptr, gin_ptr, CO, H, W, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_input[n_k, c P + p, taps] += weight * grad[k, c, p] / max(gh gw, 1), float32 atomics (contiguous grad_input)
    k, cs, ps, offs, m = box_tile(CO, PH, PW, BLOCK_C, BLOCK_P)
    n, y0, x0, bin_h, bin_w, gh_f, gw_f, lo_y, count_y, lo_x, count_x = _ps_align_runs(
        rois_ptr, k, ps, spatial_scale, sampling_ratio, H, W, PH, PW)
    g = tl.div_rn(tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32), gh_f * gw_f)
    chan = gin_ptr + ((n * CO * (PH * PW) + cs.to(tl.int64)[:, None] * (PH * PW) + ps[None, :]) * H) * W
    for ty in range(tl.max(count_y)):
        y = _sample_coord(y0, bin_h, gh_f, lo_y + ty)
        y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
        y_ok = y_in & (ty < count_y)
        for tx in range(tl.max(count_x)):
            x = _sample_coord(x0, bin_w, gw_f, lo_x + tx)
            x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
            t = m & (y_ok & x_in & (tx < count_x))[None, :]
            tl.atomic_add(chan + (y_lo * W + x_lo)[None, :], (hy * hx)[None, :] * g, mask=t, sem="relaxed")
            tl.atomic_add(chan + (y_lo * W + x_hi)[None, :], (hy * lx)[None, :] * g, mask=t, sem="relaxed")
            tl.atomic_add(chan + (y_hi * W + x_lo)[None, :], (ly * hx)[None, :] * g, mask=t, sem="relaxed")
            tl.atomic_add(chan + (y_hi * W + x_hi)[None, :], (ly * lx)[None, :] * g, mask=t, sem="relaxed")


def ps_roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         sampling_ratio: int) -> Tensor:
    """Same contract as ``roikit.ops.pytorch.ps_roi.ps_roi_align_forward``: [K, C', PH, PW]."""
    return _forward(_ps_align_fwd_kernel, input, rois, spatial_scale, pooled_height, pooled_width,
                    _grid_arg(sampling_ratio))


def ps_roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                          sampling_ratio: int, batch_size: int, channels: int, height: int, width: int,
                          deterministic: bool) -> Tensor:
    """Gradient with respect to the features, [N, C, H, W] in grad's dtype (float32 accumulation).

    ``deterministic=True``: RoIAlign's entries (aligned geometry, ``roi_align._roi_align_entries_kernel``), each
    moved to its bin's channel plane and added up in a fixed order: the same bits on every run. Memory: at most
    ``MAX_ENTRIES`` entries at a time; a box's entries cover its samples on the map only.
    """
    return _backward(_ps_align_bwd_kernel, _ps_align_deterministic_into, grad, rois, spatial_scale, pooled_height,
                     pooled_width, (batch_size, channels, height, width), deterministic, _grid_arg(sampling_ratio))


def _ps_align_deterministic_into(gin: Tensor, grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                                 pooled_width: int, ratio: int) -> None:
    """ps_roi_align's gradient added into ``gin`` [N, C, H, W] float32 in a fixed order (see the backward)."""
    batch_size, channels, height, width = gin.shape
    pooled = pooled_height * pooled_width
    c_out = channels // pooled
    lo_y, lo_x, window = sample_runs(rois, height, width, spatial_scale, pooled_height, pooled_width, ratio, True)
    hw = height * width
    planes = gin.view(batch_size, c_out, pooled * height, width)  # one "cell" per (bin, y, x): see the docstring
    # 4 taps a sample slot; the tag (the sample index) is written by the kernel but only max pooling reads it
    for b in entry_batches(window, pooled, MAX_ENTRIES, 4, gin.device, tag=True):
        _roi_align_entries_kernel[b.grid](
            rois, lo_y, lo_x, window, b.base, b.keys, b.src, b.weight, b.tag, b.k0, b.slot0, b.width,
            batch_size * hw, height, width, float(spatial_scale), ratio, PH=pooled_height, PW=pooled_width,
            ALIGNED=True, POOL_MAX=False, BLOCK=b.block,
        )
        # key n H W + pixel -> the bin's plane: (n P + p) H W + pixel (unused entries: past the last cell)
        image = b.keys // hw
        keys = torch.where(b.keys < batch_size * hw, (image * pooled + b.src % pooled) * hw + (b.keys - image * hw),
                           planes.numel() // c_out)
        gather_bins(planes, keys, b.src, b.weight, None, grad, None, accumulate=not b.first)


# ---------------------------------------------------------------- ps_roi_pool
@triton.jit
def _ps_pool_axis(lo, hi, p, spatial_scale, size, P: tl.constexpr):
    """Cells [b0, b1) of bins p along one axis for box edges lo, hi in pixels (torchvision's PSRoIPool rule: see the
    module docstring), clipped to [0, size - 1]: at most the map, whatever the box. Coordinates in cells are
    clamped to +-2^52 before they become integers."""
    start = _round_half_away(_clamp_cells(lo * spatial_scale))
    end = _round_half_away(_clamp_cells(hi * spatial_scale))
    step = tl.div_rn(tl.maximum(end - start, 1).to(tl.float32), P * 1.0)
    b0 = start + tl.floor(p.to(tl.float32) * step).to(tl.int64)
    b1 = start + tl.ceil((p + 1).to(tl.float32) * step).to(tl.int64)
    last = size - 1  # the launchers run on a map of at least 1 x 1
    return tl.minimum(tl.maximum(b0, 0), last), tl.minimum(tl.maximum(b1, 0), last)


@triton.jit
def _ps_pool_bins(rois_ptr, k, ps, spatial_scale, H, W, PH: tl.constexpr, PW: tl.constexpr):
    """Box k's batch index and the cell rectangle ``[hs, he) x [ws, we)`` of every bin ``ps`` [BLOCK_P]."""
    n, x1, y1, x2, y2 = load_box(rois_ptr, k)
    hs, he = _ps_pool_axis(y1, y2, (ps // PW).to(tl.int64), spatial_scale, H, PH)
    ws, we = _ps_pool_axis(x1, x2, (ps % PW).to(tl.int64), spatial_scale, W, PW)
    return n, hs, he, ws, we


@triton.jit
def _ps_pool_fwd_kernel(
    feat_ptr, rois_ptr, out_ptr, CO, H, W, s_n, s_c, s_h, s_w, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k, c, p] = sum_{y in [hs, he), x in [ws, we)} feat[n_k, c P + p, y, x] / area, 0 for an empty bin
    k, cs, ps, offs, m = box_tile(CO, PH, PW, BLOCK_C, BLOCK_P)
    p_ok = ps < PH * PW
    n, hs, he, ws, we = _ps_pool_bins(rois_ptr, k, ps, spatial_scale, H, W, PH, PW)
    rows = tl.max(tl.where(p_ok, he - hs, 0))  # the tile's tallest / widest bin: at most H - 1 / W - 1
    cols = tl.max(tl.where(p_ok, we - ws, 0))
    chan = feat_ptr + n * s_n + (cs.to(tl.int64)[:, None] * (PH * PW) + ps[None, :]) * s_c
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for dy in range(rows):
        y = hs + dy
        y_ok = y < he
        for dx in range(cols):
            x = ws + dx
            t = m & (y_ok & (x < we))[None, :]
            acc += tl.load(chan + (y * s_h + x * s_w)[None, :], mask=t, other=0.0).to(tl.float32)
    area = ((he - hs) * (we - ws)).to(tl.float32)
    out = tl.where((area > 0)[None, :], tl.div_rn(acc, tl.maximum(area, 1.0)[None, :]), 0.0)
    tl.store(out_ptr + offs, out, mask=m)


@triton.jit
def _ps_pool_bwd_kernel(
    grad_ptr, rois_ptr, gin_ptr, CO, H, W, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_input[n_k, c P + p, y, x] += grad[k, c, p] / area over the bin's cells (float32 atomics)
    k, cs, ps, offs, m = box_tile(CO, PH, PW, BLOCK_C, BLOCK_P)
    p_ok = ps < PH * PW
    n, hs, he, ws, we = _ps_pool_bins(rois_ptr, k, ps, spatial_scale, H, W, PH, PW)
    rows = tl.max(tl.where(p_ok, he - hs, 0))
    cols = tl.max(tl.where(p_ok, we - ws, 0))
    area = ((he - hs) * (we - ws)).to(tl.float32)
    g = tl.div_rn(tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32), tl.maximum(area, 1.0)[None, :])
    chan = gin_ptr + ((n * CO * (PH * PW) + cs.to(tl.int64)[:, None] * (PH * PW) + ps[None, :]) * H) * W
    for dy in range(rows):
        y = hs + dy
        y_ok = y < he
        for dx in range(cols):
            x = ws + dx
            t = m & (y_ok & (x < we))[None, :]
            tl.atomic_add(chan + (y * W + x)[None, :], g, mask=t, sem="relaxed")


@triton.jit
def _ps_pool_window_kernel(rois_ptr, win_ptr, H, W, spatial_scale, PH: tl.constexpr, PW: tl.constexpr,
                           BLOCK_P: tl.constexpr):
    # win[k] = (the tallest bin of box k, its widest bin) in cells: the entry slots the deterministic backward gives it
    k = tl.program_id(0).to(tl.int64)
    ps = tl.arange(0, BLOCK_P)
    p_ok = ps < PH * PW
    n, hs, he, ws, we = _ps_pool_bins(rois_ptr, k, ps, spatial_scale, H, W, PH, PW)
    tl.store(win_ptr + k * 2, tl.max(tl.where(p_ok, he - hs, 0)))
    tl.store(win_ptr + k * 2 + 1, tl.max(tl.where(p_ok, we - ws, 0)))


@triton.jit
def _ps_pool_entries_kernel(
    rois_ptr, win_ptr, base_ptr, key_ptr, src_ptr, w_ptr, k0, slot0, span, num_cells, H, W, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, BLOCK: tl.constexpr,
):
    # For box k = k0 + pid0 with window (WY, WX) and its slots j = (p * WY + dy) * WX + dx in [slot0, slot0 + span):
    # the entry (cell (n P + p) H W + y W + x with y = hs[p] + dy, x = ws[p] + dx; bin k P + p; weight 1 / area) at
    # base[pid0] + j - slot0, or the key num_cells (unused) where (y, x) lies past the bin.
    k, p, dy, dx, ok, e = entry_slots(win_ptr, base_ptr, k0, slot0, span, PH, PW, BLOCK)
    n, hs, he, ws, we = _ps_pool_bins(rois_ptr, k, p, spatial_scale, H, W, PH, PW)
    y = hs + dy
    x = ws + dx
    used = (y < he) & (x < we)
    area = ((he - hs) * (we - ws)).to(tl.float32)
    tl.store(key_ptr + e, tl.where(used, ((n * (PH * PW) + p) * H + y) * W + x, num_cells), mask=ok)
    tl.store(src_ptr + e, k * (PH * PW) + p, mask=ok)
    tl.store(w_ptr + e, tl.div_rn(1.0, tl.maximum(area, 1.0)), mask=ok)


def ps_roi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int) -> Tensor:
    """Same contract as ``roikit.ops.pytorch.ps_roi.ps_roi_pool_forward``: [K, C', PH, PW]."""
    return _forward(_ps_pool_fwd_kernel, input, rois, spatial_scale, pooled_height, pooled_width)


def ps_roi_pool_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         batch_size: int, channels: int, height: int, width: int, deterministic: bool) -> Tensor:
    """Each bin's gradient / its area onto every cell it averaged: [N, C, H, W] in grad's dtype.

    ``deterministic=True``: one entry per (bin, cell), sorted by cell and added up in a fixed order. A box gets
    ``P * WY * WX`` slots, its window the tallest and widest of its bins (clipped to the map): at most
    ``P (H - 1) (W - 1)`` whatever the box. Memory: at most ``MAX_ENTRIES`` entries at a time.
    """
    return _backward(_ps_pool_bwd_kernel, _ps_pool_deterministic_into, grad, rois, spatial_scale, pooled_height,
                     pooled_width, (batch_size, channels, height, width), deterministic)


def _ps_pool_deterministic_into(gin: Tensor, grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                                pooled_width: int) -> None:
    """ps_roi_pool's gradient added into ``gin`` [N, C, H, W] float32 in a fixed order (see the backward)."""
    batch_size, channels, height, width = gin.shape
    k, pooled = rois.shape[0], pooled_height * pooled_width
    window = torch.empty((k, 2), dtype=torch.int64, device=gin.device)
    _ps_pool_window_kernel[(k,)](rois, window, height, width, float(spatial_scale), PH=pooled_height,
                                 PW=pooled_width, BLOCK_P=triton.next_power_of_2(pooled))
    planes = gin.view(batch_size, channels // pooled, pooled * height, width)  # one "cell" per (bin, y, x)
    num_cells = batch_size * pooled * height * width
    for b in entry_batches(window, pooled, MAX_ENTRIES, 1, gin.device):  # one entry a cell slot
        _ps_pool_entries_kernel[b.grid](
            rois, window, b.base, b.keys, b.src, b.weight, b.k0, b.slot0, b.width, num_cells, height, width,
            float(spatial_scale), PH=pooled_height, PW=pooled_width, BLOCK=b.block,
        )
        gather_bins(planes, b.keys, b.src, b.weight, None, grad, None, accumulate=not b.first)


# ---------------------------------------------------------------- the launchers' shared frame
def _forward(kernel, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
             *args) -> Tensor:
    """[K, C', PH, PW] (``C' = C // (PH * PW)``) from a forward kernel over the boxes' tiles; ``args`` follow
    ``spatial_scale`` in its signature."""
    n, c, h, w = input.shape
    k, pooled = rois.shape[0], pooled_height * pooled_width
    c_out = c // pooled
    out = input.new_zeros((k, c_out, pooled_height, pooled_width))
    if k == 0 or c_out == 0 or input.numel() == 0:
        return out
    grid, tile = box_grid(k, c_out, pooled)
    kernel[grid](input, rois.contiguous(), out, c_out, h, w, *input.stride(), float(spatial_scale), *args,
                 PH=pooled_height, PW=pooled_width, **tile)
    return out


def _backward(atomic_kernel, deterministic_into, grad: Tensor, rois: Tensor, spatial_scale: float,
              pooled_height: int, pooled_width: int, shape: tuple[int, int, int, int], deterministic: bool,
              *args) -> Tensor:
    """The feature gradient of ``shape`` [N, C, H, W] in grad's dtype, accumulated in float32 by ``atomic_kernel``
    over the boxes' tiles or by ``deterministic_into(gin, grad, rois, spatial_scale, PH, PW, *args)``; ``args``
    follow ``spatial_scale`` in both."""
    gin = torch.zeros(shape, dtype=torch.float32, device=grad.device)
    batch_size, channels, height, width = shape
    k, pooled = rois.shape[0], pooled_height * pooled_width
    c_out = channels // pooled
    if k == 0 or c_out == 0 or gin.numel() == 0:
        return gin.to(grad.dtype)
    grad, rois = grad.contiguous(), rois.contiguous()
    if deterministic:
        deterministic_into(gin, grad, rois, spatial_scale, pooled_height, pooled_width, *args)
    else:
        grid, tile = box_grid(k, c_out, pooled)
        atomic_kernel[grid](grad, rois, gin, c_out, height, width, float(spatial_scale), *args, PH=pooled_height,
                            PW=pooled_width, **tile)
    return gin.to(grad.dtype)
