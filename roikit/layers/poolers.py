"""Poolers for detection models: any roikit region op over one feature map or a feature pyramid.

:class:`RoIPooler` has the call signature of ``torchvision.ops.MultiScaleRoIAlign`` (features dict, list of
proposals, image sizes), so it drops into torchvision's detection models, and takes the op by name:
``"roi_align"``, ``"roi_pool"``, ``"prroi_pool"``, ``"roi_spp"``, ``"ps_roi_align"``, ``"ps_roi_pool"`` or
``"roi_align_rotated"`` (rotated boxes ``(cx, cy, w, h, angle)``), with that op's own settings, or
``"deform_roi_pool"``, which learns its bins' offsets (one offset head per level, :mod:`.deform_pooler`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops import (
    DeformRoIPool,
    PrRoIPool,
    PSRoIAlign,
    PSRoIPool,
    RoIAlign,
    RoIAlignRotated,
    RoIPool,
    RoISPP,
    autocast_to_float32,
    convert_boxes_to_rois,
    convert_rotated_boxes_to_rois,
    deform_roi_pool,
    multilevel_roi_align,
    prroi_pool,
    ps_roi_align,
    ps_roi_pool,
    pyramid_levels,
    roi_align,
    roi_align_rotated,
    roi_pool,
    roi_spp,
)
from ..utils.checks import pair
from ..utils.fx import fx_leaf
from .deform_pooler import DEFORM_OP, DeformRoIPoolLevels, refuse_deform_options

OPS = {"roi_align": (RoIAlign, roi_align), "roi_pool": (RoIPool, roi_pool), "prroi_pool": (PrRoIPool, prroi_pool),
       "roi_spp": (RoISPP, roi_spp), "ps_roi_align": (PSRoIAlign, ps_roi_align),
       "ps_roi_pool": (PSRoIPool, ps_roi_pool), "roi_align_rotated": (RoIAlignRotated, roi_align_rotated),
       DEFORM_OP: (DeformRoIPool, deform_roi_pool)}
SAMPLED = ("roi_align", "ps_roi_align", "roi_align_rotated", DEFORM_OP)  # the ops that take sampling_ratio
ROTATED = "roi_align_rotated"  # boxes (cx, cy, w, h, angle) instead of (x1, y1, x2, y2)


def assign_boxes_to_levels(boxes: Tensor, min_level: int, max_level: int, canonical_scale: int = 224,
                           canonical_level: int = 4) -> Tensor:
    """FPN's rule (Lin et al. 2017, eq. 1): the pyramid level of each box, counted from ``min_level``.

    ``level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)`` clamped to
    ``[min_level, max_level]``; returns ``Tensor[K]`` of ``level - min_level`` (int64), the same as torchvision's
    ``LevelMapper`` (-1 for a reversed box, which no level pools). A 224 x 224 box goes to level 4 (stride 16),
    a 112 x 112 box to level 3. The rule itself lives with the fused op, :func:`roikit.ops.multilevel_roi_align`.

    Args:
        boxes (Tensor[K, 4]): (x1, y1, x2, y2) in image pixels.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a Tensor[K, 4], got shape {tuple(boxes.shape)}")
    if min_level > max_level:
        raise ValueError(f"min_level must not exceed max_level, got {min_level} > {max_level}")
    rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)
    scales = [2.0 ** -level for level in range(min_level, max_level + 1)]
    return pyramid_levels(rois, scales, canonical_scale, canonical_level)


def infer_scale(feature: Tensor, image_size: Sequence[int]) -> float:
    """The feature map's ``spatial_scale`` as a power of two: a 50-row map of an 800-row image gives 1 / 16."""
    approx = feature.shape[-2] / image_size[0]
    return 2.0 ** round(math.log2(approx))


