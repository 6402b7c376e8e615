"""RoIAlign's gradient with respect to the box corners in Triton (``roi_align(..., box_grad=True)`` on CUDA).

The math of the reference, ``roikit/ops/pytorch/roi_align_box_grad.py``: every sample moves with the box's edges,
``dy / ds = 1 - t`` and ``dy / de = t`` with ``t = (ph + (iy + 0.5) / gh) / PH`` (``1`` and ``0`` where
``aligned=False`` holds a box under one cell at one cell; 0 for an edge clamped at +-2^52 cells), and the bilinear
surface under it has the slope

    df / dy = (1 - lx) (v3 - v1) + lx (v4 - v2),    df / dx = (1 - ly) (v2 - v1) + ly (v4 - v3)

(taps v1 = (y_lo, x_lo), v2 = (y_lo, x_hi), v3 = (y_hi, x_lo), v4 = (y_hi, x_hi)) where the sample is not clamped
(``0 < y`` and below the last row; else 0). avg: each bin adds ``grad / (gh gw) * sum over its samples on the map``;
max: the winning sample (argmax) only. One program per box sums every channel and bin in a fixed order: no atomics,
the same bits on every run. The samples read are the forward's (each bin's run on the map, found by bisection), so
the work is bounded by the map, not by the box or ``sampling_ratio``. A box whose output has a non-finite value gets
NaN (set by the launcher).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..geometry import MAX_CELLS
from ._tiles import blocks, store_box_grad
from .roi_align import _align_box, _axis_taps, _clamp_cells, _grid_arg, _load_taps, _sample_coord, _sample_run

_MAX_CELLS = tl.constexpr(float(MAX_CELLS))


@triton.jit
def _edge_factors(p_f, index, grid_f, free_s, free_e, held, P: tl.constexpr):
    # dy/ds and dy/de of sample `index` of bin p: (1 - t, t) with t its place along the box; (1, 0) for a held box
    t = (p_f + (index.to(tl.float32) + 0.5) / grid_f) / P
    return (held + (1.0 - held) * (1.0 - t)) * free_s, (1.0 - held) * t * free_e


@triton.jit
def _edge_state(rois_ptr, k, spatial_scale, lo: tl.constexpr, hi: tl.constexpr, ALIGNED: tl.constexpr):
    # per axis: the edges not clamped at +-2^52 cells (1.0 or 0.0 each), and 1.0 where aligned=False holds the box
    # at one cell (its samples then ignore the edges' distance)
    s = tl.load(rois_ptr + k * 5 + lo).to(tl.float32) * spatial_scale
    e = tl.load(rois_ptr + k * 5 + hi).to(tl.float32) * spatial_scale
    free_s = tl.where(tl.abs(s) < _MAX_CELLS, 1.0, 0.0)
    free_e = tl.where(tl.abs(e) < _MAX_CELLS, 1.0, 0.0)
    held = tl.where((_clamp_cells(e) - _clamp_cells(s)) < 1.0, 1.0, 0.0)
    if ALIGNED:
        held = held * 0.0
    return free_s, free_e, held


@triton.jit
def _box_grad_kernel(
    feat_ptr, rois_ptr, grad_ptr, arg_ptr, grois_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, POOL_MAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_rois[k, x1 | y1 | x2 | y2] = scale * sum_{c, p} grad[k, c, p] * d out[k, c, p] / d edge   (one box)
    k = tl.program_id(0).to(tl.int64)
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    ys_free, ye_free, y_fixed = _edge_state(rois_ptr, k, spatial_scale, 2, 4, ALIGNED)
    xs_free, xe_free, x_fixed = _edge_state(rois_ptr, k, spatial_scale, 1, 3, ALIGNED)
    gh_f = tl.maximum(gh, 1).to(tl.float32)
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    t_x1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    t_y1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    t_x2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    t_y2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, PH * PW, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < PH * PW
        ph_f = (ps // PW).to(tl.float32)
        pw_f = (ps % PW).to(tl.float32)
        y0 = y1 + ph_f * bin_h
        x0 = x1 + pw_f * bin_w
        lo_y, hi_y = _sample_run(y0, bin_h, gh, H)
        lo_x, hi_x = _sample_run(x0, bin_w, gw, W)
        count_y = tl.where(p_ok, hi_y - lo_y, 0)
        count_x = tl.where(p_ok, hi_x - lo_x, 0)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < C
            tile = c_ok[:, None] & p_ok[None, :]
            chan = feat_ptr + n * s_n + cs.to(tl.int64)[:, None] * s_c
            g = tl.load(grad_ptr + (k * C + cs.to(tl.int64))[:, None] * (PH * PW) + ps[None, :], mask=tile,
                        other=0.0).to(tl.float32)
            if POOL_MAX:
                a = tl.load(arg_ptr + (k * C + cs.to(tl.int64))[:, None] * (PH * PW) + ps[None, :], mask=tile,
                            other=-1)
                iy = a // tl.maximum(gw, 1)
                ix = a - iy * gw
                y = _sample_coord(y0[None, :], bin_h, gh_f, iy)
                x = _sample_coord(x0[None, :], bin_w, gw_f, ix)
                y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
                x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
                m = tile & (a >= 0) & y_in & x_in
                v1 = tl.load(chan + y_lo * s_h + x_lo * s_w, mask=m, other=0.0).to(tl.float32)
                v2 = tl.load(chan + y_lo * s_h + x_hi * s_w, mask=m, other=0.0).to(tl.float32)
                v3 = tl.load(chan + y_hi * s_h + x_lo * s_w, mask=m, other=0.0).to(tl.float32)
                v4 = tl.load(chan + y_hi * s_h + x_hi * s_w, mask=m, other=0.0).to(tl.float32)
                d_y = tl.where(m & (y > 0.0) & (y_lo < H - 1), hx * (v3 - v1) + lx * (v4 - v2), 0.0)
                d_x = tl.where(m & (x > 0.0) & (x_lo < W - 1), hy * (v2 - v1) + ly * (v4 - v3), 0.0)
                fys, fye = _edge_factors(ph_f[None, :], iy, gh_f, ys_free, ye_free, y_fixed, PH)
                fxs, fxe = _edge_factors(pw_f[None, :], ix, gw_f, xs_free, xe_free, x_fixed, PW)
                t_y1 += g * d_y * fys
                t_y2 += g * d_y * fye
                t_x1 += g * d_x * fxs
                t_x2 += g * d_x * fxe
            else:
                a_y1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
                a_y2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
                a_x1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
                a_x2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
                for ty in range(tl.max(count_y)):
                    iy = lo_y + ty
                    y = _sample_coord(y0, bin_h, gh_f, iy)
                    y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
                    y_ok = y_in & (ty < count_y)
                    y_moves = tl.where(y_ok & (y > 0.0) & (y_lo < H - 1), 1.0, 0.0)
                    fys, fye = _edge_factors(ph_f, iy, gh_f, ys_free, ye_free, y_fixed, PH)
                    r_lo = y_lo * s_h
                    r_hi = y_hi * s_h
                    for tx in range(tl.max(count_x)):
                        ix = lo_x + tx
                        x = _sample_coord(x0, bin_w, gw_f, ix)
                        x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
                        ok = y_ok & x_in & (tx < count_x)
                        x_moves = tl.where(ok & (x > 0.0) & (x_lo < W - 1), 1.0, 0.0)
                        fxs, fxe = _edge_factors(pw_f, ix, gw_f, xs_free, xe_free, x_fixed, PW)
                        m = tile & ok[None, :]
                        v1, v2, v3, v4 = _load_taps(chan, r_lo, r_hi, x_lo, x_hi, s_w, m)
                        d_y = (hx * y_moves)[None, :] * (v3 - v1) + (lx * y_moves)[None, :] * (v4 - v2)
                        d_x = (hy * x_moves)[None, :] * (v2 - v1) + (ly * x_moves)[None, :] * (v4 - v3)
                        a_y1 += d_y * fys[None, :]
                        a_y2 += d_y * fye[None, :]
                        a_x1 += d_x * fxs[None, :]
                        a_x2 += d_x * fxe[None, :]
                t_y1 += g * a_y1
                t_y2 += g * a_y2
                t_x1 += g * a_x1
                t_x2 += g * a_x2
    norm = spatial_scale
    if not POOL_MAX:
        norm = tl.div_rn(spatial_scale, gh_f * gw_f)
    store_box_grad(grois_ptr, k, t_x1, t_y1, t_x2, t_y2, norm)


def roi_align_box_backward(grad: Tensor, input: Tensor, rois: Tensor, output: Tensor, argmax: Tensor,
                           spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                           aligned: bool, pool_max: bool) -> Tensor:
    """Same contract as ``roikit.ops.pytorch.roi_align_box_grad.roi_align_box_backward``: [K, 5] in rois' dtype
    (float32 accumulation; always deterministic)."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    grois = torch.zeros((k, 5), dtype=torch.float32, device=grad.device)
    if k == 0 or input.numel() == 0:
        return grois.to(rois.dtype)
    block_c, block_p = blocks(c, pooled_height * pooled_width, tile=256)
    _box_grad_kernel[(k,)](
        input, rois.contiguous(), grad.contiguous(), argmax if pool_max else grad, grois, c, h, w, *input.stride(),
        float(spatial_scale), _grid_arg(sampling_ratio), PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned),
        POOL_MAX=bool(pool_max), BLOCK_C=block_c, BLOCK_P=block_p,
    )
    bad = ~torch.isfinite(output).flatten(1).all(dim=1)  # [K]: the slope is not defined there
    grois[:, 1:] = torch.where(bad[:, None], float("nan"), grois[:, 1:])
    return grois.to(rois.dtype)
