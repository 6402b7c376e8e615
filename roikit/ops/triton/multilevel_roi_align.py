"""Fused multi-level RoIAlign in Triton: one launch assigns every box its pyramid level and pools it there.

torchvision's ``MultiScaleRoIAlign`` computes the levels, then for each level gathers its boxes, launches RoIAlign
and scatters the result back: L launches and L scatters. Here program (k, channel block, bin block) computes box
k's level with FPN's rule, exactly as torchvision's ``LevelMapper`` does on the same device,

    level = clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), k_min, k_max) - k_min

(each step rounded to the boxes' dtype; on CUDA with the same correctly rounded sqrt, the same reciprocal multiply
torch uses for a division by a Python number, and libdevice's log2f, torch's log2), then runs the RoIAlign of
``roi_align.py`` on that level's map. The backward is the same launch with atomics, or, when deterministic, the
sorted-entries backward of ``roi_align.py`` level by level.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tiles import box_grid, box_tile
from .roi_align import _align_bins, _align_box, _align_scatter, deterministic_backward_into

try:  # libdevice's log2f is torch's log2 on CUDA; the interpreter has no libdevice (DEVICE_MATH=False there)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _round_to(v, ROI_DTYPE: tl.constexpr):
    # round a float32 value to the boxes' dtype (torchvision computes the level in it); 0 = float32
    if ROI_DTYPE == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif ROI_DTYPE == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _pyramid_level(rois_ptr, k, k_min, k_max, canonical_scale, inv_canonical_scale, canonical_level, eps,
                   NUM_LEVELS: tl.constexpr, ROI_DTYPE: tl.constexpr, DEVICE_MATH: tl.constexpr):
    """Box k's level from the finest map (int32 scalar), -1 when it has none (NaN: a reversed side)."""
    r = rois_ptr + k * 5
    x1 = tl.load(r + 1).to(tl.float32)
    y1 = tl.load(r + 2).to(tl.float32)
    x2 = tl.load(r + 3).to(tl.float32)
    y2 = tl.load(r + 4).to(tl.float32)
    area = _round_to(_round_to(x2 - x1, ROI_DTYPE) * _round_to(y2 - y1, ROI_DTYPE), ROI_DTYPE)
    s = _round_to(tl.sqrt_rn(area), ROI_DTYPE)
    if DEVICE_MATH:  # torch on CUDA divides by a Python number as a multiply by its float32 reciprocal
        lg = libdevice.log2(_round_to(s * inv_canonical_scale, ROI_DTYPE))
    else:  # on the CPU, a true division; numpy's log2 in the interpreter
        lg = tl.log2(_round_to(tl.div_rn(s, canonical_scale), ROI_DTYPE))
    v = _round_to(_round_to(canonical_level + _round_to(lg, ROI_DTYPE), ROI_DTYPE) + eps, ROI_DTYPE)
    v = tl.floor(v)
    level = tl.minimum(tl.maximum(v, k_min * 1.0), k_max * 1.0).to(tl.int32) - k_min
    level = tl.where(v == v, level, -1)
    level = tl.where(level < NUM_LEVELS, level, -1)
    if NUM_LEVELS == 1:  # torchvision pools every box from a single map
        level = level * 0
    return level


@triton.jit
def _levels_kernel(rois_ptr, out_ptr, K, k_min, k_max, canonical_scale, inv_canonical_scale, canonical_level, eps,
                   NUM_LEVELS: tl.constexpr, ROI_DTYPE: tl.constexpr, DEVICE_MATH: tl.constexpr):
    # out[k] = the level _pyramid_level gives box k (for the deterministic backward's per-level split)
    k = tl.program_id(0).to(tl.int64)
    level = _pyramid_level(rois_ptr, k, k_min, k_max, canonical_scale, inv_canonical_scale, canonical_level, eps,
                           NUM_LEVELS, ROI_DTYPE, DEVICE_MATH)
    tl.store(out_ptr + k, level)


@triton.jit
def _multilevel_fwd_kernel(
    feats, heights, widths, s_ns, s_cs, s_hs, s_ws, scales, rois_ptr, out_ptr, C, sampling_ratio,
    k_min, k_max, canonical_scale, inv_canonical_scale, canonical_level, eps,
    NUM_LEVELS: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr,
    ROI_DTYPE: tl.constexpr, DEVICE_MATH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k] = roi_align(feats[level_k], box k, scales[level_k]) (average), 0 for a box with no level
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    level = _pyramid_level(rois_ptr, k, k_min, k_max, canonical_scale, inv_canonical_scale, canonical_level, eps,
                           NUM_LEVELS, ROI_DTYPE, DEVICE_MATH)
    for lv in tl.static_range(NUM_LEVELS):
        if level == lv:
            n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, scales[lv], sampling_ratio, PH, PW, ALIGNED)
            val, arg = _align_bins(feats[lv] + n * s_ns[lv], C, heights[lv], widths[lv], s_cs[lv], s_hs[lv],
                                   s_ws[lv], y1, x1, bin_h, bin_w, gh, gw, cs, ps, PH, PW, False, BLOCK_C, BLOCK_P)
            tl.store(out_ptr + offs, val, mask=m)
    if level < 0:
        tl.store(out_ptr + offs, tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32), mask=m)


