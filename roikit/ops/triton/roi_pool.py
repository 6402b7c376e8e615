"""Quantized RoI max pooling in Triton (both rounding rules), its backward, and roi_spp built on it.

Every bin is a rectangle of whole cells ``[hstart, hend) x [wstart, wend)`` clipped to the map; its value is the
largest feature in it (the first in row-major order on ties, NaN never wins), 0 for an empty bin, and ``argmax``
is the cell ``h * W + w`` it came from (-1 when none). The rules (see ``roikit/ops/pytorch/roi_pool.py``):

    "torchvision": start = round(x1 * s) (half away from zero), size = max(round(x2 * s) - start + 1, 1),
                   b = size / P (float), bin p = [start + floor(p b), start + ceil((p + 1) b))
    "integer":     start = floor(x1 * s), size = floor((x2 - x1) * s), b = max(floor(size / P), 1),
                   bin p = [start + p b, start + (p + 1) b)

Box coordinates in cells are clamped to +-2^52 before they become integers and every bin is clipped to the map, so
a box's loops cover at most the map, however large its numbers.

One program pools one box for a [BLOCK_C, BLOCK_P] tile of channels x bins; features are read through their strides
(contiguous or channels-last). The backward routes each bin's gradient to its argmax cell, with float32 atomics, or
deterministically by sorting the (cell, gradient) pairs (``_deterministic.segment_sum``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..geometry import MAX_CELLS
from ._deterministic import MAX_ENTRIES, segment_sum
from ._tiles import box_grid, box_tile, load_box

_LOWEST = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: torchvision's starting maximum
_MAX_CELLS = tl.constexpr(float(MAX_CELLS))  # box coordinates in cells are clamped to +-2^52, as the reference


@triton.jit
def _round_half_away(v):
    # C's round() on float32, as int64: trunc, then away from zero when the fraction is at least one half
    t = v.to(tl.int64)
    frac = v - t.to(tl.float32)
    return tl.where(frac >= 0.5, t + 1, tl.where(frac <= -0.5, t - 1, t))


@triton.jit
def _clamp_cells(v):
    # v in cells clamped to [-2^52, 2^52] (as the reference, before any integer conversion); NaN gives 0
    return tl.where(v > _MAX_CELLS, _MAX_CELLS, tl.where(v < -_MAX_CELLS, -_MAX_CELLS, tl.where(v == v, v, 0.0)))


@triton.jit
def _pool_axis(lo, hi, p, spatial_scale, size, P: tl.constexpr, INTEGER: tl.constexpr):
    """Cells [b0, b1) of bins p along one axis, for box edges lo, hi in image pixels; clipped to [0, size], so a bin
    spans at most the map whatever the box. Coordinates in cells are clamped to +-2^52 first (int64 math stays
    exact); a NaN edge gives empty bins."""
    s_lo = lo * spatial_scale
    s_hi = hi * spatial_scale
    if INTEGER:
        s_ext = (hi - lo) * spatial_scale
        nan = (s_lo != s_lo) | (s_ext != s_ext)
        start = tl.floor(_clamp_cells(s_lo)).to(tl.int64)
        extent = tl.floor(_clamp_cells(s_ext)).to(tl.int64)
        # the bin is at least one cell: negative sizes give 1 whatever the integer division rounds to
        step = tl.maximum(extent // P, 1)
        b0 = start + p * step
        b1 = b0 + step
    else:
        nan = (s_lo != s_lo) | (s_hi != s_hi)
        start = _round_half_away(_clamp_cells(s_lo))
        extent = tl.maximum(_round_half_away(_clamp_cells(s_hi)) - start + 1, 1)
        step = tl.div_rn(extent.to(tl.float32), P * 1.0)
        b0 = start + tl.floor(p.to(tl.float32) * step).to(tl.int64)
        b1 = start + tl.ceil((p + 1).to(tl.float32) * step).to(tl.int64)
    b0 = tl.where(nan, 0, tl.minimum(tl.maximum(b0, 0), size))
    b1 = tl.where(nan, 0, tl.minimum(tl.maximum(b1, 0), size))
    return b0, b1


@triton.jit
def _roi_pool_fwd_kernel(
    feat_ptr, rois_ptr, out_ptr, arg_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, INTEGER: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k, c, ph, pw] = max over the bin's cells of feat[n_k, c, y, x]; argmax = y * W + x of the first maximum
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    c_ok = cs < C
    p_ok = ps < PH * PW
    n, x1, y1, x2, y2 = load_box(rois_ptr, k)
    hs, he = _pool_axis(y1, y2, (ps // PW).to(tl.int64), spatial_scale, H, PH, INTEGER)
    ws, we = _pool_axis(x1, x2, (ps % PW).to(tl.int64), spatial_scale, W, PW, INTEGER)
    rows = tl.max(tl.where(p_ok, he - hs, 0))  # tallest / widest bin of the tile: at most H / W (clipped)
    cols = tl.max(tl.where(p_ok, we - ws, 0))
    chan = feat_ptr + n * s_n + cs.to(tl.int64)[:, None] * s_c
    best = tl.full([BLOCK_C, BLOCK_P], _LOWEST, dtype=tl.float32)
    arg = tl.full([BLOCK_C, BLOCK_P], -1, dtype=tl.int64)
    for dy in range(rows):
        y = hs + dy
        y_ok = (y < he) & p_ok
        for dx in range(cols):
            x = ws + dx
            tap = c_ok[:, None] & (y_ok & (x < we))[None, :]
            v = tl.load(chan + (y * s_h + x * s_w)[None, :], mask=tap, other=float("-inf")).to(tl.float32)
            win = v > best  # strict: the first maximum in row-major order stays; NaN never wins
            best = tl.where(win, v, best)
            arg = tl.where(win, (y * W + x)[None, :], arg)
    empty = (he <= hs) | (we <= ws)
    best = tl.where(empty[None, :], 0.0, best)
    tl.store(out_ptr + offs, best, mask=m)
    tl.store(arg_ptr + offs, arg.to(tl.int32), mask=m)


@triton.jit
def _roi_pool_bwd_kernel(grad_ptr, arg_ptr, rois_ptr, gin_ptr, C, HW, P, total, BLOCK: tl.constexpr):
    # grad_input[n_k, c, argmax[k, c, p]] += grad[k, c, p] (float32 atomics), over the flat [K, C, P] index
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    a = tl.load(arg_ptr + i, mask=ok, other=-1)
    g = tl.load(grad_ptr + i, mask=ok, other=0.0).to(tl.float32)
    kc = i // P  # k * C + c
    k = kc // C
    n = tl.load(rois_ptr + k * 5, mask=ok, other=0.0).to(tl.float32).to(tl.int64)
    cell = (n * C + (kc - k * C)) * HW + a
    tl.atomic_add(gin_ptr + cell, g, mask=ok & (a >= 0), sem="relaxed")


def roi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                     rounding: str) -> tuple[Tensor, Tensor]:
    """Same contract as ``roikit.ops.pytorch.roi_pool.roi_pool_forward``: (output, argmax), each [K, C, PH, PW]."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_empty((k, c, pooled_height, pooled_width))
    argmax = torch.empty(out.shape, dtype=torch.int32, device=input.device)
    if k == 0 or c == 0:
        return out, argmax
    grid, tile = box_grid(k, c, pooled_height * pooled_width)
    _roi_pool_fwd_kernel[grid](
        input, rois.contiguous(), out, argmax, c, h, w, *input.stride(), float(spatial_scale),
        PH=pooled_height, PW=pooled_width, INTEGER=rounding == "integer", **tile,
    )
    return out, argmax


