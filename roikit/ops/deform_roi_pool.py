"""Deformable RoI pooling (Dai et al. 2017, "Deformable Convolutional Networks"), with mmcv's semantics.

:func:`deform_roi_pool` is RoIAlign (``aligned=True``) whose bins each move by a learned offset, a fraction of the
box's size; :class:`DeformRoIPoolPack` learns the offsets from the undeformed pooling with a small fc head, as
mmcv's, and :class:`ModulatedDeformRoIPoolPack` also learns a mask that scales each bin (DCNv2's modulation).
"""
from __future__ import annotations

import math
import numbers

from torch import Tensor, nn

from . import _library
from ._utils import (
    BoxesType,
    autocast_to_float32,
    check_features,
    check_int,
    check_spatial_scale,
    convert_boxes_to_rois,
    fx_leaf,
    pair,
)


def check_gamma(gamma) -> float:
    """``gamma`` as a float: a finite real number (the offsets' scale)."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number (the offsets' scale), got {gamma!r}")
    return float(gamma)


def _check_offset(offset, rois: Tensor, input: Tensor, pooled: tuple[int, int]) -> None:
    if offset is None:
        return
    expected = (rois.shape[0], 2, *pooled)
    if not isinstance(offset, Tensor) or tuple(offset.shape) != expected:
        got = tuple(offset.shape) if isinstance(offset, Tensor) else type(offset).__name__
        raise ValueError(f"offset must be None or a Tensor[K, 2, PH, PW] = {list(expected)} (x, then y, per bin), "
                         f"got {got}")
    if offset.device != input.device:
        raise ValueError(f"offset is on {offset.device} but input is on {input.device}; put both on one device")
    if not offset.is_floating_point():
        raise ValueError(f"offset must be a floating-point tensor, got {offset.dtype}")
    # its values (finite) are checked by roikit::deform_roi_pool


@fx_leaf
def deform_roi_pool(
    input: Tensor,
    boxes: BoxesType,
    offset: Tensor | None,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Pool each box into ``output_size`` bins, each bin moved by its own offset (mmcv's ``deform_roi_pool``).

    Args:
        input (Tensor[N, C, H, W]): the feature map.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): ``(batch_index, x1, y1, x2, y2)`` rows in image pixels, or
            one ``(x1, y1, x2, y2)`` tensor per image. On ``input``'s device, any floating dtype.
        offset (Tensor[K, 2, PH, PW] or None): per bin, the shift along x (``offset[:, 0]``) and y (``offset[:, 1]``)
            in units of ``gamma`` times the box's width and height. None (mmcv's default) is no shift.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        spatial_scale (float): ``1 / stride``: at stride 16, ``1 / 16`` maps a 320 px box to 20 cells.
        sampling_ratio (int): samples per bin along each axis; ``<= 0`` (mmcv's default 0) takes ``ceil(bin size)``.
        gamma (float): the offsets' scale (mmcv's default 0.1).

    In cells, with ``x1 = box_x1 * spatial_scale - 0.5`` and ``roi_w = box_x2 * spatial_scale - 0.5 - x1`` (no
    minimum size), bin ``(ph, pw)`` starts at ``x1 + gamma * roi_w * offset[k, 0, ph, pw] + pw * roi_w / PW`` (and
    so for y) and averages its bilinear samples as :func:`roikit.ops.roi_align` with ``aligned=True`` does; with no
    offset it is that op. Example: a 64 px box at stride 16 is 4 cells wide; ``offset = 1`` moves its bins by
    ``0.1 * 4 = 0.4`` cell.

    The offset gradient is the forward's derivative (gradcheck): 0 where a sample holds the map's edge value
    (before the first or past the last cell centre), where mmcv's kernel differentiates the unclamped bilinear
    formula; elsewhere the two agree. Memory, non-finite cells, autocast and tracing as :func:`roi_align`; a bin
    moved off the map is 0, whatever its offset.

    Returns:
        Tensor[K, C, PH, PW].
    """
    input, boxes, dtype = autocast_to_float32(input, boxes)
    if dtype is not None and isinstance(offset, Tensor):
        offset = offset.float()
    check_features(input)
    rois = convert_boxes_to_rois(boxes, input, check_values=False)  # the op checks the values
    ph, pw = pair(output_size)
    _check_offset(offset, rois, input, (ph, pw))
    scale = check_spatial_scale(spatial_scale)
    check_int(sampling_ratio, "sampling_ratio")
    out = _library.deform_roi_pool_op(input, rois, offset, scale, ph, pw, sampling_ratio, check_gamma(gamma))
    return out if dtype is None else out.to(dtype)


