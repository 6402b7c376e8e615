"""RoIAlign in Triton: forward (avg and max), backward with atomics, and a deterministic backward.

Bin (ph, pw) of box k takes ``gh * gw`` bilinear samples at

    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh,    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw

(torchvision's conventions: ``y1 = box_y1 * scale - 0.5`` when aligned, a box at least 1 x 1 cell when not,
``gh = sampling_ratio`` or ``ceil(bin_h)``; a sample outside ``[-1, H] x [-1, W]`` is 0, one inside is clamped to
the map) and returns their mean, or their maximum (``argmax`` = the winning sample's ``iy * gw + ix``, -1 when the
bin has no sample). See ``roikit/ops/pytorch/roi_align.py``, the reference.

One program pools one box for a block of channels and a block of bins: a [BLOCK_C, BLOCK_P] tile, with the box's
geometry computed once and every sample a vector over the bins. Features are read through their strides, so
contiguous and channels-last maps both work (channels-last gives contiguous channel vectors). Everything is
accumulated in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._deterministic import MAX_ENTRIES, gather_bins
from ._tiles import blocks, box_tile


@triton.jit
def _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH: tl.constexpr, PW: tl.constexpr,
               ALIGNED: tl.constexpr):
    """Box k: batch index, start and bin size of each axis, samples per bin (torchvision's order of operations)."""
    r = rois_ptr + k * 5
    n = tl.load(r).to(tl.float32).to(tl.int64)
    x1 = tl.load(r + 1).to(tl.float32) * spatial_scale
    y1 = tl.load(r + 2).to(tl.float32) * spatial_scale
    x2 = tl.load(r + 3).to(tl.float32) * spatial_scale
    y2 = tl.load(r + 4).to(tl.float32) * spatial_scale
    if ALIGNED:
        x1 -= 0.5
        y1 -= 0.5
        x2 -= 0.5
        y2 -= 0.5
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not ALIGNED:  # malformed boxes forced to 1 x 1 cell
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = tl.div_rn(roi_h, PH * 1.0)
    bin_w = tl.div_rn(roi_w, PW * 1.0)
    gh = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_h).to(tl.int32))
    gw = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_w).to(tl.int32))
    return n, y1, x1, bin_h, bin_w, gh, gw


@triton.jit
def _axis_taps(y, size):
    """torchvision's bilinear_interpolate along one axis: the two cells, their weights, and whether y counts.

    y outside [-1, size] gives nothing; inside it is clamped to [0, size - 1].
    """
    inside = (y >= -1.0) & (y <= size)
    y = tl.minimum(tl.maximum(y, 0.0), size * 1.0)  # the upper clamp only guards the int conversion
    lo = y.to(tl.int32)
    at_end = lo >= size - 1
    lo = tl.where(at_end, size - 1, lo)
    hi = tl.where(at_end, size - 1, lo + 1)
    frac = tl.where(at_end, 0.0, y - lo.to(tl.float32))
    return lo.to(tl.int64), hi.to(tl.int64), 1.0 - frac, frac, inside


