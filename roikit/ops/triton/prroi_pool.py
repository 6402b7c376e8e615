"""Precise RoI Pooling in Triton: forward, feature gradient (atomic or deterministic) and box gradient.

The map is the surface ``f(y, x) = sum_ij F[i, j] hat(y - i) hat(x - j)``, ``hat(t) = max(0, 1 - |t|)``, 0 beyond
the map; bin (ph, pw) of a box is its exact integral over the bin divided by the bin's area. Per axis, with
``lo = s + p b``, ``hi = min(lo + b, e)``, ``b = max(e - s, 0) / P`` (box edges s, e in cells, clamped to +-2^52,
minus 0.5 when aligned):

    out[c, ph, pw] = sum_ij F[c, i, j] Wy[ph, i] Wx[pw, j],     W[p, i] = mean of hat(t - i) over t in [lo, hi]

computed by pieces between the tent's kinks (``_hat_mean``, as the reference's ``hat_mean``): no cancellation for a
tiny bin. Only cells ``floor(lo) <= i <= ceil(hi)`` have weight; each bin reads those on the map, at most
``min(floor(b) + 3, size)`` per axis, whatever the box. A cell is read only where both its weights are non-zero, so a
non-finite cell spreads only to the bins that weigh it. The box gradient differentiates W in lo and hi
(``(mean - hat(lo - i)) / b`` and ``(hat(hi - i) - mean) / b``), then through ``d lo / d s = 1 - p / P``,
``d hi / d s = 1 - (p + 1) / P`` and the mirror for e, times the scale.
See ``roikit/ops/pytorch/prroi_pool.py``, the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..geometry import MAX_CELLS
from ._deterministic import MAX_ENTRIES, entry_batches, entry_slots, gather_bins
from ._tiles import blocks, box_grid, box_tile, load_box, store_box_grad
from .roi_align import _clamp_cells


@triton.jit
def _hat(t):
    return tl.maximum(1.0 - tl.abs(t), 0.0)


@triton.jit
def _hat_mean(t0, t1):
    """The mean of hat over [t0, t1] (t0 <= t1) and its derivatives with respect to t0 and t1.

    hat is linear between its kinks -1, 0, 1, and a linear function's mean over an interval is its value at the
    middle, so mean = sum over the pieces between the kinks of (length x hat(middle)) / (t1 - t0): no cancellation
    for a tiny interval, unlike (HAT(t1) - HAT(t0)) / (t1 - t0). d/dt0 = (mean - hat(t0)) / (t1 - t0),
    d/dt1 = (hat(t1) - mean) / (t1 - t0), or hat'(middle) / 2 each when no kink lies inside (stable when tiny).
    """
    e1 = tl.minimum(tl.maximum(t0, -1.0), t1)
    e2 = tl.minimum(tl.maximum(t0, 0.0), t1)
    e3 = tl.minimum(tl.maximum(t0, 1.0), t1)
    total = ((e1 - t0) * _hat(0.5 * (t0 + e1)) + (e2 - e1) * _hat(0.5 * (e1 + e2))
             + (e3 - e2) * _hat(0.5 * (e2 + e3)) + (t1 - e3) * _hat(0.5 * (e3 + t1)))
    width = t1 - t0
    safe = tl.where(width > 0, width, 1.0)
    mean = tl.where(width > 0, tl.div_rn(total, safe), _hat(t0))
    middle = 0.5 * (t0 + t1)
    half_slope = tl.where(tl.abs(middle) < 1.0, tl.where(middle > 0, -0.5, tl.where(middle < 0, 0.5, 0.0)), 0.0)
    kink = ((t0 < -1.0) & (t1 > -1.0)) | ((t0 < 0.0) & (t1 > 0.0)) | ((t0 < 1.0) & (t1 > 1.0))
    d_t0 = tl.where(kink, tl.div_rn(mean - _hat(t0), safe), half_slope)
    d_t1 = tl.where(kink, tl.div_rn(_hat(t1) - mean, safe), half_slope)
    return mean, d_t0, d_t1


@triton.jit
def _clip_cell(v, size):
    # a float cell index clipped to [0, size - 1] (NaN gives 0), then int32
    v = tl.where(v > 0.0, v, 0.0)
    return tl.where(v < size - 1.0, v, size - 1.0).to(tl.int32)


@triton.jit
def _prroi_axis(lo_px, hi_px, p, spatial_scale, size, P: tl.constexpr, ALIGNED: tl.constexpr):
    """Bins p [BLOCK_P] along one axis: bin size b (scalar), bin edges lo, hi, and the cells the bins read, clipped to
    the map: ``first`` and ``count`` (0 for an empty bin).

    Edges in cells are clamped to +-2^52; ``hi`` is ``lo + b``, the last one exactly at the box's end. Cell i's tent
    reaches (i - 1, i + 1), so a bin reads cells floor(lo) .. ceil(hi), at most ``size`` of them."""
    s = _clamp_cells(lo_px * spatial_scale)
    e = _clamp_cells(hi_px * spatial_scale)
    if ALIGNED:
        s -= 0.5
        e -= 0.5
    b = tl.div_rn(tl.where(e - s > 0, e - s, 0.0), P * 1.0)  # reversed or NaN: an empty bin
    lo = s + p.to(tl.float32) * b
    hi = tl.minimum(lo + b, tl.maximum(e, lo))
    first = _clip_cell(tl.floor(lo), size)
    last = _clip_cell(tl.ceil(hi), size)
    count = tl.where(b > 0, last - first + 1, 0)
    return b, lo, hi, first, count


@triton.jit
def _prroi_weight(i, lo, hi, b, size):
    # W[p, i] = mean of cell i's tent over bin p = [lo, hi]; 0 for a cell off the map or an empty bin
    w, _, _ = _hat_mean(lo - i.to(tl.float32), hi - i.to(tl.float32))
    return tl.where(b > 0, tl.where((i >= 0) & (i < size), w, 0.0), 0.0)  # (scalar test apart: see below)


@triton.jit
def _prroi_load_box(rois_ptr, k, spatial_scale, ps, H, W, PH: tl.constexpr, PW: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """Box k's batch index and, per bin ``ps`` [BLOCK_P] (``ph * PW + pw``), ``_prroi_axis`` along y and x (no cells
    for a bin past the last)."""
    n, x1, y1, x2, y2 = load_box(rois_ptr, k)
    by, y_lo, y_hi, y_first, ny = _prroi_axis(y1, y2, ps // PW, spatial_scale, H, PH, ALIGNED)
    bx, x_lo, x_hi, x_first, nx = _prroi_axis(x1, x2, ps % PW, spatial_scale, W, PW, ALIGNED)
    p_ok = ps < PH * PW
    ny = tl.where(p_ok, ny, 0)
    nx = tl.where(p_ok, nx, 0)
    return n, by, y_lo, y_hi, y_first, ny, bx, x_lo, x_hi, x_first, nx


@triton.jit
def _prroi_fwd_kernel(
    feat_ptr, rois_ptr, out_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k, c, ph, pw] = sum_ij F[n_k, c, i, j] Wy[ph, i] Wx[pw, j] over the cells each bin reads (clipped to the
    # map); a cell is read only where both weights are non-zero (a non-finite cell spreads only there)
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    c_ok = cs < C
    n, by, y_lo, y_hi, y_first, ny, bx, x_lo, x_hi, x_first, nx = _prroi_load_box(
        rois_ptr, k, spatial_scale, ps, H, W, PH, PW, ALIGNED)
    chan = feat_ptr + n * s_n + cs.to(tl.int64)[:, None] * s_c
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for fy in range(tl.max(ny)):  # the tile's most cells; fewer for a bin are masked
        i = y_first + fy
        wy = tl.where(fy < ny, _prroi_weight(i, y_lo, y_hi, by, H), 0.0)
        for fx in range(tl.max(nx)):
            j = x_first + fx
            wx = tl.where(fx < nx, _prroi_weight(j, x_lo, x_hi, bx, W), 0.0)
            tap = c_ok[:, None] & ((wy != 0.0) & (wx != 0.0))[None, :]
            v = tl.load(chan + (i.to(tl.int64) * s_h + j.to(tl.int64) * s_w)[None, :], mask=tap, other=0.0)
            acc += v.to(tl.float32) * wy[None, :] * wx[None, :]
    tl.store(out_ptr + offs, acc, mask=m)


@triton.jit
def _prroi_bwd_input_kernel(
    grad_ptr, rois_ptr, gin_ptr, C, H, W, g_sn, g_sc, g_sh, g_sw, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_input[n_k, c, i, j] += grad[k, c, ph, pw] Wy[ph, i] Wx[pw, j]   (float32 atomics)
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    c_ok = cs < C
    n, by, y_lo, y_hi, y_first, ny, bx, x_lo, x_hi, x_first, nx = _prroi_load_box(
        rois_ptr, k, spatial_scale, ps, H, W, PH, PW, ALIGNED)
    g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
    chan = gin_ptr + n * g_sn + cs.to(tl.int64)[:, None] * g_sc
    for fy in range(tl.max(ny)):
        i = y_first + fy
        wy = tl.where(fy < ny, _prroi_weight(i, y_lo, y_hi, by, H), 0.0)
        for fx in range(tl.max(nx)):
            j = x_first + fx
            wx = tl.where(fx < nx, _prroi_weight(j, x_lo, x_hi, bx, W), 0.0)
            tap = c_ok[:, None] & ((wy != 0.0) & (wx != 0.0))[None, :]
            tl.atomic_add(chan + (i.to(tl.int64) * g_sh + j.to(tl.int64) * g_sw)[None, :],
                          g * wy[None, :] * wx[None, :], mask=tap, sem="relaxed")


@triton.jit
def _prroi_derivatives(i, lo, hi, b, p, size, P: tl.constexpr):
    # d W[p, i] / d s and d W[p, i] / d e through lo = s + p b, hi = lo + b, b = (e - s) / P:
    # dW/ds = dW/dlo (1 - p / P) + dW/dhi (1 - (p + 1) / P), dW/de = dW/dlo p / P + dW/dhi (p + 1) / P;
    # 0 off the map or for an empty bin
    i_f = i.to(tl.float32)
    p_f = p.to(tl.float32)
    _, d_lo, d_hi = _hat_mean(lo - i_f, hi - i_f)
    d_s = d_lo * (1.0 - p_f / P) + d_hi * (1.0 - (p_f + 1.0) / P)
    d_e = d_lo * (p_f / P) + d_hi * ((p_f + 1.0) / P)
    real = (i >= 0) & (i < size)
    # (a block mask & a scalar comparison trips Triton's interpreter: the scalar test goes through tl.where)
    return tl.where(b > 0, tl.where(real, d_s, 0.0), 0.0), tl.where(b > 0, tl.where(real, d_e, 0.0), 0.0)


@triton.jit
def _prroi_bwd_rois_kernel(
    feat_ptr, rois_ptr, grad_ptr, grois_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_rois[k, x1 | y1 | x2 | y2] = scale * sum_{c, ph, pw} grad[k, c, ph, pw] * d out[k, c, ph, pw] / d edge,
    # d out / d y1 = sum_ij F[i, j] dWy/ds[ph, i] Wx[pw, j], and so on. One program per box, summing in a fixed
    # order (no atomics: this kernel is deterministic).
    k = tl.program_id(0).to(tl.int64)
    t_x1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    t_y1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    t_x2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    t_y2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, PH * PW, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < PH * PW
        ph = ps // PW
        pw = ps % PW
        n, by, y_lo, y_hi, y_first, ny, bx, x_lo, x_hi, x_first, nx = _prroi_load_box(
            rois_ptr, k, spatial_scale, ps, H, W, PH, PW, ALIGNED)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < C
            chan = feat_ptr + n * s_n + cs.to(tl.int64)[:, None] * s_c
            a_x1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            a_y1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            a_x2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            a_y2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            for fy in range(tl.max(ny)):
                i = y_first + fy
                y_ok = fy < ny
                wy = tl.where(y_ok, _prroi_weight(i, y_lo, y_hi, by, H), 0.0)
                dys, dye = _prroi_derivatives(i, y_lo, y_hi, by, ph, H, PH)
                dys = tl.where(y_ok, dys, 0.0)
                dye = tl.where(y_ok, dye, 0.0)
                for fx in range(tl.max(nx)):
                    j = x_first + fx
                    x_ok = fx < nx
                    wx = tl.where(x_ok, _prroi_weight(j, x_lo, x_hi, bx, W), 0.0)
                    dxs, dxe = _prroi_derivatives(j, x_lo, x_hi, bx, pw, W, PW)
                    dxs = tl.where(x_ok, dxs, 0.0)
                    dxe = tl.where(x_ok, dxe, 0.0)
                    used = ((wy != 0.0) | (dys != 0.0) | (dye != 0.0)) & ((wx != 0.0) | (dxs != 0.0) | (dxe != 0.0))
                    m = c_ok[:, None] & used[None, :]
                    v = tl.load(chan + (i.to(tl.int64) * s_h + j.to(tl.int64) * s_w)[None, :], mask=m, other=0.0)
                    v = v.to(tl.float32)
                    a_y1 += v * (dys * wx)[None, :]
                    a_y2 += v * (dye * wx)[None, :]
                    a_x1 += v * (wy * dxs)[None, :]
                    a_x2 += v * (wy * dxe)[None, :]
            offs = (k * C + cs.to(tl.int64))[:, None] * (PH * PW) + ps[None, :]
            g = tl.load(grad_ptr + offs, mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
            t_x1 += g * a_x1
            t_y1 += g * a_y1
            t_x2 += g * a_x2
            t_y2 += g * a_y2
    store_box_grad(grois_ptr, k, t_x1, t_y1, t_x2, t_y2, spatial_scale)


@triton.jit
def _prroi_entries_kernel(
    rois_ptr, win_ptr, base_ptr, key_ptr, src_ptr, w_ptr, k0, slot0, width, num_cells, H, W, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    # For box k = k0 + pid0 with window (FY, FX) and its slots j = (p * FY + fy) * FX + fx in [slot0, slot0 + width):
    # the entry (cell, bin k * P + p, Wy[ph, i] Wx[pw, j]) for cell i = first_y + fy, j = first_x + fx, at
    # base[pid0] + j - slot0; key num_cells when the weight is 0, the cell is off the map or past the bin's cells.
    k, p, fy, fx, ok, e = entry_slots(win_ptr, base_ptr, k0, slot0, width, PH, PW, BLOCK)
    n, by, y_lo, y_hi, y_first, ny, bx, x_lo, x_hi, x_first, nx = _prroi_load_box(
        rois_ptr, k, spatial_scale, p, H, W, PH, PW, ALIGNED)
    i = y_first + fy
    j = x_first + fx
    wy = _prroi_weight(i, y_lo, y_hi, by, H)
    wx = _prroi_weight(j, x_lo, x_hi, bx, W)
    used = (fy < ny) & (fx < nx) & (wy != 0.0) & (wx != 0.0)
    tl.store(key_ptr + e, tl.where(used, (n * H + i) * W + j, num_cells), mask=ok)
    tl.store(src_ptr + e, k * (PH * PW) + p, mask=ok)
    tl.store(w_ptr + e, wy * wx, mask=ok)


def prroi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                       aligned: bool) -> Tensor:
    """Same contract as ``roikit.ops.pytorch.prroi_pool.prroi_pool_forward``: [K, C, PH, PW]."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_empty((k, c, pooled_height, pooled_width))
    if k == 0 or c == 0:
        return out
    grid, tile = box_grid(k, c, pooled_height * pooled_width)
    _prroi_fwd_kernel[grid](input, rois.contiguous(), out, c, h, w, *input.stride(), float(spatial_scale),
                            PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), **tile)
    return out


