"""Swap a detector's RoI pooler for a roikit one: what does another pooling op cost a trained model?"""
from __future__ import annotations

import math

from torch import nn

from ..layers.poolers import RoIPooler

__all__ = ["swap_roi_pooler"]


def swap_roi_pooler(model: nn.Module, op: str = "roi_align", **options) -> nn.Module:
    """Replace ``model.roi_heads.box_roi_pool`` by a :class:`RoIPooler` running ``op``; returns ``model``.

    Works on torchvision's two-stage detectors (``fasterrcnn_resnet50_fpn`` and the like, whose pooler is a
    ``MultiScaleRoIAlign``) and on roikit's. The new pooler keeps the old one's feature maps, output size,
    sampling ratio and FPN level rule; ``options`` are the op's own (``aligned``, ``rounding``, ``pool``,
    ``levels``), laid over the old pooler's when that is a roikit one of the same op (so ``aligned=True`` is not
    dropped). torchvision's ``MultiScaleRoIAlign`` is ``op="roi_align", aligned=False``.

    The box head after the pooler stays, so the new pooler must give as many features per box as the old one:
    ``roi_spp`` only fits with ``levels`` whose bins add up to the output size's (e.g. ``levels=(7,)`` for 7x7).
    """
    roi_heads = getattr(model, "roi_heads", None)
    old = getattr(roi_heads, "box_roi_pool", None)
    if old is None or not all(hasattr(old, a) for a in ("featmap_names", "output_size", "sampling_ratio")):
        raise ValueError(f"swap_roi_pooler: {type(model).__name__} has no roi_heads.box_roi_pool with featmap_names,"
                         f" output_size and sampling_ratio (a torchvision or roikit two-stage detector)")
    if isinstance(old, RoIPooler) and old.op == op:
        options = {**old.op_options, **options}
    output_size = tuple(old.output_size) if isinstance(old.output_size, (tuple, list)) else (old.output_size,) * 2
    new = RoIPooler(list(old.featmap_names), output_size=output_size, sampling_ratio=old.sampling_ratio, op=op,
                    canonical_scale=getattr(old, "canonical_scale", 224),
                    canonical_level=getattr(old, "canonical_level", 4), **options)
    bins_old, bins_new = math.prod(output_size), math.prod(new.output_shape(1))
    if bins_new != bins_old:
        raise ValueError(f"swap_roi_pooler: {op} with {options} gives {bins_new} bins per channel, but the box head "
                         f"takes {bins_old} ({output_size[0]}x{output_size[1]})")
    roi_heads.box_roi_pool = new
    return model