@triton.jit
def _align_bins(base, C, H, W, s_c, s_h, s_w, y1, x1, bin_h, bin_w, gh, gw, cs, ps,
                PH: tl.constexpr, PW: tl.constexpr, POOL_MAX: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pool bins ``ps`` x channels ``cs`` of one box from the image at ``base``: (value, argmax) [BLOCK_C, BLOCK_P].

    avg: value = (1 / max(gh * gw, 1)) * sum_{iy, ix} f(y, x);  max: value = max_{iy, ix} f(y, x) (first on ties),
    with f(y, x) = sum of the 4 taps' weight * feature, 0 for a sample outside the map.
    """
    c_ok = cs < C
    p_ok = ps < PH * PW
    y0 = y1 + (ps // PW).to(tl.float32) * bin_h
    x0 = x1 + (ps % PW).to(tl.float32) * bin_w
    gh_f = tl.maximum(gh, 1).to(tl.float32)  # a box with no sample divides nothing
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    chan = base + cs.to(tl.int64)[:, None] * s_c
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    arg = tl.full([BLOCK_C, BLOCK_P], -1, dtype=tl.int64)
    for iy in range(gh):
        y = y0 + tl.div_rn((iy + 0.5) * bin_h, gh_f)
        y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
        r_lo = y_lo * s_h
        r_hi = y_hi * s_h
        for ix in range(gw):
            x = x0 + tl.div_rn((ix + 0.5) * bin_w, gw_f)
            x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
            m = c_ok[:, None] & (y_in & x_in & p_ok)[None, :]
            c_lo = x_lo * s_w
            c_hi = x_hi * s_w
            v1 = tl.load(chan + (r_lo + c_lo)[None, :], mask=m, other=0.0).to(tl.float32)
            v2 = tl.load(chan + (r_lo + c_hi)[None, :], mask=m, other=0.0).to(tl.float32)
            v3 = tl.load(chan + (r_hi + c_lo)[None, :], mask=m, other=0.0).to(tl.float32)
            v4 = tl.load(chan + (r_hi + c_hi)[None, :], mask=m, other=0.0).to(tl.float32)
            val = (hy * hx)[None, :] * v1 + (hy * lx)[None, :] * v2 + (ly * hx)[None, :] * v3 + (ly * lx)[None, :] * v4
            if POOL_MAX:
                # the first sample always enters (even -inf); then strictly larger wins; a NaN wins once and stays
                win = (val > acc) | (arg < 0) | ((val != val) & (acc == acc))
                acc = tl.where(win, val, acc)
                arg = tl.where(win, (iy * gw + ix).to(tl.int64), arg)
            else:
                acc += val
    if POOL_MAX:
        acc = tl.where(arg < 0, 0.0, acc)
    else:
        acc = tl.div_rn(acc, tl.maximum(gh * gw, 1).to(tl.float32))
    return acc, arg


@triton.jit
def _roi_align_fwd_kernel(
    feat_ptr, rois_ptr, out_ptr, arg_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, POOL_MAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k, c, ph, pw] = pool over the bin's samples (see _align_bins); argmax too for max pooling
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    val, arg = _align_bins(feat_ptr + n * s_n, C, H, W, s_c, s_h, s_w, y1, x1, bin_h, bin_w, gh, gw, cs, ps,
                           PH, PW, POOL_MAX, BLOCK_C, BLOCK_P)
    tl.store(out_ptr + offs, val, mask=m)
    if POOL_MAX:
        tl.store(arg_ptr + offs, arg, mask=m)


@triton.jit
def _align_scatter(gin, C, H, W, g_sc, g_sh, g_sw, y1, x1, bin_h, bin_w, gh, gw, cs, ps, g, a,
                   PH: tl.constexpr, PW: tl.constexpr, POOL_MAX: tl.constexpr):
    """Atomically add the gradient tile g [BLOCK_C, BLOCK_P] of one box onto its image's taps at ``gin``.

    avg: every sample's 4 taps get weight * g / count;  max: only the winning sample a (iy * gw + ix) does.
    """
    c_ok = cs < C
    p_ok = ps < PH * PW
    y0 = y1 + (ps // PW).to(tl.float32) * bin_h
    x0 = x1 + (ps % PW).to(tl.float32) * bin_w
    gh_f = tl.maximum(gh, 1).to(tl.float32)  # a box with no sample divides nothing
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    chan = gin + cs.to(tl.int64)[:, None] * g_sc
    if POOL_MAX:
        iy = a // tl.maximum(gw, 1)
        ix = a - iy * gw
        y = y0[None, :] + tl.div_rn((iy + 0.5) * bin_h, gh_f)
        x = x0[None, :] + tl.div_rn((ix + 0.5) * bin_w, gw_f)
        y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
        x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
        m = c_ok[:, None] & p_ok[None, :] & y_in & x_in & (a >= 0)
        tl.atomic_add(chan + y_lo * g_sh + x_lo * g_sw, hy * hx * g, mask=m, sem="relaxed")
        tl.atomic_add(chan + y_lo * g_sh + x_hi * g_sw, hy * lx * g, mask=m, sem="relaxed")
        tl.atomic_add(chan + y_hi * g_sh + x_lo * g_sw, ly * hx * g, mask=m, sem="relaxed")
        tl.atomic_add(chan + y_hi * g_sh + x_hi * g_sw, ly * lx * g, mask=m, sem="relaxed")
    else:
        g = tl.div_rn(g, tl.maximum(gh * gw, 1).to(tl.float32))
        for iy in range(gh):
            y = y0 + tl.div_rn((iy + 0.5) * bin_h, gh_f)
            y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
            for ix in range(gw):
                x = x0 + tl.div_rn((ix + 0.5) * bin_w, gw_f)
                x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
                m = c_ok[:, None] & (y_in & x_in & p_ok)[None, :]
                tl.atomic_add(chan + (y_lo * g_sh + x_lo * g_sw)[None, :], (hy * hx)[None, :] * g, mask=m,
                              sem="relaxed")
                tl.atomic_add(chan + (y_lo * g_sh + x_hi * g_sw)[None, :], (hy * lx)[None, :] * g, mask=m,
                              sem="relaxed")
                tl.atomic_add(chan + (y_hi * g_sh + x_lo * g_sw)[None, :], (ly * hx)[None, :] * g, mask=m,
                              sem="relaxed")
                tl.atomic_add(chan + (y_hi * g_sh + x_hi * g_sw)[None, :], (ly * lx)[None, :] * g, mask=m,
                              sem="relaxed")


@triton.jit
def _roi_align_bwd_kernel(
    grad_ptr, arg_ptr, rois_ptr, gin_ptr, C, H, W, g_sn, g_sc, g_sh, g_sw, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, POOL_MAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_input[n_k, c, taps] += weight * grad[k, c, ph, pw], with float32 atomics
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = offs  # unused for avg
    if POOL_MAX:
        a = tl.load(arg_ptr + offs, mask=m, other=-1)
    _align_scatter(gin_ptr + n * g_sn, C, H, W, g_sc, g_sh, g_sw, y1, x1, bin_h, bin_w, gh, gw, cs, ps, g, a,
                   PH, PW, POOL_MAX)


@triton.jit
def _roi_align_entries_kernel(
    rois_ptr, key_ptr, src_ptr, w_ptr, tag_ptr, k0, num_cells, H, W, spatial_scale, sampling_ratio, GY, GX,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, POOL_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    # For box k0 + pid0 and sample slots j = (p * GY + iy) * GX + ix: the sample's 4 taps as entries
    # (cell n * H * W + y * W + x, bin k * P + p, weight [/ count for avg], tag iy * gw + ix); slot 4 j + t.
    # Unused slots (past the box's own grid, outside the map, zero weight) get the key num_cells = N * H * W.
    kl = tl.program_id(0).to(tl.int64)
    k = k0 + kl
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    per_bin = GY * GX
    p = j // per_bin
    s = j - p * per_bin
    iy = s // GX
    ix = s - iy * GX
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    y = y1 + (p // PW).to(tl.float32) * bin_h + tl.div_rn((iy + 0.5) * bin_h, tl.maximum(gh, 1).to(tl.float32))
    x = x1 + (p % PW).to(tl.float32) * bin_w + tl.div_rn((ix + 0.5) * bin_w, tl.maximum(gw, 1).to(tl.float32))
    y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
    x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
    slot_ok = (p < PH * PW) & (iy < gh) & (ix < gw)
    ok = slot_ok & y_in & x_in
    scale = 1.0
    if not POOL_MAX:
        scale = tl.div_rn(1.0, tl.maximum(gh * gw, 1).to(tl.float32))
    cell0 = n * H * W
    src = k * (PH * PW) + p
    tag = iy * gw + ix
    slot = (kl * (PH * PW * per_bin) + j) * 4
    j_ok = p < PH * PW
    for t in tl.static_range(4):
        if t == 0:
            cy, cx, w = y_lo, x_lo, hy * hx
        elif t == 1:
            cy, cx, w = y_lo, x_hi, hy * lx
        elif t == 2:
            cy, cx, w = y_hi, x_lo, ly * hx
        else:
            cy, cx, w = y_hi, x_hi, ly * lx
        used = ok & (w != 0.0)
        tl.store(key_ptr + slot + t, tl.where(used, cell0 + cy * W + cx, num_cells), mask=j_ok)
        tl.store(src_ptr + slot + t, src, mask=j_ok)
        tl.store(w_ptr + slot + t, w * scale, mask=j_ok)
        tl.store(tag_ptr + slot + t, tag, mask=j_ok)


def max_sampling_grid(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int,
                      aligned: bool) -> tuple[int, int]:
    """The largest ``(gh, gw)`` over the boxes (a bound: one extra sample for float ties; host sync)."""
    if sampling_ratio > 0:
        return sampling_ratio, sampling_ratio
    r = rois.float()
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (r[:, i] * spatial_scale - offset for i in range(1, 5))
    h, w = y2 - y1, x2 - x1
    if not aligned:
        h, w = h.clamp(min=1.0), w.clamp(min=1.0)
    gh = int(torch.ceil(h / pooled[0]).max().clamp(min=0).item()) + 1
    gw = int(torch.ceil(w / pooled[1]).max().clamp(min=0).item()) + 1
    return gh, gw


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                      sampling_ratio: int, aligned: bool, pool_max: bool) -> tuple[Tensor, Tensor]:
    """Same contract as ``roikit.ops.pytorch.roi_align.roi_align_forward``."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_empty((k, c, pooled_height, pooled_width))
    argmax = torch.empty((k, c, pooled_height, pooled_width) if pool_max else (0,), dtype=torch.int64,
                         device=input.device)
    if k == 0 or c == 0:
        return out, argmax
    rois = rois.contiguous()
    block_c, block_p = blocks(c, pooled_height * pooled_width)
    grid = (k, triton.cdiv(c, block_c), triton.cdiv(pooled_height * pooled_width, block_p))
    _roi_align_fwd_kernel[grid](
        input, rois, out, argmax, c, h, w, *input.stride(), float(spatial_scale), int(sampling_ratio),
        PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), POOL_MAX=bool(pool_max),
        BLOCK_C=block_c, BLOCK_P=block_p,
    )
    return out, argmax


