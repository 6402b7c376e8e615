"""Deformable RoI pooling in Triton (mmcv's semantics): forward, the feature gradient (atomics, or deterministic
without them) and the offset gradient (always deterministic).

RoIAlign's kernels with ``aligned=True`` (``roi_align.py``), each bin's start moved by its offset first::

    start_y[k, p] = clamp(y1 + (gamma * roi_h) * offset[k, 1, p]) + ph * bin_h      (x: offset[k, 0], roi_w)

with ``roi_h = (box_y2 * scale - 0.5) - y1`` and the shifted corner clamped to +-2^60 cells (NaN: off the map), as
the reference ``roikit/ops/pytorch/deform_roi_pool.py`` computes it. Each bin's samples on the map form one run
(bisection), so the work stays bounded by the map whatever the box or its offsets.

The offset gradient of bin p: ``gamma * roi_h / (gh * gw) * sum_c grad[k, c, p] * sum_samples d f_c / dy``, with
``d f / dy = hx (v3 - v1) + lx (v4 - v2)`` where the sample moves with its start (``0 <= y`` and not at the last
row; else 0), and NaN for a bin whose samples read a non-finite cell. Each program writes its channel block's
partial sums; they are added up in a fixed order afterwards (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._deterministic import MAX_ENTRIES, entry_batches, entry_slots, gather_bins, store_tap_entries
from ._tiles import box_grid, box_tile
from .roi_align import (
    _align_bins,
    _align_box,
    _align_scatter,
    _axis_taps,
    _clamp_cells,
    _grid_arg,
    _load_taps,
    _sample_coord,
    _sample_run,
)

_MAX_START = tl.constexpr(2.0**60)  # the reference's MAX_START


@triton.jit
def _clamp_start(v):
    # v clamped to [-2^60, 2^60], NaN to 2^60 (off the map)
    v = tl.where(v != v, _MAX_START, v)
    return tl.where(v > _MAX_START, _MAX_START, tl.where(v < -_MAX_START, -_MAX_START, v))


@triton.jit
def _deform_box(rois_ptr, off_ptr, k, ps, spatial_scale, sampling_ratio, gamma, PH: tl.constexpr, PW: tl.constexpr,
                HAS_OFFSET: tl.constexpr):
    """Box k (aligned RoIAlign geometry, ``roi_align._align_box``) with its corner moved by each bin's offset (``ps``
    [BLOCK_P]): batch index, (corner_y, corner_x) [BLOCK_P], bin size and samples per bin, and the box's height and
    width in cells, which scale the offsets (mmcv's order: ``(gamma * roi_h) * offset``)."""
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, True)
    r = rois_ptr + k * 5
    y2 = _clamp_cells(tl.load(r + 4).to(tl.float32) * spatial_scale) - 0.5
    x2 = _clamp_cells(tl.load(r + 3).to(tl.float32) * spatial_scale) - 0.5
    roi_h = y2 - y1
    roi_w = x2 - x1
    corner_y = y1 + tl.zeros_like(ps).to(tl.float32)
    corner_x = x1 + tl.zeros_like(ps).to(tl.float32)
    if HAS_OFFSET:
        p_ok = ps < PH * PW
        base = off_ptr + k * (2 * PH * PW)
        ox = tl.load(base + ps, mask=p_ok, other=0.0).to(tl.float32)
        oy = tl.load(base + PH * PW + ps, mask=p_ok, other=0.0).to(tl.float32)
        corner_y = _clamp_start(y1 + (gamma * roi_h) * oy)
        corner_x = _clamp_start(x1 + (gamma * roi_w) * ox)
    return n, corner_y, corner_x, bin_h, bin_w, gh, gw, roi_h, roi_w


@triton.jit
def _deform_fwd_kernel(
    feat_ptr, rois_ptr, off_ptr, out_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale, sampling_ratio, gamma,
    PH: tl.constexpr, PW: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k, c, p] = (1 / max(gh * gw, 1)) * sum over the bin's samples (moved by its offset) of f(y, x)
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, cy, cx, bin_h, bin_w, gh, gw, _, _ = _deform_box(rois_ptr, off_ptr, k, ps, spatial_scale, sampling_ratio,
                                                        gamma, PH, PW, HAS_OFFSET)
    val, _ = _align_bins(feat_ptr + n * s_n, C, H, W, s_c, s_h, s_w, cy, cx, bin_h, bin_w, gh, gw, cs, ps,
                         PH, PW, False, BLOCK_C, BLOCK_P)
    tl.store(out_ptr + offs, val, mask=m)


