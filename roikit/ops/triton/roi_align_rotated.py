"""Rotated RoIAlign in Triton: forward, backward with atomics, and a deterministic backward.

Bin (ph, pw) of box k averages ``gh * gw`` bilinear samples at box-frame offsets from the centre

    yy = -h / 2 + ph * bin_h + (iy + 0.5) * bin_h / gh,    xx = -w / 2 + pw * bin_w + (ix + 0.5) * bin_w / gw

turned about the centre: ``y = yy cos t - xx sin t + cy``, ``x = yy sin t + xx cos t + cx`` (centre shifted by -0.5
cell when aligned; boxes at least 1 x 1 cell when not; ``gh = sampling_ratio`` or ``ceil(bin_h)``; a sample outside
``[-1, H] x [-1, W]`` is 0, one inside is clamped to the map). The launcher computes ``cos t`` and ``sin t`` per box
(``t`` in radians, negated for ``clockwise``) as the reference does. See ``roikit/ops/pytorch/roi_align_rotated.py``,
the reference.

**Bounded work.** The map's rectangle turned back into the box's frame has a bounding box ``[Y0, Y1] x [X0, X1]``;
the samples of a bin inside it are a window of ``ny`` rows and ``nx`` columns of the bin's grid (widened by one
sample and by the positions' rounding each side), and only the window is visited, each sample tested exactly. With
adaptive sampling a window has at most about ``2 (H + W + 2)`` rows and columns, whatever the box.

One program pools one box for a block of channels and a block of bins, a [BLOCK_C, BLOCK_P] tile, as roi_align's
kernels. Features are read through their strides; everything is accumulated in float32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._deterministic import MAX_ENTRIES, entry_batches, entry_slots, gather_bins, store_tap_entries
from ._tiles import box_grid, box_tile
from .roi_align import _axis_taps, _clamp_cells, _grid_arg, _sample_coord, _samples_per_bin

_MAX_MARGIN = tl.constexpr(8.0)  # the reference's MAX_ROUNDING_MARGIN
_EPS = tl.constexpr(float(torch.finfo(torch.float32).eps))


@triton.jit
def _rotated_box(rois_ptr, trig_ptr, k, spatial_scale, sampling_ratio, PH: tl.constexpr, PW: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """Box k: image, centre (cy, cx) in cells, cos and sin, the bins' start (-h / 2, -w / 2) and size, samples per
    bin (``ceil(bin)`` capped at MAX_GRID, 0 for an empty or NaN bin; ``sampling_ratio`` comes capped)."""
    r = rois_ptr + k * 6
    n = tl.load(r).to(tl.float32).to(tl.int64)
    cx = _clamp_cells(tl.load(r + 1).to(tl.float32) * spatial_scale)
    cy = _clamp_cells(tl.load(r + 2).to(tl.float32) * spatial_scale)
    w = _clamp_cells(tl.load(r + 3).to(tl.float32) * spatial_scale)
    h = _clamp_cells(tl.load(r + 4).to(tl.float32) * spatial_scale)
    if ALIGNED:
        cx -= 0.5
        cy -= 0.5
    else:  # at least 1 x 1 cell (NaN stays NaN)
        w = tl.where(w < 1.0, 1.0, w)
        h = tl.where(h < 1.0, 1.0, h)
    cos = tl.load(trig_ptr + k * 2)
    sin = tl.load(trig_ptr + k * 2 + 1)
    bin_h = tl.div_rn(h, PH * 1.0)
    bin_w = tl.div_rn(w, PW * 1.0)
    gh, gw = _samples_per_bin(bin_h, bin_w, sampling_ratio)
    return n, cy, cx, cos, sin, -h / 2.0, -w / 2.0, bin_h, bin_w, gh, gw


@triton.jit
def _map_extent(cy, cx, cos, sin, y0, x0, H, W):
    """The map [-1, H] x [-1, W] in the box's frame: bounding box (Y0, Y1, X0, X1) of its corners in (yy, xx), and
    the rounding error of a sample position to widen it by."""
    ya = -1.0 - cy
    yb = H * 1.0 - cy
    xa = -1.0 - cx
    xb = W * 1.0 - cx
    y_lo = tl.minimum(cos * ya, cos * yb) + tl.minimum(sin * xa, sin * xb)
    y_hi = tl.maximum(cos * ya, cos * yb) + tl.maximum(sin * xa, sin * xb)
    x_lo = tl.minimum(cos * xa, cos * xb) - tl.maximum(sin * ya, sin * yb)
    x_hi = tl.maximum(cos * xa, cos * xb) - tl.minimum(sin * ya, sin * yb)
    size = tl.abs(cy) + tl.abs(cx) + tl.abs(y0) + tl.abs(x0) + H + W + 2.0
    return y_lo, y_hi, x_lo, x_hi, 16.0 * _EPS * size


@triton.jit
def _window(first, bin_size, grid, low, high, error):
    """The samples of each bin (``first`` [BLOCK]) whose position can lie in ``[low, high]``: first index and count
    (0 for NaN). Zero spacing (a zero-size box, fixed sampling_ratio): all samples or none."""
    g = tl.maximum(grid, 1).to(tl.float32)
    gf = grid.to(tl.float32)
    spacing = tl.div_rn(bin_size, g)
    lo = low
    hi = high
    # one sample, plus the rounding error of a position in samples (at most _MAX_MARGIN), each side
    margin = error / tl.abs(spacing)
    margin = tl.where(margin > _MAX_MARGIN, _MAX_MARGIN, margin) + 1.0
    t0 = (lo - first) / spacing - 0.5
    t1 = (hi - first) / spacing - 0.5
    a = tl.minimum(t0, t1) - margin
    b = tl.maximum(t0, t1) + margin
    ok = (a == a) & (b == b)  # NaN box, angle or error: no sample
    a = tl.floor(tl.where(ok, a, 0.0))
    b = tl.floor(tl.where(ok, b, -1.0)) + 1.0
    begin = tl.where(a < 0.0, 0.0, tl.where(a > gf, gf, a))
    end = tl.where(b < 0.0, 0.0, tl.where(b > gf, gf, b))
    at_start = (first >= lo - error) & (first <= hi + error)
    flat = spacing == 0.0
    begin = tl.where(flat, 0.0, begin)
    end = tl.where(flat, tl.where(at_start, gf, 0.0), end)
    begin_i = tl.minimum(begin.to(tl.int64), grid)
    count = tl.maximum(tl.minimum(end.to(tl.int64), grid) - begin_i, 0)
    return begin_i, count


@triton.jit
def _bin_windows(rois_ptr, trig_ptr, k, ps, H, W, spatial_scale, sampling_ratio, PH: tl.constexpr,
                 PW: tl.constexpr, ALIGNED: tl.constexpr):
    """Box k's geometry and, for bins ``ps`` [BLOCK_P], the start of each bin and its sample window (empty for a bin
    past the last); samples per bin as floats at least 1 (``gh_f``, ``gw_f``: they divide)."""
    n, cy, cx, cos, sin, y0, x0, bin_h, bin_w, gh, gw = _rotated_box(rois_ptr, trig_ptr, k, spatial_scale,
                                                                     sampling_ratio, PH, PW, ALIGNED)
    y_lo, y_hi, x_lo, x_hi, err = _map_extent(cy, cx, cos, sin, y0, x0, H, W)
    first_y = y0 + (ps // PW).to(tl.float32) * bin_h
    first_x = x0 + (ps % PW).to(tl.float32) * bin_w
    lo_y, n_y = _window(first_y, bin_h, gh, y_lo, y_hi, err)
    lo_x, n_x = _window(first_x, bin_w, gw, x_lo, x_hi, err)
    p_ok = ps < PH * PW
    n_y = tl.where(p_ok, n_y, 0)
    n_x = tl.where(p_ok, n_x, 0)
    gh_f = tl.maximum(gh, 1).to(tl.float32)
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    return n, cy, cx, cos, sin, first_y, first_x, bin_h, bin_w, gh_f, gw_f, lo_y, n_y, lo_x, n_x


@triton.jit
def _sample(first_y, first_x, bin_h, bin_w, gh_f, gw_f, iy, ix, cy, cx, cos, sin, H, W):
    """Sample (iy, ix): its 4 taps' rows and columns, bilinear weights, and whether it lies on the map."""
    yy = _sample_coord(first_y, bin_h, gh_f, iy)
    xx = _sample_coord(first_x, bin_w, gw_f, ix)
    y = yy * cos - xx * sin + cy
    x = yy * sin + xx * cos + cx
    y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
    x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
    return y_lo, y_hi, x_lo, x_hi, hy, ly, hx, lx, y_in & x_in