class DeformRoIPool(nn.Module):
    """Module form of :func:`deform_roi_pool`: ``forward(input, boxes, offset=None)``."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 gamma: float = 0.1):
        super().__init__()
        self.output_size = pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)
        self.sampling_ratio = check_int(sampling_ratio, "sampling_ratio")
        self.gamma = check_gamma(gamma)

    def forward(self, input: Tensor, boxes: BoxesType, offset: Tensor | None = None) -> Tensor:
        return deform_roi_pool(input, boxes, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                               self.gamma)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")


def _fc_head(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    """``layers`` Linear layers with ReLU between them; the last one starts at zero (so do its outputs)."""
    sizes = [in_features] + [hidden] * (layers - 1) + [out_features]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        modules.append(nn.Linear(a, b))
        if i < layers - 1:
            modules.append(nn.ReLU(inplace=True))
    nn.init.zeros_(modules[-1].weight)
    nn.init.zeros_(modules[-1].bias)
    return nn.Sequential(*modules)


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that learns its offsets (mmcv's ``DeformRoIPoolPack``): ``forward(input, boxes)``.

    The undeformed pooling (no offset) of each box, flattened, goes through ``offset_fc`` (Linear ``C * PH * PW ->
    deform_fc_channels``, ReLU, Linear, ReLU, Linear ``-> 2 * PH * PW``; the last layer starts at zero, so training
    starts from RoIAlign), whose output is the offset of a second, deformed pooling.

    Args:
        output_size, spatial_scale, sampling_ratio, gamma: as :func:`deform_roi_pool`.
        output_channels (int): C, the input's channels (the fc head's input is ``C * PH * PW``).
        deform_fc_channels (int): the fc head's width (mmcv's default 1024).
    """

    def __init__(self, output_size: int | tuple[int, int], output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = check_int(output_channels, "output_channels", 1)
        self.deform_fc_channels = check_int(deform_fc_channels, "deform_fc_channels", 1)
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_head(bins * self.output_channels, self.deform_fc_channels, 2 * bins, layers=3)

    def _undeformed(self, input: Tensor, boxes: BoxesType) -> tuple[Tensor, Tensor]:
        """The boxes as ``Tensor[K, 5]`` and their pooling without offsets, flattened: [K, C * PH * PW]."""
        check_features(input)
        if input.shape[1] != self.output_channels:
            raise ValueError(f"input has {input.shape[1]} channels but this {type(self).__name__} was built for "
                             f"output_channels={self.output_channels}")
        rois = convert_boxes_to_rois(boxes, input, check_values=False)  # the op checks the values
        pooled = deform_roi_pool(input, rois, None, self.output_size, self.spatial_scale, self.sampling_ratio,
                                 self.gamma)
        return rois, pooled.flatten(1)

    def _offset(self, flat: Tensor) -> Tensor:
        return self.offset_fc(flat).view(flat.shape[0], 2, *self.output_size)

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:  # type: ignore[override]
        rois, flat = self._undeformed(input, boxes)
        return deform_roi_pool(input, rois, self._offset(flat), self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, output_channels={self.output_channels}, "
                f"deform_fc_channels={self.deform_fc_channels}")


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """:class:`DeformRoIPoolPack` with a learned mask per bin (mmcv's ``ModulatedDeformRoIPoolPack``).

    ``mask_fc`` (Linear ``C * PH * PW -> deform_fc_channels``, ReLU, Linear ``-> PH * PW``, Sigmoid; the last
    Linear starts at zero, so every mask starts at 0.5) reads the same undeformed pooling as ``offset_fc``; the
    result is the deformed pooling times the mask, bin by bin: ``Tensor[K, C, PH, PW]``.
    """

    def __init__(self, output_size: int | tuple[int, int], output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = nn.Sequential(*_fc_head(bins * self.output_channels, self.deform_fc_channels, bins, layers=2),
                                     nn.Sigmoid())

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:  # type: ignore[override]
        rois, flat = self._undeformed(input, boxes)
        pooled = deform_roi_pool(input, rois, self._offset(flat), self.output_size, self.spatial_scale,
                                 self.sampling_ratio, self.gamma)
        mask = self.mask_fc(flat).view(flat.shape[0], 1, *self.output_size)
        return pooled * mask
