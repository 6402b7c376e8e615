"""RoIAlign over a feature pyramid in plain PyTorch: the FPN level rule, then RoIAlign per level.

The reference for the fused Triton kernel and the CPU path of ``roikit::multilevel_roi_align``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import jit
from .roi_align import roi_align_backward, roi_align_forward


def level_range(spatial_scales: Sequence[float]) -> tuple[int, int]:
    """``(k_min, k_max)``: the pyramid levels of the finest and coarsest maps, ``-log2(scale)`` computed as
    torchvision does (in float32, truncated): scales 1/4 ... 1/32 give (2, 5)."""
    def level(scale: float) -> int:
        return int(-torch.log2(torch.tensor(scale, dtype=torch.float32)).item())

    return level(spatial_scales[0]), level(spatial_scales[-1])


def pyramid_levels(rois: Tensor, spatial_scales: Sequence[float], canonical_scale: int = 224,
                   canonical_level: int = 4) -> Tensor:
    """The level of each box, counted from the finest map: ``Tensor[K]`` int64.

    FPN's rule (Lin et al. 2017, eq. 1) exactly as torchvision's ``LevelMapper`` computes it, in the boxes' dtype:
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)`` clamped to ``[k_min, k_max]``
    (see :func:`level_range`), minus ``k_min``. With one map every box gets 0. A box with a negative area
    (one side reversed) has no level: -1 (torchvision pools it from no level, leaving zeros).

    Args:
        rois (Tensor[K, 5]): (batch index, x1, y1, x2, y2) in image pixels.
        spatial_scales (List[float]): one per map, finest first.
    """
    k = rois.shape[0]
    if len(spatial_scales) == 1:
        return torch.zeros((k,), dtype=torch.int64, device=rois.device)
    k_min, k_max = level_range(spatial_scales)
    boxes = rois[:, 1:]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    s = torch.sqrt(area)
    level = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(1e-6, dtype=s.dtype))
    level = torch.clamp(level, min=k_min, max=k_max)
    return torch.where(torch.isnan(level), -1, level.nan_to_num(0).to(torch.int64) - k_min)


def _zeros(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Zeros in ``like``'s dtype and device; on the CPU from :func:`jit.fresh_tensor` (pages zero-filled by the OS
    when first written, huge pages from 4 MiB: a level no box reads costs nothing, the others a fraction of
    ``torch.zeros``)."""
    if like.device.type == "cpu" and like.dtype in jit.FRESH_DTYPES:
        return jit.fresh_tensor(shape, like.dtype)
    return like.new_zeros(shape)


def _boxes_per_level(rois: Tensor, spatial_scales: list[float], canonical_scale: int,
                     canonical_level: int) -> list[Tensor | None]:
    """The boxes of each level (indices into ``rois``), None for a level without boxes, and ``slice(None)`` in
    place of the indices when every box is on that level (no gather, no scatter)."""
    levels = pyramid_levels(rois, spatial_scales, canonical_scale, canonical_level)
    per_level = []
    for level in range(len(spatial_scales)):
        idx = torch.nonzero(levels == level).squeeze(1)
        per_level.append(None if idx.numel() == 0 else slice(None) if idx.numel() == rois.shape[0] else idx)
    return per_level


def multilevel_roi_align_forward(features: list[Tensor], rois: Tensor, spatial_scales: list[float], pooled_height: int,
                                 pooled_width: int, sampling_ratio: int, aligned: bool, canonical_scale: int,
                                 canonical_level: int) -> Tensor:
    """[K, C, PH, PW]: each box pooled from its level by :func:`roi_align_forward` (one call per level with boxes;
    when all boxes share a level, that call's result is the output). A box without a level gives zeros."""
    first = features[0]
    per_level = _boxes_per_level(rois, spatial_scales, canonical_scale, canonical_level)
    for level, idx in enumerate(per_level):
        if isinstance(idx, slice):
            out = roi_align_forward(features[level], rois, spatial_scales[level], pooled_height, pooled_width,
                                    sampling_ratio, aligned, False)[0]
            return out.to(first.dtype)
    out = _zeros((rois.shape[0], first.shape[1], pooled_height, pooled_width), first)
    for level, idx in enumerate(per_level):
        if idx is not None:
            out[idx] = roi_align_forward(features[level], rois[idx], spatial_scales[level], pooled_height,
                                         pooled_width, sampling_ratio, aligned, False)[0].to(out.dtype)
    return out


def multilevel_roi_align_backward(grad: Tensor, rois: Tensor, spatial_scales: list[float], pooled_height: int,
                                  pooled_width: int, batch_size: int, channels: int, heights: list[int],
                                  widths: list[int], sampling_ratio: int, aligned: bool, canonical_scale: int,
                                  canonical_level: int) -> list[Tensor]:
    """The gradient of each level's map, [N, C, H_l, W_l]: :func:`roi_align_backward` of the level's boxes, zeros
    (:func:`_zeros`) for a level without boxes."""
    per_level = _boxes_per_level(rois, spatial_scales, canonical_scale, canonical_level)
    empty = torch.empty((0,), dtype=torch.int64, device=grad.device)
    grads = []
    for idx, scale, height, width in zip(per_level, spatial_scales, heights, widths):
        if idx is None:
            grads.append(_zeros((batch_size, channels, height, width), grad))
            continue
        grads.append(roi_align_backward(grad[idx], rois[idx], empty, scale, pooled_height, pooled_width, batch_size,
                                        channels, height, width, sampling_ratio, aligned, False))
    return grads
