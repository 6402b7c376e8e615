"""Precise RoI Pooling (IoU-Net): the exact integral of the interpolated features over each bin."""
from __future__ import annotations

from torch import Tensor, nn

from . import _library
from ._utils import (
    BoxesType,
    autocast_to_float32,
    check_bool,
    check_features,
    check_spatial_scale,
    convert_boxes_to_rois,
    fx_leaf,
    pair,
)


@fx_leaf
def prroi_pool(
    input: Tensor,
    boxes: BoxesType,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
) -> Tensor:
    """Average each bin exactly: the integral of the bilinearly interpolated feature surface over the bin,
    divided by the bin's area (Jiang et al. 2018). No sampling and no rounding.

    Args:
        input (Tensor[N, C, H, W]): the feature map.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): ``(batch_index, x1, y1, x2, y2)`` rows in image pixels, or
            one ``(x1, y1, x2, y2)`` tensor per image. On ``input``'s device, any floating dtype.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        spatial_scale (float): ``1 / stride``.
        aligned (bool): ``False`` (the original implementation's convention, as in mmcv) puts the value of cell
            ``(i, j)`` at the point ``(i, j)`` in feature units; ``True`` at ``(i + 0.5, j + 0.5)``, the cell's
            centre (the same pixel model as ``roi_align(aligned=True)``).

    The surface is 0 beyond the map (it falls linearly to 0 over the half cell past the border). A box of zero or
    negative width or height gives 0. The weights are computed in float64 from the box as given, so a bin of 1e-7
    cells, or ``spatial_scale=1e-30``, gives the surface's value there. Memory: the map, the output and a fixed
    chunk, whatever the boxes. An output is NaN or infinite only if its bin gives such a cell a non-zero weight.
    Under autocast the op runs in float32 and returns the features' dtype.

    Returns:
        Tensor[K, C, PH, PW], differentiable with respect to ``input`` and to the box coordinates (the batch
        index gets a zero gradient).
    """
    input, boxes, dtype = autocast_to_float32(input, boxes)
    check_features(input)
    rois = convert_boxes_to_rois(boxes, input, check_values=False)  # the op checks the values
    ph, pw = pair(output_size)
    scale = check_spatial_scale(spatial_scale)
    check_bool(aligned, "aligned")
    out = _library.prroi_pool_op(input, rois, scale, ph, pw, aligned)
    return out if dtype is None else out.to(dtype)


class PrRoIPool(nn.Module):
    """Module form of :func:`prroi_pool`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, aligned: bool = False):
        super().__init__()
        self.output_size = pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)
        self.aligned = check_bool(aligned, "aligned")

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:
        return prroi_pool(input, boxes, self.output_size, self.spatial_scale, self.aligned)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, aligned={self.aligned}"
