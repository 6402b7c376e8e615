"""Position-sensitive RoIAlign (R-FCN, Light-Head R-CNN): each bin reads its own group of channels."""
from __future__ import annotations

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


def check_position_channels(input: Tensor, pooled: tuple[int, int]) -> int:
    """``C / (PH * PW)``, the output channels; a ValueError when ``C`` is not a multiple of ``PH * PW``."""
    channels, bins = input.shape[1], pooled[0] * pooled[1]
    if channels % bins:
        raise ValueError(f"input has {channels} channels: position-sensitive pooling into {pooled[0]} x {pooled[1]} "
                         f"bins needs a multiple of {bins} (C' x PH x PW)")
    return channels // bins


@fx_leaf
def ps_roi_align(
    input: Tensor,
    boxes: BoxesType,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Tensor:
    """Position-sensitive RoIAlign: bin (p, q) of output channel c averages bilinear samples of input channel
    ``(c * PH + p) * PW + q`` only; equal to ``torchvision.ops.ps_roi_align``.

    Args:
        input (Tensor[N, C' * PH * PW, H, W]): the position-sensitive score maps.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): ``(batch_index, x1, y1, x2, y2)`` rows in image pixels, or one
            ``(x1, y1, x2, y2)`` tensor per image. On ``input``'s device, any floating dtype.
        output_size (int or Tuple[int, int]): ``(PH, PW)``, e.g. 7 (R-FCN uses 7 x 7 groups of channels).
        spatial_scale (float): ``1 / stride``.
        sampling_ratio (int): samples per bin and axis, ``<= 0`` for ``ceil(bin size)``.

    The geometry is ``roi_align(aligned=True)``'s (the box shifted by -0.5 cell, no minimum size), as torchvision's.
    A bin with no sample (a reversed box, adaptive sampling) gives 0 (torchvision's CPU kernel gives 0 / 0 = NaN
    there). Memory, non-finite cells, autocast and tracing as :func:`roikit.ops.roi_align`.

    Returns:
        Tensor[K, C', PH, PW].
    """
    input, boxes, dtype = autocast_to_float32(input, boxes)
    check_features(input)
    rois = convert_boxes_to_rois(boxes, input, check_values=False)  # the op checks the values
    ph, pw = pair(output_size)
    check_position_channels(input, (ph, pw))
    scale = check_spatial_scale(spatial_scale)
    check_int(sampling_ratio, "sampling_ratio")
    out = _library.ps_roi_align_op(input, rois, scale, ph, pw, sampling_ratio)
    return out if dtype is None else out.to(dtype)


class PSRoIAlign(nn.Module):
    """Module form of :func:`ps_roi_align`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, sampling_ratio: int = -1):
        super().__init__()
        self.output_size = pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)
        self.sampling_ratio = check_int(sampling_ratio, "sampling_ratio")

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:
        return ps_roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}")
