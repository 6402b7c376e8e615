"""Swap a detector's RoI pooler for a roikit one: what does another pooling op cost a trained model?"""
from __future__ import annotations

import math

from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from ..layers.deform_pooler import DEFORM_OP
from ..layers.poolers import RoIPooler
from .torchvision_models import given_feature_maps

__all__ = ["swap_roi_pooler"]


def swap_roi_pooler(model: nn.Module, op: str = "roi_align", **options) -> nn.Module:
    """Replace ``model.roi_heads.box_roi_pool`` by a :class:`RoIPooler` running ``op``; returns ``model``.

    Works on torchvision's two-stage detectors (``fasterrcnn_resnet50_fpn`` and the like, whose pooler is a
    ``MultiScaleRoIAlign``) and on roikit's. The new pooler keeps the old one's feature maps, output size,
    sampling ratio and FPN level rule; ``options`` are the op's own (``aligned``, ``rounding``, ``pool``,
    ``levels``), laid over the old pooler's when that is a roikit one of the same op (so ``aligned=True`` is not
    dropped). torchvision's ``MultiScaleRoIAlign`` is ``op="roi_align", aligned=False``; the maps it names that the
    backbone does not give (it skips them) are left out (:func:`~.torchvision_models.given_feature_maps`).

    The box head after the pooler stays, so the new pooler must give as many features per box as the old one:
    ``roi_spp`` only fits with ``levels`` whose bins add up to the output size's (e.g. ``levels=(7,)`` for 7x7).

    ``op="deform_roi_pool"`` needs the feature maps' channels for its offset heads: ``channels=C`` when given,
    else the old pooler's (a deform one), else ``model.backbone.out_channels``, else the box head's input (its
    first convolution's ``in_channels``, or its first linear layer's ``in_features`` over ``PH * PW``); ValueError
    when none of them tells. The new offset heads are untrained (zero: the pooler starts as
    ``roi_align(aligned=True)``).
    """
    roi_heads = getattr(model, "roi_heads", None)
    old = getattr(roi_heads, "box_roi_pool", None)
    if old is None or not all(hasattr(old, a) for a in ("featmap_names", "output_size", "sampling_ratio")):
        raise ValueError(f"swap_roi_pooler: {type(model).__name__} has no roi_heads.box_roi_pool with featmap_names,"
                         f" output_size and sampling_ratio (a torchvision or roikit two-stage detector)")
    if isinstance(old, RoIPooler) and old.op == op:
        options = {**old.op_options, **options}
    output_size = tuple(old.output_size) if isinstance(old.output_size, (tuple, list)) else (old.output_size,) * 2
    if op == DEFORM_OP and "channels" not in options:
        options["channels"] = _feature_channels(model, math.prod(output_size))
    names = list(old.featmap_names)
    if isinstance(old, MultiScaleRoIAlign):
        names = given_feature_maps(model, names)
    new = RoIPooler(names, output_size=output_size, sampling_ratio=old.sampling_ratio, op=op,
                    canonical_scale=getattr(old, "canonical_scale", 224),
                    canonical_level=getattr(old, "canonical_level", 4), **options)
    bins_old, bins_new = math.prod(output_size), math.prod(new.output_shape(1))
    if bins_new != bins_old:
        raise ValueError(f"swap_roi_pooler: {op} with {options} gives {bins_new} bins per channel, but the box head "
                         f"takes {bins_old} ({output_size[0]}x{output_size[1]})")
    roi_heads.box_roi_pool = new
    return model


def _feature_channels(model: nn.Module, bins: int) -> int:
    """The channels of the feature maps ``model``'s box pooler reads (see :func:`swap_roi_pooler`)."""
    channels = getattr(getattr(model, "backbone", None), "out_channels", None)
    if isinstance(channels, int) and not isinstance(channels, bool) and channels > 0:
        return channels
    head = getattr(model.roi_heads, "box_head", None)
    first = next((m for m in head.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None) if head else None
    if isinstance(first, nn.Conv2d):
        return first.in_channels
    if isinstance(first, nn.Linear) and first.in_features % bins == 0:
        return first.in_features // bins
    raise ValueError(f"swap_roi_pooler: op={DEFORM_OP!r} needs the feature maps' channels for its offset heads, and "
                     f"{type(model).__name__} tells them nowhere (no backbone.out_channels, no box head whose first "
                     f"layer reads C x {bins} bins): give channels=C")