def _windows(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], size: tuple[int, int],
             aligned: bool) -> Tensor:
    """[K, 2] (CPU, int64): a bound on the cells one bin of box k reads along y and x, as the kernels compute them in
    float32: at most ``floor(b) + 3`` (plus 2 for rounding), and never more than the map's side."""
    r = rois.float()
    windows = []
    for (c1, c2), p, length in (((2, 4), pooled[0], size[0]), ((1, 3), pooled[1], size[1])):
        s = (r[:, c1] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS)
        e = (r[:, c2] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS)
        b = torch.nan_to_num((e - s).clamp(min=0.0) / p, nan=0.0)  # the offset of aligned cancels
        windows.append(torch.where(b > 0, (torch.floor(b) + 5).clamp(max=length), 0.0))
    return torch.stack(windows, dim=1).long().cpu()


def prroi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int, aligned: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    """Gradients with respect to the features [N, C, H, W] and the boxes [K, 5] (0 for the batch index).

    The box gradient is always deterministic (one program per box); the feature gradient uses atomics unless
    ``deterministic``.
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    gin = torch.zeros((n, c, h, w), dtype=torch.float32, device=grad.device)
    grois = torch.zeros((k, 5), dtype=torch.float32, device=grad.device)
    if k == 0 or gin.numel() == 0:
        return gin.to(input.dtype), grois.to(rois.dtype)
    grad, rois = grad.contiguous(), rois.contiguous()
    pooled = pooled_height * pooled_width
    block_c, block_p = blocks(c, pooled, tile=256)
    _prroi_bwd_rois_kernel[(k,)](input, rois, grad, grois, c, h, w, *input.stride(), float(spatial_scale),
                                 PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), BLOCK_C=block_c,
                                 BLOCK_P=block_p)
    if not deterministic:
        grid, tile = box_grid(k, c, pooled)
        _prroi_bwd_input_kernel[grid](grad, rois, gin, c, h, w, *gin.stride(), float(spatial_scale),
                                      PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), **tile)
        return gin.to(input.dtype), grois.to(rois.dtype)
    window = _windows(rois, spatial_scale, (pooled_height, pooled_width), (h, w), aligned)
    on_device = window.to(grad.device)
    for b in entry_batches(window, pooled, MAX_ENTRIES, 1, grad.device):  # one entry a cell slot
        _prroi_entries_kernel[b.grid](
            rois, on_device, b.base, b.keys, b.src, b.weight, b.k0, b.slot0, b.width, n * h * w, h, w,
            float(spatial_scale), PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), BLOCK=b.block,
        )
        gather_bins(gin, b.keys, b.src, b.weight, None, grad, None, accumulate=not b.first)
    return gin.to(input.dtype), grois.to(rois.dtype)