def roi_align_backward(grad: Tensor, rois: Tensor, argmax: Tensor, spatial_scale: float, pooled_height: int,
                       pooled_width: int, batch_size: int, channels: int, height: int, width: int,
                       sampling_ratio: int, aligned: bool, pool_max: bool, deterministic: bool) -> Tensor:
    """Gradient with respect to the features, [N, C, H, W] in grad's dtype (float32 accumulation).

    ``deterministic=False``: float32 atomics. ``True``: the taps of every sample become sorted entries that
    each cell adds up in a fixed order (see ``_deterministic.py``): the same bits on every run.
    """
    gin = torch.zeros((batch_size, channels, height, width), dtype=torch.float32, device=grad.device)
    k = rois.shape[0]
    if k == 0 or gin.numel() == 0:
        return gin.to(grad.dtype)
    grad = grad.contiguous()
    rois = rois.contiguous()
    pooled = pooled_height * pooled_width
    if not deterministic:
        block_c, block_p = blocks(channels, pooled)
        grid = (k, triton.cdiv(channels, block_c), triton.cdiv(pooled, block_p))
        _roi_align_bwd_kernel[grid](
            grad, argmax if pool_max else grad, rois, gin, channels, height, width, *gin.stride(),
            float(spatial_scale), int(sampling_ratio), PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned),
            POOL_MAX=bool(pool_max), BLOCK_C=block_c, BLOCK_P=block_p,
        )
        return gin.to(grad.dtype)
    deterministic_backward_into(gin, grad, rois, argmax, spatial_scale, pooled_height, pooled_width,
                                sampling_ratio, aligned, pool_max)
    return gin.to(grad.dtype)


