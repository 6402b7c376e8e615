"""Spatial pyramid pooling of each RoI (SPPnet detection): several grids of one box, concatenated."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _library
from ._utils import (
    BoxesType,
    autocast_to_float32,
    check_choice,
    check_features,
    check_spatial_scale,
    convert_boxes_to_rois,
    fx_leaf,
)
from .roi_pool import ROUNDINGS


def _check_levels(levels) -> tuple[int, ...]:
    if isinstance(levels, int) or not isinstance(levels, Sequence) or len(levels) == 0 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in levels
    ):
        raise ValueError(f"levels must be a non-empty sequence of positive ints, e.g. (1, 2, 3, 6), got {levels!r}")
    return tuple(levels)


@fx_leaf
def roi_spp(
    input: Tensor,
    boxes: BoxesType,
    levels: Sequence[int] = (1, 2, 3, 6),
    spatial_scale: float = 1.0,
    rounding: str = "torchvision",
) -> Tensor:
    """Max-pool each box at several grid sizes and concatenate: a fixed-length vector for any box.

    Args:
        input (Tensor[N, C, H, W]): the feature map.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): as in :func:`roikit.ops.roi_pool`.
        levels (Sequence[int]): grid sizes; the default ``(1, 2, 3, 6)`` gives 1 + 4 + 9 + 36 = 50 bins, as in SPPnet.
        spatial_scale (float): ``1 / stride``.
        rounding (str): the rule of :func:`roikit.ops.roi_pool` used for every level.

    Returns:
        Tensor[K, C * sum(n * n)]: level by level, each level's ``[K, C, n, n]`` flattened (channel-major).
    """
    input, boxes, dtype = autocast_to_float32(input, boxes)
    check_features(input)
    rois = convert_boxes_to_rois(boxes, input, check_values=False)  # the op checks the values
    levels = _check_levels(levels)
    scale = check_spatial_scale(spatial_scale)
    check_choice(rounding, "rounding", ROUNDINGS)
    k, c = rois.shape[0], input.shape[1]
    out = torch.cat(
        [_library.roi_pool_op(input, rois, scale, n, n, rounding)[0].reshape(k, c * n * n) for n in levels], 1)
    return out if dtype is None else out.to(dtype)


class RoISPP(nn.Module):
    """Module form of :func:`roi_spp`."""

    def __init__(self, levels: Sequence[int] = (1, 2, 3, 6), spatial_scale: float = 1.0, rounding: str = "torchvision"):
        super().__init__()
        self.levels = _check_levels(levels)
        self.spatial_scale = check_spatial_scale(spatial_scale)
        self.rounding = check_choice(rounding, "rounding", ROUNDINGS)

    def output_shape(self, channels: int) -> tuple[int]:
        """One box's output shape for ``channels``-channel features: ``(C * sum(n * n),)``."""
        return (channels * sum(n * n for n in self.levels),)

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:
        return roi_spp(input, boxes, self.levels, self.spatial_scale, self.rounding)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, spatial_scale={self.spatial_scale}, rounding={self.rounding!r}"