def roi_pool_backward(grad: Tensor, rois: Tensor, argmax: Tensor, batch_size: int, channels: int, height: int,
                      width: int, deterministic: bool) -> Tensor:
    """Each bin's gradient goes to the cell it took its value from: [N, C, H, W] in grad's dtype.

    ``deterministic=True`` sorts the (cell, gradient) pairs and adds each cell's run in a fixed order.
    """
    gin = torch.zeros((batch_size, channels, height, width), dtype=torch.float32, device=grad.device)
    k = rois.shape[0]
    if k == 0 or gin.numel() == 0:
        return gin.to(grad.dtype)
    grad, argmax, rois = grad.contiguous(), argmax.contiguous(), rois.contiguous()
    pooled = grad.shape[2] * grad.shape[3]
    hw = height * width
    if not deterministic:
        total = grad.numel()
        block = 512
        _roi_pool_bwd_kernel[(triton.cdiv(total, block),)](grad, argmax, rois, gin, channels, hw, pooled, total,
                                                           BLOCK=block)
        return gin.to(grad.dtype)
    batch = rois[:, 0].long()
    channel = torch.arange(channels, device=grad.device)
    chunk = max(1, MAX_ENTRIES // max(channels * pooled, 1))
    for k0 in range(0, k, chunk):
        a = argmax[k0:k0 + chunk]  # [B, C, PH, PW]
        keys = (batch[k0:k0 + chunk, None, None, None] * channels + channel[None, :, None, None]) * hw + a
        keys = torch.where(a >= 0, keys, gin.numel()).reshape(-1)
        segment_sum(gin, keys, grad[k0:k0 + chunk].reshape(-1), accumulate=k0 > 0)
    return gin.to(grad.dtype)


def roi_spp_forward(input: Tensor, rois: Tensor, levels: Sequence[int], spatial_scale: float,
                    rounding: str) -> Tensor:
    """SPPnet pooling of each box: roi_pool at every grid size n of ``levels``, each ``[K, C, n, n]`` flattened,
    concatenated to ``[K, C * sum(n * n)]`` (the layout of ``roikit.ops.roi_spp``); one launch per level."""
    k, c = rois.shape[0], input.shape[1]
    return torch.cat([roi_pool_forward(input, rois, spatial_scale, n, n, rounding)[0].reshape(k, c * n * n)
                      for n in levels], dim=1)