def deterministic_backward_into(gin: Tensor, grad: Tensor, rois: Tensor, argmax: Tensor, spatial_scale: float,
                                pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
                                pool_max: bool) -> None:
    """Add the gradient of ``rois`` (contiguous grad [K, C, PH, PW]) into ``gin`` [N, C, H, W] float32, in an
    order fixed by the boxes: chunk by chunk of boxes, each cell's entries in generation order."""
    n, c, h, w = gin.shape
    k = rois.shape[0]
    pooled = pooled_height * pooled_width
    gy, gx = max_sampling_grid(rois, spatial_scale, (pooled_height, pooled_width), sampling_ratio, aligned)
    slots = pooled * gy * gx  # sample slots per box
    chunk = max(1, MAX_ENTRIES // (4 * slots))
    block = min(triton.next_power_of_2(slots), 256)
    for k0 in range(0, k, chunk):
        kc = min(chunk, k - k0)
        keys = torch.empty((kc * slots * 4,), dtype=torch.int64, device=gin.device)
        src = torch.empty_like(keys)
        weight = torch.empty(keys.shape, dtype=torch.float32, device=gin.device)
        tag = torch.empty(keys.shape, dtype=torch.int32, device=gin.device)
        _roi_align_entries_kernel[(kc, triton.cdiv(slots, block))](
            rois, keys, src, weight, tag, k0, n * h * w, h, w, float(spatial_scale), int(sampling_ratio), gy, gx,
            PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), POOL_MAX=bool(pool_max), BLOCK=block,
        )
        gather_bins(gin, keys, src, weight, tag if pool_max else None, grad, argmax if pool_max else None,
                    accumulate=k0 > 0)
