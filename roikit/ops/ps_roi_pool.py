"""Position-sensitive RoI pooling (R-FCN): the mean of whole cells, each bin from its own group of channels."""
from __future__ import annotations

from torch import Tensor, nn

from . import _library
from ._utils import (
    BoxesType,
    autocast_to_float32,
    check_features,
    check_spatial_scale,
    convert_boxes_to_rois,
    fx_leaf,
    pair,
)
from .ps_roi_align import check_position_channels


@fx_leaf
def ps_roi_pool(
    input: Tensor,
    boxes: BoxesType,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Position-sensitive RoI pooling (Dai et al. 2016): bin (p, q) of output channel c is the mean of its whole
    cells in input channel ``(c * PH + p) * PW + q``; the output equals ``torchvision.ops.ps_roi_pool``.

    Args:
        input (Tensor[N, C' * PH * PW, H, W]): the position-sensitive score maps.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): as in :func:`roikit.ops.ps_roi_align`.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        spatial_scale (float): ``1 / stride``.

    The cells (:func:`roikit.ops.geometry.ps_roi_pool_edges`): corners rounded half away from zero, extent
    ``max(end - start, 1)``, bin ``p`` reads ``[floor(p b), ceil((p + 1) b))`` from the start, clipped to
    ``[0, H - 1]`` as torchvision's forward does (it never reads the last row and column); an empty bin gives 0.
    The gradient is this forward's own: each bin's gradient divided by its area onto the cells it averaged.
    torchvision's CPU backward clips to ``H`` instead (and divides by that larger area), so for a bin that reaches
    the last row or column it sends gradient to cells its forward never read; for every other bin the two
    gradients agree. On the CPU the numba path sums each bin's cells as torchvision does (its bits; half types
    summed in float32); the plain path reads four entries of a float64 summed-area table per bin, whatever its
    size (the two agree to rounding). Non-finite cells: a bin is NaN or infinite only if a cell it averages is.

    Returns:
        Tensor[K, C', PH, PW].
    """
    input, boxes, dtype = autocast_to_float32(input, boxes)
    check_features(input)
    rois = convert_boxes_to_rois(boxes, input, check_values=False)  # the op checks the values
    ph, pw = pair(output_size)
    check_position_channels(input, (ph, pw))
    scale = check_spatial_scale(spatial_scale)
    out = _library.ps_roi_pool_op(input, rois, scale, ph, pw)
    return out if dtype is None else out.to(dtype)


class PSRoIPool(nn.Module):
    """Module form of :func:`ps_roi_pool`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0):
        super().__init__()
        self.output_size = pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:
        return ps_roi_pool(input, boxes, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