class RoIPooler(nn.Module):
    """Pool proposals from one or several feature maps with any roikit op.

    Args:
        featmap_names (List[str]): the feature maps to use, finest first.
        output_size (int or Tuple[int, int]): bins per box (ignored by ``roi_spp``, whose ``levels`` set its size).
        sampling_ratio (int): samples per bin and axis for ``roi_align``, ``ps_roi_align``, ``roi_align_rotated``
            and ``deform_roi_pool`` (the others take none).
        op (str): ``"roi_align"``, ``"roi_pool"``, ``"prroi_pool"``, ``"roi_spp"``, or the position-sensitive
            ``"ps_roi_align"`` / ``"ps_roi_pool"`` (R-FCN: ``C' * PH * PW`` channels in, ``C'`` out), or
            ``"roi_align_rotated"`` (rotated boxes, see :func:`roikit.ops.roi_align_rotated`), or
            ``"deform_roi_pool"`` (learned offsets, see :class:`~roikit.layers.deform_pooler.DeformRoIPoolLevels`).
        canonical_scale, canonical_level (int): the FPN level rule, see :func:`assign_boxes_to_levels`.
        **op_options: the op's own settings (``aligned``, ``pool``, ``rounding``, ``levels``, ``clockwise``,
            ``angle_unit``; ``deform_roi_pool``: ``channels`` (required), ``gamma``, ``modulated``,
            ``deform_fc_channels``).

    The op's module is built (and its settings checked) once, here. ``torch.fx`` traces the pooler as one call,
    as torchvision's ``MultiScaleRoIAlign``.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int | tuple[int, int] = 7, sampling_ratio: int = 2,
                 op: str = "roi_align", *, canonical_scale: int = 224, canonical_level: int = 4, **op_options):
        super().__init__()
        if op not in OPS:
            raise ValueError(f"op must be one of {', '.join(map(repr, OPS))}, got {op!r}")
        if isinstance(featmap_names, str) or len(featmap_names) == 0:
            raise ValueError(f"featmap_names must be a non-empty list of names, got {featmap_names!r}")
        self.featmap_names = list(featmap_names)
        self.output_size = pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.op = op
        self.op_options = dict(op_options)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        options = dict(op_options, sampling_ratio=sampling_ratio) if op in SAMPLED else dict(op_options)
        if op != "roi_spp":
            options["output_size"] = self.output_size
        module, self._function = OPS[op]
        self.deform = None  # deform_roi_pool's offset heads: weights, one pack per level
        if op == DEFORM_OP:
            self.deform = DeformRoIPoolLevels(len(self.featmap_names), self.output_size, sampling_ratio,
                                              **op_options)
        else:
            refuse_deform_options(op, op_options)
            module(**options)  # checks every setting now, not at the first batch (TypeError: a setting it lacks)
        self._options = options
        # one op for a whole pyramid (it assigns the levels itself): a single fused launch on CUDA
        self.fused = op == "roi_align" and op_options.get("pool", "avg") == "avg"

    def output_shape(self, channels: int) -> tuple[int, ...]:
        """Shape of one box's pooled feature: ``(C, PH, PW)``, or ``(C * bins,)`` for ``roi_spp``."""
        if self.op == "roi_spp":
            return RoISPP(**self._options).output_shape(channels)
        if self.op.startswith("ps_"):
            return (channels // (self.output_size[0] * self.output_size[1]), *self.output_size)
        return (channels, *self.output_size)

    def _pool(self, feature: Tensor, rois: Tensor, scale: float, level: int = 0) -> Tensor:
        if self.deform is not None:
            return self.deform(feature, rois, scale, level)
        return self._function(feature, rois, spatial_scale=scale, **self._options)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """
        Args:
            x (Dict[str, Tensor[N, C, H_l, W_l]]): feature maps; only ``featmap_names`` are used.
            boxes (List[Tensor[L_i, 4]]): proposals per image, (x1, y1, x2, y2) in image pixels; for
                ``op="roi_align_rotated"`` List[Tensor[L_i, 5]] of (cx, cy, w, h, angle), pyramid levels by
                ``sqrt(w h)``.
            image_shapes (List[Tuple[int, int]]): the (height, width) of each image as fed to the backbone.

        Returns:
            Tensor[K, C, PH, PW] (``Tensor[K, C * bins]`` for ``roi_spp``), boxes in the order given.
        """
        return _pool_regions(self, x, boxes, image_shapes)

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.op_options.items())
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, op={self.op!r}{options}")


@fx_leaf
def _pool_regions(pooler: RoIPooler, x: dict[str, Tensor], boxes: list[Tensor],
                  image_shapes: list[tuple[int, int]]) -> Tensor:
    missing = [name for name in pooler.featmap_names if name not in x]
    if missing:
        raise ValueError(f"feature maps {missing} not found; the features have {list(x)}")
    if len(image_shapes) == 0:
        raise ValueError("image_shapes must give the size of each image")
    features, dtype = [], None
    for name in pooler.featmap_names:  # under autocast: float32, as the ops run
        feature, boxes, dtype = autocast_to_float32(x[name], boxes)
        features.append(feature)
    max_size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
    scales = [infer_scale(f, max_size) for f in features]
    if pooler.op == ROTATED:
        rois = convert_rotated_boxes_to_rois(boxes, features[0], pooler._options.get("aligned", True))
    else:
        rois = convert_boxes_to_rois(boxes, features[0])
    if len(features) == 1:
        out = pooler._pool(features[0], rois, scales[0])
    elif pooler.fused:
        out = multilevel_roi_align(features, rois, pooler.output_size, scales, pooler.sampling_ratio,
                                   pooler.op_options.get("aligned", False), canonical_scale=pooler.canonical_scale,
                                   canonical_level=pooler.canonical_level)
    else:
        level_rois = rois
        if pooler.op == ROTATED:  # FPN's rule on sqrt(w h): the axis-aligned box (0, 0, w, h) has that area
            level_rois = torch.cat([rois[:, :1], torch.zeros_like(rois[:, 1:3]), rois[:, 3:5]], dim=1)
        levels = pyramid_levels(level_rois, scales, pooler.canonical_scale, pooler.canonical_level)
        out = features[0].new_zeros((rois.shape[0], *pooler.output_shape(features[0].shape[1])))
        for level, (feature, scale) in enumerate(zip(features, scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            out = out.index_put((idx,), pooler._pool(feature, rois[idx], scale, level))
    return out if dtype is None else out.to(dtype)
