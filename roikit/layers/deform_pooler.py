"""Deformable RoI pooling in :class:`~roikit.layers.poolers.RoIPooler`: one offset-learning pack per pyramid level.

``RoIPooler(names, 7, 2, op="deform_roi_pool", channels=256)`` pools as mmdet's ``SingleRoIExtractor`` with
``roi_layer=dict(type="DeformRoIPoolPack", output_size=7, output_channels=256)`` (mmdet's
configs/dcn/faster_rcnn_r50_fpn_dpool_1x_coco.py): its ``build_roi_layers`` makes one roi layer per feature map
stride, so each level has its own offset head. Here each level holds a :class:`~roikit.ops.DeformRoIPoolPack`
(:class:`~roikit.ops.ModulatedDeformRoIPoolPack` with ``modulated=True``) for its weights and settings; the pooling
runs at the scale RoIPooler infers from the map's size at each call, so the pack's own ``spatial_scale`` is unused.

Per level and box: the plain pooling (no offset, i.e. ``roi_align(aligned=True)``), flattened to ``C * PH * PW``,
goes through the pack's ``offset_fc`` to ``[2, PH, PW]`` offsets, which move the bins of a second, deformed
pooling (:func:`~roikit.ops.deform_roi_pool`); modulated, the pack's ``mask_fc`` scales each bin by a sigmoid.
Both heads' last layers start at zero, so a fresh pooler is ``roi_align(aligned=True)`` (times 0.5 modulated).

Boxes go to levels by RoIPooler's FPN rule (:func:`~roikit.layers.poolers.assign_boxes_to_levels`); for maps of
strides 4-32 (levels 2-5) it is mmdet's ``map_roi_levels`` with ``finest_scale=56``,
``floor(log2(sqrt(area) / 56))`` clamped to the levels. A box that reads a non-finite cell gets non-finite
offsets and pools NaN (roi_align would give it NaN too). Every level's heads run on every call, on no boxes where
none go to it, so each weight gets a gradient (zero there), as DistributedDataParallel wants (mmdet adds
``0 * sum(parameters)`` for the same reason).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..ops import DeformRoIPoolPack, ModulatedDeformRoIPoolPack, deform_roi_pool
from ..utils.checks import check_bool, check_int

__all__ = ["DEFORM_OP", "DEFORM_OPTIONS", "DeformRoIPoolLevels", "refuse_deform_options"]

DEFORM_OP = "deform_roi_pool"
DEFORM_OPTIONS = ("channels", "gamma", "modulated", "deform_fc_channels")  # RoIPooler's settings for DEFORM_OP


def refuse_deform_options(op: str, options: Mapping) -> None:
    """ValueError when ``options`` of another op than ``deform_roi_pool`` hold one of :data:`DEFORM_OPTIONS`."""
    given = [key for key in DEFORM_OPTIONS if key in options]
    if given:
        raise ValueError(f"{given[0]!r} is a setting of op={DEFORM_OP!r} (learned offsets), not of op={op!r}")


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"{DEFORM_OP}: gamma (the offsets' scale, a fraction of the box size) must be a finite "
                         f"number > 0, got {gamma!r}")
    return float(gamma)


class DeformRoIPoolLevels(nn.Module):
    """The offset (and mask) heads of a deformable :class:`~roikit.layers.poolers.RoIPooler`, one pack per level.

    Args:
        num_levels (int): feature maps pooled from (one pack each).
        output_size (Tuple[int, int]): ``(PH, PW)``.
        sampling_ratio (int): samples per bin and axis (``<= 0``: ``ceil(bin size)``, mmcv's default 0).
        channels (int): C, the feature maps' channels: the heads read ``C * PH * PW`` features. Required.
        gamma (float): the offsets' scale (mmcv's default 0.1): an offset of 1 moves a bin by ``gamma`` times the
            box's width (x) or height (y). Finite and > 0.
        modulated (bool): also learn a mask per bin (DCNv2, :class:`~roikit.ops.ModulatedDeformRoIPoolPack`).
        deform_fc_channels (int): the heads' hidden width (mmcv's default 1024).
        aligned (bool): accepted only as True (deform_roi_pool is always aligned), so that a config's
            ``options: {aligned: true}`` carries over from roi_align.

    The heads are plain ``nn.Linear`` layers of fixed size, so ``state_dict`` saves and loads them as any
    module's and torch.export sees fixed shapes.
    """

    def __init__(self, num_levels: int, output_size: tuple[int, int], sampling_ratio: int, *,
                 channels: int | None = None, gamma: float = 0.1, modulated: bool = False,
                 deform_fc_channels: int = 1024, aligned: bool = True):
        super().__init__()
        if channels is None:
            raise ValueError(f"{DEFORM_OP}: channels (the feature maps' C; the offset heads read C * PH * PW "
                             f"features) must be given")
        self.channels = check_int(channels, f"{DEFORM_OP}: channels", 1)
        self.gamma = _check_gamma(gamma)
        self.modulated = check_bool(modulated, f"{DEFORM_OP}: modulated")
        check_int(deform_fc_channels, f"{DEFORM_OP}: deform_fc_channels", 1)
        if aligned is not True:
            raise ValueError(f"{DEFORM_OP} is always aligned (half-pixel offset, as mmcv's); got aligned={aligned!r}")
        pack = ModulatedDeformRoIPoolPack if self.modulated else DeformRoIPoolPack
        self.packs = nn.ModuleList(
            pack(output_size, channels, deform_fc_channels, spatial_scale=1.0, sampling_ratio=sampling_ratio,
                 gamma=self.gamma) for _ in range(check_int(num_levels, "num_levels", 1)))

    def forward(self, feature: Tensor, rois: Tensor, spatial_scale: float, level: int) -> Tensor:
        """Tensor[N, C, H, W] map of pyramid ``level``, Tensor[K, 5] rois -> Tensor[K, C, PH, PW]."""
        if feature.shape[1] != self.channels:
            raise ValueError(f"{DEFORM_OP}: the feature map has {feature.shape[1]} channels but the offset heads "
                             f"were built for channels={self.channels}")
        pack = self.packs[level]
        size, ratio = pack.output_size, pack.sampling_ratio
        plain = deform_roi_pool(feature, rois, None, size, spatial_scale, ratio, self.gamma)
        flat = plain.flatten(1)  # [K, C * PH * PW]
        offset = pack.offset_fc(flat).view(flat.shape[0], 2, *size).to(plain.dtype)  # (autocast: half out of fc)
        # a box that read a non-finite cell has non-finite offsets (the op refuses them): it pools NaN, as it would
        # under roi_align; the other boxes are unaffected
        finite = torch.isfinite(offset).flatten(1).all(1)[:, None, None, None]
        out = deform_roi_pool(feature, rois, torch.where(finite, offset, 0.0), size, spatial_scale, ratio,
                              self.gamma)
        if self.modulated:
            out = out * pack.mask_fc(flat).view(flat.shape[0], 1, *size).to(out.dtype)
        return torch.where(finite, out, math.nan)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gamma={self.gamma}, modulated={self.modulated}"