@triton.jit
def _multilevel_bwd_kernel(
    grad_ptr, gins, heights, widths, g_ns, g_cs, g_hs, g_ws, scales, rois_ptr, C, sampling_ratio,
    k_min, k_max, canonical_scale, inv_canonical_scale, canonical_level, eps,
    NUM_LEVELS: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr,
    ROI_DTYPE: tl.constexpr, DEVICE_MATH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_input[level_k][n_k, c, taps] += weight / count * grad[k, c, ph, pw]   (float32 atomics)
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    level = _pyramid_level(rois_ptr, k, k_min, k_max, canonical_scale, inv_canonical_scale, canonical_level, eps,
                           NUM_LEVELS, ROI_DTYPE, DEVICE_MATH)
    for lv in tl.static_range(NUM_LEVELS):
        if level == lv:
            n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, scales[lv], sampling_ratio, PH, PW, ALIGNED)
            g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
            _align_scatter(gins[lv] + n * g_ns[lv], C, heights[lv], widths[lv], g_cs[lv], g_hs[lv], g_ws[lv],
                           y1, x1, bin_h, bin_w, gh, gw, cs, ps, g, offs, PH, PW, False)


def _level_args(rois: Tensor, spatial_scales: Sequence[float], canonical_scale: int, canonical_level: int):
    """k_min, k_max, canonical_scale, its float32 reciprocal, canonical_level, eps in the boxes' dtype."""
    k_min = int(-torch.log2(torch.tensor(spatial_scales[0], dtype=torch.float32)).item())
    k_max = int(-torch.log2(torch.tensor(spatial_scales[-1], dtype=torch.float32)).item())
    if len(spatial_scales) == 1:
        k_min = k_max = 0
    eps = float(torch.tensor(1e-6, dtype=rois.dtype))
    return k_min, k_max, float(canonical_scale), 1.0 / float(canonical_scale), float(canonical_level), eps


def _constants(rois: Tensor) -> dict:
    code = _DTYPE_CODES.get(rois.dtype)
    if code is None:
        raise ValueError(f"the Triton multilevel RoIAlign takes float32, float16 or bfloat16 boxes, got {rois.dtype}")
    return dict(ROI_DTYPE=code, DEVICE_MATH=rois.is_cuda and libdevice is not None)


def pyramid_levels(rois: Tensor, spatial_scales: Sequence[float], canonical_scale: int = 224,
                   canonical_level: int = 4) -> Tensor:
    """The level the fused kernels give each box: ``Tensor[K]`` int32, -1 for none."""
    k = rois.shape[0]
    out = torch.empty((k,), dtype=torch.int32, device=rois.device)
    if k:
        _levels_kernel[(k,)](rois.contiguous(), out, k, *_level_args(rois, spatial_scales, canonical_scale,
                                                                        canonical_level),
                             NUM_LEVELS=len(spatial_scales), **_constants(rois))
    return out


def multilevel_roi_align_forward(features: Sequence[Tensor], rois: Tensor, spatial_scales: Sequence[float],
                                 pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
                                 canonical_scale: int, canonical_level: int) -> Tensor:
    """Same contract as the op ``roikit::multilevel_roi_align``: [K, C, PH, PW] in the features' dtype."""
    first = features[0]
    c = first.shape[1]
    k = rois.shape[0]
    out = first.new_empty((k, c, pooled_height, pooled_width))
    if k == 0 or c == 0:
        return out
    rois = rois.contiguous()
    grid, tile = box_grid(k, c, pooled_height * pooled_width)
    _multilevel_fwd_kernel[grid](
        tuple(features), tuple(f.shape[2] for f in features), tuple(f.shape[3] for f in features),
        *(tuple(f.stride(d) for f in features) for d in range(4)), tuple(float(s) for s in spatial_scales),
        rois, out, c, int(sampling_ratio), *_level_args(rois, spatial_scales, canonical_scale, canonical_level),
        NUM_LEVELS=len(features), PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned),
        **tile, **_constants(rois),
    )
    return out


def multilevel_roi_align_backward(grad: Tensor, rois: Tensor, spatial_scales: Sequence[float], pooled_height: int,
                                  pooled_width: int, batch_size: int, channels: int, heights: Sequence[int],
                                  widths: Sequence[int], sampling_ratio: int, aligned: bool, canonical_scale: int,
                                  canonical_level: int, deterministic: bool) -> list[Tensor]:
    """Gradients with respect to every level's map, each [N, C, H_l, W_l] in grad's dtype."""
    gins = [torch.zeros((batch_size, channels, h, w), dtype=torch.float32, device=grad.device)
            for h, w in zip(heights, widths)]
    k = rois.shape[0]
    if k == 0 or channels == 0 or batch_size == 0:
        return [g.to(grad.dtype) for g in gins]
    grad, rois = grad.contiguous(), rois.contiguous()
    if deterministic:
        levels = pyramid_levels(rois, spatial_scales, canonical_scale, canonical_level)
        for lv, (gin, scale) in enumerate(zip(gins, spatial_scales)):
            idx = torch.nonzero(levels == lv).squeeze(1)
            if idx.numel() and gin.numel():
                deterministic_backward_into(gin, grad[idx].contiguous(), rois[idx].contiguous(), grad, scale,
                                            pooled_height, pooled_width, sampling_ratio, aligned, False)
        return [g.to(grad.dtype) for g in gins]
    grid, tile = box_grid(k, channels, pooled_height * pooled_width)
    _multilevel_bwd_kernel[grid](
        grad, tuple(gins), tuple(heights), tuple(widths), *(tuple(g.stride(d) for g in gins) for d in range(4)),
        tuple(float(s) for s in spatial_scales), rois, channels, int(sampling_ratio),
        *_level_args(rois, spatial_scales, canonical_scale, canonical_level),
        NUM_LEVELS=len(gins), PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned),
        **tile, **_constants(rois),
    )
    return [g.to(grad.dtype) for g in gins]
