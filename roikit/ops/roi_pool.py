"""Quantized RoI max pooling (Fast R-CNN), with its rounding rule made explicit."""
from __future__ import annotations

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
    pair,
)

ROUNDINGS = ("torchvision", "integer")


@fx_leaf
def roi_pool(
    input: Tensor,
    boxes: BoxesType,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    rounding: str = "torchvision",
) -> Tensor:
    """Max-pool each box into a fixed ``output_size`` grid of whole feature cells.

    Args:
        input (Tensor[N, C, H, W]): the feature map.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): boxes in image pixels, ``(batch_index, x1, y1, x2, y2)`` rows,
            or one ``(x1, y1, x2, y2)`` tensor per image. On ``input``'s device, any floating dtype.
        output_size (int or Tuple[int, int]): ``(PH, PW)``, e.g. 7.
        spatial_scale (float): maps image pixels to cells: ``1 / stride``. At stride 32, ``1 / 32``: a box edge
            at x = 665 px lies at 665 / 32 = 20.78 cells.
        rounding (str): how the box is cut into whole cells.

            * ``"torchvision"`` (default; Fast R-CNN / Caffe, equal to ``torchvision.ops.roi_pool``): corners
              rounded to the nearest cell, ``size = end - start + 1``, float bin size; bin ``i`` reads cells
              ``[floor(i * bin), ceil((i + 1) * bin))`` from the start (neighbouring bins may share a cell).
            * ``"integer"``: the double rounding as usually taught: start ``floor(x1 * scale)``, size floored
              (20.78 -> 20 cells), bin size floored (20 / 7 = 2.86 -> 2 cells, at least 1), bin ``i`` reads
              ``[start + 2 i, start + 2 i + 2)``: 14 of the box's 20.78 cells.

            Bins are clipped to the map; an empty bin gives 0 and no gradient. Coordinates are clamped to
            +-2^52 cells first. A box is read through its bins clipped to the map, so memory is the map, the output
            and a fixed chunk, whatever the boxes. NaN never wins a bin (as in torchvision). Under autocast the op
            runs in float32 and returns the features' dtype.

    Returns:
        Tensor[K, C, PH, PW]. The gradient of each bin goes to the cell its maximum came from (the first in
        row-major order on ties).
    """
    input, boxes, dtype = autocast_to_float32(input, boxes)
    check_features(input)
    rois = convert_boxes_to_rois(boxes, input, check_values=False)  # the op checks the values
    ph, pw = pair(output_size)
    scale = check_spatial_scale(spatial_scale)
    check_choice(rounding, "rounding", ROUNDINGS)
    if _needs_argmax(input):
        out = _library.roi_pool_op(input, rois, scale, ph, pw, rounding)[0]
    else:  # the forward alone: no argmax made
        out = _library.roi_pool.roi_pool_inference_op(input, rois, scale, ph, pw, rounding)
    return out if dtype is None else out.to(dtype)


def _needs_argmax(input: Tensor) -> bool:
    """False only for an eager call on a CPU tensor that no gradient can be asked of (inference, or a map that does
    not require grad). Traced and compiled calls keep ``roikit::roi_pool`` (the op export translates)."""
    return (input.device.type != "cpu" or type(input) is not torch.Tensor or torch.jit.is_tracing()
            or torch.compiler.is_compiling() or (torch.is_grad_enabled() and input.requires_grad))


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, rounding: str = "torchvision"):
        super().__init__()
        self.output_size = pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)
        self.rounding = check_choice(rounding, "rounding", ROUNDINGS)

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:
        return roi_pool(input, boxes, self.output_size, self.spatial_scale, self.rounding)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, rounding={self.rounding!r}"
