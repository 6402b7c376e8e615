"""RoIAlign over a feature pyramid in one op: each box is pooled from the level the FPN rule gives it.

``multilevel_roi_align`` equals torchvision's ``MultiScaleRoIAlign`` (same level rule, same RoIAlign), but as one
registered op: on CUDA one fused Triton launch assigns every box its level and pools it, forward and backward,
instead of one launch and one scatter per level. Its default implementation (CPU, any device) is the reference:
the level rule, then the plain-PyTorch RoIAlign per level.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._library import deterministic_backward_enabled
from ._utils import BoxesType, check_features, check_spatial_scale, convert_boxes_to_rois, pair
from .pytorch import roi_align as _align


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


def _reference_forward(features: list[Tensor], rois: Tensor, spatial_scales: list[float], pooled_height: int,
                       pooled_width: int, sampling_ratio: int, aligned: bool, canonical_scale: int,
                       canonical_level: int) -> Tensor:
    levels = pyramid_levels(rois, spatial_scales, canonical_scale, canonical_level)
    first = features[0]
    out = first.new_zeros((rois.shape[0], first.shape[1], pooled_height, pooled_width))
    for level, (feature, scale) in enumerate(zip(features, spatial_scales)):
        idx = torch.nonzero(levels == level).squeeze(1)
        if idx.numel():
            out[idx] = _align.roi_align_forward(feature, rois[idx], scale, pooled_height, pooled_width,
                                                sampling_ratio, aligned, False)[0].to(out.dtype)
    return out


def _reference_backward(grad: Tensor, rois: Tensor, spatial_scales: list[float], pooled_height: int,
                        pooled_width: int, batch_size: int, channels: int, heights: list[int], widths: list[int],
                        sampling_ratio: int, aligned: bool, canonical_scale: int, canonical_level: int) -> list[Tensor]:
    levels = pyramid_levels(rois, spatial_scales, canonical_scale, canonical_level)
    empty = torch.empty((0,), dtype=torch.int64, device=grad.device)
    grads = []
    for level, (scale, height, width) in enumerate(zip(spatial_scales, heights, widths)):
        idx = torch.nonzero(levels == level).squeeze(1)
        grads.append(_align.roi_align_backward(grad[idx], rois[idx], empty, scale, pooled_height, pooled_width,
                                               batch_size, channels, height, width, sampling_ratio, aligned, False))
    return grads


# ---------------------------------------------------------------- registration
@torch.library.custom_op("roikit::multilevel_roi_align", mutates_args=())
def multilevel_roi_align_op(features: list[Tensor], rois: Tensor, spatial_scales: list[float], pooled_height: int,
                            pooled_width: int, sampling_ratio: int, aligned: bool, canonical_scale: int,
                            canonical_level: int) -> Tensor:
    return _reference_forward(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
                              canonical_scale, canonical_level)


@multilevel_roi_align_op.register_fake
def _(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale,
      canonical_level):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roikit::multilevel_roi_align_backward", mutates_args=())
def multilevel_roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scales: list[float], pooled_height: int,
                                     pooled_width: int, batch_size: int, channels: int, heights: list[int],
                                     widths: list[int], sampling_ratio: int, aligned: bool, canonical_scale: int,
                                     canonical_level: int, deterministic: bool) -> list[Tensor]:
    return _reference_backward(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels, heights,
                               widths, sampling_ratio, aligned, canonical_scale, canonical_level)


@multilevel_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels, heights, widths, sampling_ratio,
      aligned, canonical_scale, canonical_level, deterministic):
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


def _setup(ctx, inputs, output):
    features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, cs, cl = inputs
    ctx.save_for_backward(rois)
    n, c = features[0].shape[:2]
    ctx.settings = (list(spatial_scales), pooled_height, pooled_width, n, c, [f.shape[2] for f in features],
                    [f.shape[3] for f in features], sampling_ratio, aligned, cs, cl)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grads = multilevel_roi_align_backward_op(grad.contiguous(), rois, *ctx.settings,
                                             deterministic_backward_enabled())
    return list(grads), None, None, None, None, None, None, None, None


multilevel_roi_align_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- functional
def multilevel_roi_align(
    features: Sequence[Tensor],
    rois: BoxesType,
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
    sampling_ratio: int = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """RoIAlign (average) of each box from its own pyramid level, chosen by the FPN rule.

    Args:
        features (List[Tensor[N, C, H_l, W_l]]): the pyramid, finest first, one dtype and device, same N and C.
        rois (Tensor[K, 5] or List[Tensor[L, 4]]): ``(batch_index, x1, y1, x2, y2)`` rows in image pixels, or one
            ``(x1, y1, x2, y2)`` tensor per image.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        spatial_scales (List[float]): ``1 / stride`` of each map, e.g. ``[1/4, 1/8, 1/16, 1/32]``: a 224 x 224 box
            goes to level 4 (stride 16, the third map here), a 112 x 112 box to level 3.
        sampling_ratio (int): samples per bin and axis, ``<= 0`` for ``ceil(bin size)``.
        aligned (bool): the half-pixel shift of :func:`roikit.ops.roi_align` (torchvision's pooler uses ``False``).
        canonical_scale, canonical_level (int): the level rule, see :func:`pyramid_levels`.

    Returns:
        Tensor[K, C, PH, PW], boxes in the order given. Equal to ``torchvision.ops.MultiScaleRoIAlign`` with the
        same scales (``aligned=False``).
    """
    if isinstance(features, Tensor) or not isinstance(features, Sequence) or len(features) == 0:
        raise ValueError("features must be a non-empty list of Tensor[N, C, H, W], finest level first")
    features = list(features)
    for i, f in enumerate(features):
        check_features(f, f"features[{i}]")
        if f.dtype != features[0].dtype or f.device != features[0].device:
            raise ValueError(f"features[{i}] is {f.dtype} on {f.device} but features[0] is {features[0].dtype} on "
                             f"{features[0].device}; every level must share one dtype and device")
        if f.shape[:2] != features[0].shape[:2]:
            raise ValueError(f"features[{i}] has N, C = {tuple(f.shape[:2])} but features[0] has "
                             f"{tuple(features[0].shape[:2])}; every level must have the same batch and channels")
    if isinstance(spatial_scales, (int, float)) or len(spatial_scales) != len(features):
        raise ValueError(f"spatial_scales must give one scale per feature map ({len(features)}), got {spatial_scales!r}")
    scales = [check_spatial_scale(s) for s in spatial_scales]
    boxes = convert_boxes_to_rois(rois, features[0])
    ph, pw = pair(output_size)
    for name, value in (("sampling_ratio", sampling_ratio), ("canonical_scale", canonical_scale),
                        ("canonical_level", canonical_level)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if canonical_scale <= 0:
        raise ValueError(f"canonical_scale must be positive, got {canonical_scale}")
    return multilevel_roi_align_op(features, boxes, scales, ph, pw, sampling_ratio, bool(aligned), canonical_scale,
                                   canonical_level)