@triton.jit
def _fwd_kernel(
    feat_ptr, rois_ptr, trig_ptr, out_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k, c, ph, pw] = (1 / max(gh gw, 1)) * sum over the bin's samples on the map of their bilinear value
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, cy, cx, cos, sin, first_y, first_x, bin_h, bin_w, gh_f, gw_f, lo_y, n_y, lo_x, n_x = _bin_windows(
        rois_ptr, trig_ptr, k, ps, H, W, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    chan = feat_ptr + n * s_n + cs.to(tl.int64)[:, None] * s_c
    c_ok = cs < C
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for ty in range(tl.max(n_y)):  # the tile's longest window; shorter ones are masked
        for tx in range(tl.max(n_x)):
            y_lo, y_hi, x_lo, x_hi, hy, ly, hx, lx, inside = _sample(
                first_y, first_x, bin_h, bin_w, gh_f, gw_f, lo_y + ty, lo_x + tx, cy, cx, cos, sin, H, W)
            mk = c_ok[:, None] & ((ty < n_y) & (tx < n_x) & inside)[None, :]
            v1 = tl.load(chan + (y_lo * s_h + x_lo * s_w)[None, :], mask=mk, other=0.0).to(tl.float32)
            v2 = tl.load(chan + (y_lo * s_h + x_hi * s_w)[None, :], mask=mk, other=0.0).to(tl.float32)
            v3 = tl.load(chan + (y_hi * s_h + x_lo * s_w)[None, :], mask=mk, other=0.0).to(tl.float32)
            v4 = tl.load(chan + (y_hi * s_h + x_hi * s_w)[None, :], mask=mk, other=0.0).to(tl.float32)
            acc += (hy * hx)[None, :] * v1 + (hy * lx)[None, :] * v2 + (ly * hx)[None, :] * v3 + (ly * lx)[None, :] * v4
    acc = tl.div_rn(acc, gh_f * gw_f)
    tl.store(out_ptr + offs, acc, mask=m)


@triton.jit
def _bwd_kernel(
    grad_ptr, rois_ptr, trig_ptr, gin_ptr, C, H, W, g_sn, g_sc, g_sh, g_sw, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_input[n_k, c, taps] += weight * grad[k, c, ph, pw] / count, with float32 atomics
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, cy, cx, cos, sin, first_y, first_x, bin_h, bin_w, gh_f, gw_f, lo_y, n_y, lo_x, n_x = _bin_windows(
        rois_ptr, trig_ptr, k, ps, H, W, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    g = tl.div_rn(tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32), gh_f * gw_f)
    chan = gin_ptr + n * g_sn + cs.to(tl.int64)[:, None] * g_sc
    c_ok = cs < C
    for ty in range(tl.max(n_y)):
        for tx in range(tl.max(n_x)):
            y_lo, y_hi, x_lo, x_hi, hy, ly, hx, lx, inside = _sample(
                first_y, first_x, bin_h, bin_w, gh_f, gw_f, lo_y + ty, lo_x + tx, cy, cx, cos, sin, H, W)
            mk = c_ok[:, None] & ((ty < n_y) & (tx < n_x) & inside)[None, :]
            tl.atomic_add(chan + (y_lo * g_sh + x_lo * g_sw)[None, :], (hy * hx)[None, :] * g, mask=mk, sem="relaxed")
            tl.atomic_add(chan + (y_lo * g_sh + x_hi * g_sw)[None, :], (hy * lx)[None, :] * g, mask=mk, sem="relaxed")
            tl.atomic_add(chan + (y_hi * g_sh + x_lo * g_sw)[None, :], (ly * hx)[None, :] * g, mask=mk, sem="relaxed")
            tl.atomic_add(chan + (y_hi * g_sh + x_hi * g_sw)[None, :], (ly * lx)[None, :] * g, mask=mk, sem="relaxed")


@triton.jit
def _windows_kernel(
    rois_ptr, trig_ptr, lo_y_ptr, n_y_ptr, lo_x_ptr, n_x_ptr, win_ptr, H, W, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # For box k: each bin row's window (lo_y, n_y)[k, ph], each bin column's (lo_x, n_x)[k, pw], and the box's
    # window win[k] = (max n_y, max n_x): the sample slots the deterministic backward gives each of its bins.
    k = tl.program_id(0).to(tl.int64)
    ph = tl.arange(0, BLOCK_H)
    pw = tl.arange(0, BLOCK_W)
    n, cy, cx, cos, sin, y0, x0, bin_h, bin_w, gh, gw = _rotated_box(rois_ptr, trig_ptr, k, spatial_scale,
                                                                     sampling_ratio, PH, PW, ALIGNED)
    y_lo, y_hi, x_lo, x_hi, err = _map_extent(cy, cx, cos, sin, y0, x0, H, W)
    lo_y, n_y = _window(y0 + ph.to(tl.float32) * bin_h, bin_h, gh, y_lo, y_hi, err)
    lo_x, n_x = _window(x0 + pw.to(tl.float32) * bin_w, bin_w, gw, x_lo, x_hi, err)
    n_y = tl.where(ph < PH, n_y, 0)
    n_x = tl.where(pw < PW, n_x, 0)
    tl.store(lo_y_ptr + k * PH + ph, lo_y, mask=ph < PH)
    tl.store(n_y_ptr + k * PH + ph, n_y, mask=ph < PH)
    tl.store(lo_x_ptr + k * PW + pw, lo_x, mask=pw < PW)
    tl.store(n_x_ptr + k * PW + pw, n_x, mask=pw < PW)
    tl.store(win_ptr + k * 2, tl.max(n_y))
    tl.store(win_ptr + k * 2 + 1, tl.max(n_x))


@triton.jit
def _entries_kernel(
    rois_ptr, trig_ptr, lo_y_ptr, n_y_ptr, lo_x_ptr, n_x_ptr, win_ptr, base_ptr, key_ptr, src_ptr, w_ptr,
    k0, slot0, width, num_cells, H, W, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    # For box k = k0 + pid0 with window (WY, WX), slot j = (p * WY + ty) * WX + tx in [slot0, slot0 + width):
    # sample (lo_y[ph] + ty, lo_x[pw] + tx)'s 4 taps as entries (cell n * H * W + y * W + x, bin k * P + p,
    # weight / count) at 4 (base[pid0] + j - slot0) + t. A slot outside the bin's window, a sample off the map and
    # a tap of weight 0 get the key num_cells = N * H * W (unused).
    k, p, ty, tx, j_ok, slot = entry_slots(win_ptr, base_ptr, k0, slot0, width, PH, PW, BLOCK)
    ph = p // PW
    pw = p % PW
    n, cy, cx, cos, sin, y0, x0, bin_h, bin_w, gh, gw = _rotated_box(rois_ptr, trig_ptr, k, spatial_scale,
                                                                     sampling_ratio, PH, PW, ALIGNED)
    gh_f = tl.maximum(gh, 1).to(tl.float32)
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    in_window = (ty < tl.load(n_y_ptr + k * PH + ph, mask=j_ok, other=0)) & \
        (tx < tl.load(n_x_ptr + k * PW + pw, mask=j_ok, other=0))
    iy = tl.load(lo_y_ptr + k * PH + ph, mask=j_ok, other=0) + ty
    ix = tl.load(lo_x_ptr + k * PW + pw, mask=j_ok, other=0) + tx
    y_lo, y_hi, x_lo, x_hi, hy, ly, hx, lx, inside = _sample(
        y0 + ph.to(tl.float32) * bin_h, x0 + pw.to(tl.float32) * bin_w, bin_h, bin_w, gh_f, gw_f, iy, ix, cy, cx,
        cos, sin, H, W)
    ok = j_ok & in_window & inside
    scale = tl.div_rn(1.0, gh_f * gw_f)
    cell0 = n * H * W
    src = k * (PH * PW) + p
    store_tap_entries(key_ptr, src_ptr, w_ptr, slot * 4, j_ok, ok, cell0, W, num_cells, src, scale,
                      y_lo, y_hi, x_lo, x_hi, hy, ly, hx, lx)


def _trig(rois: Tensor, clockwise: bool, radians: bool) -> Tensor:
    """[K, 2] float32 (cos t, sin t), ``t`` computed in float64 and rounded to float32, as the reference does."""
    theta = rois[:, 5].to(torch.float64)
    if not radians:
        theta = theta * math.pi / 180.0
    if clockwise:
        theta = -theta
    theta = theta.to(torch.float32)
    return torch.stack([torch.cos(theta), torch.sin(theta)], dim=1).contiguous()


def roi_align_rotated_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                              pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool,
                              radians: bool) -> Tensor:
    """Same contract as ``roikit.ops.pytorch.roi_align_rotated.roi_align_rotated_forward``."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_empty((k, c, pooled_height, pooled_width))
    if k == 0 or c == 0:
        return out
    rois = rois.contiguous()
    grid, tile = box_grid(k, c, pooled_height * pooled_width)
    _fwd_kernel[grid](
        input, rois, _trig(rois, clockwise, radians), out, c, h, w, *input.stride(), float(spatial_scale),
        _grid_arg(sampling_ratio), PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), **tile,
    )
    return out


def roi_align_rotated_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                               pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool, radians: bool,
                               batch_size: int, channels: int, height: int, width: int,
                               deterministic: bool) -> Tensor:
    """Gradient with respect to the features, [N, C, H, W] in grad's dtype (float32 accumulation).

    ``deterministic=False``: float32 atomics. ``True``: the taps of every sample become sorted entries that each
    cell adds up in a fixed order (see ``_deterministic.py``): the same bits on every run.
    """
    gin = torch.zeros((batch_size, channels, height, width), dtype=torch.float32, device=grad.device)
    k = rois.shape[0]
    if k == 0 or gin.numel() == 0:
        return gin.to(grad.dtype)
    grad = grad.contiguous()
    rois = rois.contiguous()
    trig = _trig(rois, clockwise, radians)
    pooled = pooled_height * pooled_width
    settings = dict(PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned))
    if not deterministic:
        grid, tile = box_grid(k, channels, pooled)
        _bwd_kernel[grid](grad, rois, trig, gin, channels, height, width, *gin.stride(), float(spatial_scale),
                          _grid_arg(sampling_ratio), **settings, **tile)
        return gin.to(grad.dtype)
    ratio = _grid_arg(sampling_ratio)
    lo_y = torch.empty((k, pooled_height), dtype=torch.int64, device=gin.device)
    n_y = torch.empty_like(lo_y)
    lo_x = torch.empty((k, pooled_width), dtype=torch.int64, device=gin.device)
    n_x = torch.empty_like(lo_x)
    window = torch.empty((k, 2), dtype=torch.int64, device=gin.device)
    _windows_kernel[(k,)](rois, trig, lo_y, n_y, lo_x, n_x, window, height, width, float(spatial_scale), ratio,
                          **settings, BLOCK_H=triton.next_power_of_2(pooled_height),
                          BLOCK_W=triton.next_power_of_2(pooled_width))
    for b in entry_batches(window, pooled, MAX_ENTRIES, 4, gin.device):  # 4 taps a sample slot
        _entries_kernel[b.grid](
            rois, trig, lo_y, n_y, lo_x, n_x, window, b.base, b.keys, b.src, b.weight, b.k0, b.slot0, b.width,
            batch_size * height * width, height, width, float(spatial_scale), ratio, **settings, BLOCK=b.block,
        )
        gather_bins(gin, b.keys, b.src, b.weight, None, grad, None, accumulate=not b.first)
    return gin.to(grad.dtype)