@triton.jit
def _deform_bwd_kernel(
    grad_ptr, rois_ptr, off_ptr, gin_ptr, C, H, W, g_sn, g_sc, g_sh, g_sw, spatial_scale, sampling_ratio, gamma,
    PH: tl.constexpr, PW: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_input[n_k, c, taps] += weight * grad[k, c, p] / (gh * gw), with float32 atomics
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, cy, cx, bin_h, bin_w, gh, gw, _, _ = _deform_box(rois_ptr, off_ptr, k, ps, spatial_scale, sampling_ratio,
                                                        gamma, PH, PW, HAS_OFFSET)
    g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
    _align_scatter(gin_ptr + n * g_sn, C, H, W, g_sc, g_sh, g_sw, cy, cx, bin_h, bin_w, gh, gw, cs, ps, g, offs,
                   PH, PW, False)


@triton.jit
def _deform_offset_grad_kernel(
    feat_ptr, grad_ptr, rois_ptr, off_ptr, part_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale, sampling_ratio,
    gamma, PH: tl.constexpr, PW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # part[k, cb, 0, p] = gamma * roi_w / (gh * gw) * sum_{c in block cb} grad[k, c, p] * sum_samples d f_c / dx
    # part[k, cb, 1, p]: the same for y (roi_h); NaN where a sample of the bin reads a non-finite cell
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, cy, cx, bin_h, bin_w, gh, gw, roi_h, roi_w = _deform_box(rois_ptr, off_ptr, k, ps, spatial_scale,
                                                                sampling_ratio, gamma, PH, PW, True)
    g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
    c_ok = cs < C
    p_ok = ps < PH * PW
    y0 = cy + (ps // PW).to(tl.float32) * bin_h
    x0 = cx + (ps % PW).to(tl.float32) * bin_w
    gh_f = tl.maximum(gh, 1).to(tl.float32)
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    lo_y, hi_y = _sample_run(y0, bin_h, gh, H)
    lo_x, hi_x = _sample_run(x0, bin_w, gw, W)
    count_y = tl.where(p_ok, hi_y - lo_y, 0)
    count_x = tl.where(p_ok, hi_x - lo_x, 0)
    chan = feat_ptr + n * s_n + cs.to(tl.int64)[:, None] * s_c
    d_y = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    d_x = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    bad = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.int32)
    for ty in range(tl.max(count_y)):
        y = _sample_coord(y0, bin_h, gh_f, lo_y + ty)
        y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
        y_ok = y_in & (ty < count_y)
        moves_y = (y >= 0.0) & (y_hi > y_lo)  # between the first and the last row centre
        r_lo = y_lo * s_h
        r_hi = y_hi * s_h
        for tx in range(tl.max(count_x)):
            x = _sample_coord(x0, bin_w, gw_f, lo_x + tx)
            x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
            moves_x = (x >= 0.0) & (x_hi > x_lo)
            mk = c_ok[:, None] & (y_ok & x_in & (tx < count_x))[None, :]
            v1, v2, v3, v4 = _load_taps(chan, r_lo, r_hi, x_lo, x_hi, s_w, mk)
            val = (hy * hx)[None, :] * v1 + (hy * lx)[None, :] * v2 + (ly * hx)[None, :] * v3 + (ly * lx)[None, :] * v4
            bad = tl.maximum(bad, ((val != val) | (tl.abs(val) == float("inf"))).to(tl.int32))
            d_y += tl.where(moves_y[None, :], hx[None, :] * (v3 - v1) + lx[None, :] * (v4 - v2), 0.0)
            d_x += tl.where(moves_x[None, :], hy[None, :] * (v2 - v1) + ly[None, :] * (v4 - v3), 0.0)
    scale = tl.div_rn(gamma, gh_f * gw_f)
    s_y = tl.sum(g * d_y, axis=0) * (scale * roi_h)
    s_x = tl.sum(g * d_x, axis=0) * (scale * roi_w)
    any_bad = tl.max(bad, axis=0) > 0
    s_y = tl.where(any_bad, float("nan"), s_y)
    s_x = tl.where(any_bad, float("nan"), s_x)
    part = part_ptr + ((k * tl.num_programs(1) + tl.program_id(1)) * 2) * (PH * PW)
    tl.store(part + ps, s_x, mask=p_ok)
    tl.store(part + PH * PW + ps, s_y, mask=p_ok)


@triton.jit
def _deform_runs_kernel(
    rois_ptr, off_ptr, lo_y_ptr, lo_x_ptr, win_ptr, H, W, spatial_scale, sampling_ratio, gamma,
    PH: tl.constexpr, PW: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # For box k: lo_y[k, p] (lo_x[k, p]), where bin p's run of samples on the map starts, and the window
    # win[k] = (max_p (hi - lo) along y, along x): the sample slots the deterministic backward gives each bin.
    k = tl.program_id(0).to(tl.int64)
    ps = tl.arange(0, BLOCK_P)
    p_ok = ps < PH * PW
    n, cy, cx, bin_h, bin_w, gh, gw, _, _ = _deform_box(rois_ptr, off_ptr, k, ps, spatial_scale, sampling_ratio,
                                                        gamma, PH, PW, HAS_OFFSET)
    lo_y, hi_y = _sample_run(cy + (ps // PW).to(tl.float32) * bin_h, bin_h, gh, H)
    lo_x, hi_x = _sample_run(cx + (ps % PW).to(tl.float32) * bin_w, bin_w, gw, W)
    tl.store(lo_y_ptr + k * (PH * PW) + ps, lo_y, mask=p_ok)
    tl.store(lo_x_ptr + k * (PH * PW) + ps, lo_x, mask=p_ok)
    tl.store(win_ptr + k * 2, tl.max(tl.where(p_ok, hi_y - lo_y, 0)))
    tl.store(win_ptr + k * 2 + 1, tl.max(tl.where(p_ok, hi_x - lo_x, 0)))


@triton.jit
def _deform_entries_kernel(
    rois_ptr, off_ptr, lo_y_ptr, lo_x_ptr, win_ptr, base_ptr, key_ptr, src_ptr, w_ptr, k0, slot0, width,
    num_cells, H, W, spatial_scale, sampling_ratio, gamma,
    PH: tl.constexpr, PW: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    # For box k = k0 + pid0 with window (WY, WX) and its slots j = (p * WY + ty) * WX + tx in [slot0, slot0 + width):
    # sample (lo_y[p] + ty, lo_x[p] + tx)'s 4 taps as entries (cell n * H * W + y * W + x, bin k * P + p,
    # weight / (gh * gw)) at 4 (base[pid0] + j - slot0) + t. A slot past the bin's grid, a tap off the map or of
    # weight 0 gets the key num_cells = N * H * W (unused).
    k, p, ty, tx, j_ok, slot = entry_slots(win_ptr, base_ptr, k0, slot0, width, PH, PW, BLOCK)
    n, cy, cx, bin_h, bin_w, gh, gw, _, _ = _deform_box(rois_ptr, off_ptr, k, p, spatial_scale, sampling_ratio,
                                                        gamma, PH, PW, HAS_OFFSET)
    iy = tl.load(lo_y_ptr + k * (PH * PW) + p, mask=j_ok, other=0) + ty
    ix = tl.load(lo_x_ptr + k * (PH * PW) + p, mask=j_ok, other=0) + tx
    y = _sample_coord(cy + (p // PW).to(tl.float32) * bin_h, bin_h, tl.maximum(gh, 1).to(tl.float32), iy)
    x = _sample_coord(cx + (p % PW).to(tl.float32) * bin_w, bin_w, tl.maximum(gw, 1).to(tl.float32), ix)
    y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
    x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
    ok = j_ok & (iy < gh) & (ix < gw) & y_in & x_in
    scale = tl.div_rn(1.0, tl.maximum(gh, 1).to(tl.float32) * tl.maximum(gw, 1).to(tl.float32))
    cell0 = n * H * W
    src = k * (PH * PW) + p
    store_tap_entries(key_ptr, src_ptr, w_ptr, slot * 4, j_ok, ok, cell0, W, num_cells, src, scale,
                      y_lo, y_hi, x_lo, x_hi, hy, ly, hx, lx)


def deform_roi_pool_forward(input: Tensor, rois: Tensor, offset: Tensor | None, spatial_scale: float,
                            pooled_height: int, pooled_width: int, sampling_ratio: int, gamma: float) -> Tensor:
    """Same contract as ``roikit.ops.pytorch.deform_roi_pool.deform_roi_pool_forward``."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_empty((k, c, pooled_height, pooled_width))
    if k == 0 or c == 0:
        return out
    rois = rois.contiguous()
    has_offset = offset is not None
    off = offset.contiguous() if has_offset else rois
    grid, tile = box_grid(k, c, pooled_height * pooled_width)
    _deform_fwd_kernel[grid](
        input, rois, off, out, c, h, w, *input.stride(), float(spatial_scale), _grid_arg(sampling_ratio),
        float(gamma), PH=pooled_height, PW=pooled_width, HAS_OFFSET=has_offset, **tile,
    )
    return out


def deform_roi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, offset: Tensor | None, spatial_scale: float,
                             pooled_height: int, pooled_width: int, sampling_ratio: int, gamma: float,
                             offset_grad: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    """Gradients with respect to the features [N, C, H, W] (grad's dtype, float32 accumulation) and, with
    ``offset_grad`` and an offset, the offset [K, 2, PH, PW] (offset's dtype; else an empty tensor).

    ``deterministic=False``: the feature gradient with float32 atomics. ``True``: every sample's taps become sorted
    entries that each cell adds up in a fixed order (``_deterministic.py``). The offset gradient never uses atomics.
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    offset_grad = offset_grad and offset is not None
    gin = torch.zeros((n, c, h, w), dtype=torch.float32, device=grad.device)
    grad_offset = offset.new_zeros(offset.shape) if offset_grad else grad.new_zeros((0,))
    if k == 0 or gin.numel() == 0:
        return gin.to(grad.dtype), grad_offset
    grad, rois = grad.contiguous(), rois.contiguous()
    has_offset = offset is not None
    off = offset.contiguous() if has_offset else rois
    bins = pooled_height * pooled_width
    settings = (float(spatial_scale), _grid_arg(sampling_ratio), float(gamma))
    grid, tile = box_grid(k, c, bins)
    if deterministic:
        _deterministic_into(gin, grad, rois, off, has_offset, settings, pooled_height, pooled_width)
    else:
        _deform_bwd_kernel[grid](
            grad, rois, off, gin, c, h, w, *gin.stride(), *settings, PH=pooled_height, PW=pooled_width,
            HAS_OFFSET=has_offset, **tile,
        )
    if offset_grad:
        part = torch.empty((k, grid[1], 2, bins), dtype=torch.float32, device=grad.device)  # a channel block's sums
        _deform_offset_grad_kernel[grid](
            input, grad, rois, off, part, c, h, w, *input.stride(), *settings, PH=pooled_height, PW=pooled_width,
            **tile,
        )
        grad_offset = part.sum(dim=1).reshape(offset.shape).to(offset.dtype)  # a fixed order: no atomics
    return gin.to(grad.dtype), grad_offset


def _deterministic_into(gin: Tensor, grad: Tensor, rois: Tensor, off: Tensor, has_offset: bool, settings,
                        pooled_height: int, pooled_width: int) -> None:
    """The feature gradient added into ``gin`` [N, C, H, W] float32 in an order fixed by the boxes (launch by launch,
    each cell's entries in generation order). Box k gets ``P * WY * WX`` sample slots, its window ``(WY, WX)`` the
    longest run of samples on the map of any of its bins: bounded by the map, not by the box or its offsets.
    Memory: at most ``MAX_ENTRIES`` entries at a time."""
    n, c, h, w = gin.shape
    k = rois.shape[0]
    bins = pooled_height * pooled_width
    lo_y = torch.empty((k, bins), dtype=torch.int64, device=gin.device)
    lo_x = torch.empty((k, bins), dtype=torch.int64, device=gin.device)
    window = torch.empty((k, 2), dtype=torch.int64, device=gin.device)
    _deform_runs_kernel[(k,)](
        rois, off, lo_y, lo_x, window, h, w, *settings, PH=pooled_height, PW=pooled_width, HAS_OFFSET=has_offset,
        BLOCK_P=triton.next_power_of_2(bins),
    )
    for b in entry_batches(window, bins, MAX_ENTRIES, 4, gin.device):  # 4 taps a sample slot
        _deform_entries_kernel[b.grid](
            rois, off, lo_y, lo_x, window, b.base, b.keys, b.src, b.weight, b.k0, b.slot0, b.width, n * h * w, h, w,
            *settings, PH=pooled_height, PW=pooled_width, HAS_OFFSET=has_offset, BLOCK=b.block,
        )
        gather_bins(gin, b.keys, b.src, b.weight, None, grad, None, accumulate=not b.first)
