"""RoIAlign over a feature pyramid in one op: each box is pooled from the level the FPN rule gives it.

``multilevel_roi_align`` equals torchvision's ``MultiScaleRoIAlign`` (same level rule, same RoIAlign), but as one
registered op: on CUDA one fused Triton launch assigns every box its level and pools it, forward and backward,
instead of one launch and one scatter per level. Its default implementation (CPU, any device) is the reference:
the level rule, then the plain-PyTorch RoIAlign per level.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from . import _library
from ._utils import (
    BoxesType,
    autocast_to_float32,
    check_bool,
    check_features,
    check_int,
    check_spatial_scale,
    convert_boxes_to_rois,
    fx_leaf,
    pair,
)
from .pytorch.multilevel_roi_align import level_range, pyramid_levels

__all__ = ["multilevel_roi_align", "pyramid_levels", "level_range"]


@fx_leaf
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
    dtype = None
    for i, f in enumerate(features):
        check_features(f, f"features[{i}]")
        f, rois, dtype = autocast_to_float32(f, rois)
        features[i] = f
        if f.dtype != features[0].dtype or f.device != features[0].device:
            raise ValueError(f"features[{i}] is {f.dtype} on {f.device} but features[0] is {features[0].dtype} on "
                             f"{features[0].device}; every level must share one dtype and device")
        if f.shape[:2] != features[0].shape[:2]:
            raise ValueError(f"features[{i}] has N, C = {tuple(f.shape[:2])} but features[0] has "
                             f"{tuple(features[0].shape[:2])}; every level must have the same batch and channels")
    if isinstance(spatial_scales, (int, float)) or len(spatial_scales) != len(features):
        raise ValueError(f"spatial_scales must give one scale per feature map ({len(features)}), got "
                         f"{spatial_scales!r}")
    scales = [check_spatial_scale(s) for s in spatial_scales]
    boxes = convert_boxes_to_rois(rois, features[0], check_values=False)  # the op checks the values
    ph, pw = pair(output_size)
    check_int(sampling_ratio, "sampling_ratio")
    check_bool(aligned, "aligned")
    check_int(canonical_scale, "canonical_scale", minimum=1)
    check_int(canonical_level, "canonical_level")
    out = _library.multilevel_roi_align_op(features, boxes, scales, ph, pw, sampling_ratio, aligned, canonical_scale,
                                           canonical_level)
    return out if dtype is None else out.to(dtype)
