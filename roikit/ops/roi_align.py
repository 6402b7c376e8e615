"""RoIAlign (Mask R-CNN): bilinear samples instead of rounding."""
from __future__ import annotations

from torch import Tensor, nn

from . import _library
from ._utils import (
    BoxesType,
    autocast_to_float32,
    check_bool,
    check_choice,
    check_features,
    check_int,
    check_spatial_scale,
    convert_boxes_to_rois,
    fx_leaf,
    pair,
)

POOLS = ("avg", "max")


@fx_leaf
def roi_align(
    input: Tensor,
    boxes: BoxesType,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    pool: str = "avg",
    box_grad: bool = False,
) -> Tensor:
    """Pool each box into ``output_size`` bins from bilinearly interpolated samples: no rounding at all.

    Args:
        input (Tensor[N, C, H, W]): the feature map.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): ``(batch_index, x1, y1, x2, y2)`` rows in image pixels, or
            one ``(x1, y1, x2, y2)`` tensor per image. On ``input``'s device, any floating dtype.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        spatial_scale (float): ``1 / stride``: at stride 16, ``1 / 16`` maps a 320 px box to 20 cells.
        sampling_ratio (int): samples per bin along each axis; ``<= 0`` takes ``ceil(bin size)`` samples.
        aligned (bool): ``True`` shifts the box by -0.5 cell so that cell ``(u, v)`` is centred on pixel
            ``((v + 0.5) s, (u + 0.5) s)`` (the correct pixel model; detectron2's default). ``False`` keeps the
            original Mask R-CNN convention (a half-cell shift, and boxes forced to at least 1 x 1 cell).
        pool (str): ``"avg"`` (the mean of the samples, equal to ``torchvision.ops.roi_align``) or ``"max"``
            (their maximum, as in mmcv's ``pool_mode="max"``).
        box_grad (bool): ``True`` also differentiates the output with respect to the box corners (x1, y1, x2, y2;
            the batch index gets 0), so ``boxes`` may require grad; the output is the same. Each sample moves with
            the box and the bilinear surface under it is linear between cells, so the gradient is exact almost
            everywhere: it jumps where a sample crosses a cell line or the map's border, where the adaptive sample
            count ``ceil(bin)`` changes, and (max) where the winning sample changes. With many samples it tends to
            the box gradient of :func:`roikit.ops.prroi_pool` (the exact integral) for bins on the map, as 1 / g
            with g samples per axis. The box gradient is always deterministic
            (``roikit/ops/pytorch/roi_align_box_grad.py``; on CUDA a Triton kernel, one program per box).

    A sample outside ``[-1, H] x [-1, W]`` counts as 0; one inside is clamped to the map. Only the samples inside
    are read, so a box far larger than the map costs no more than the map: memory is the map, the output and a
    fixed chunk, whatever the boxes. An output is NaN or infinite only if a sample it reads (its 4 bilinear taps,
    even one of weight 0, as in torchvision) is. Under autocast the op runs in float32 and returns the features'
    dtype, as torchvision's.

    Returns:
        Tensor[K, C, PH, PW].
    """
    input, boxes, dtype = autocast_to_float32(input, boxes)
    check_features(input)
    rois = convert_boxes_to_rois(boxes, input, check_values=False)  # the op checks the values
    ph, pw = pair(output_size)
    scale = check_spatial_scale(spatial_scale)
    check_choice(pool, "pool", POOLS)
    check_int(sampling_ratio, "sampling_ratio")
    check_bool(aligned, "aligned")
    check_bool(box_grad, "box_grad")
    op = _library.roi_align_box_op if box_grad else _library.roi_align_op
    out = op(input, rois, scale, ph, pw, sampling_ratio, aligned, pool == "max")[0]
    return out if dtype is None else out.to(dtype)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = False, pool: str = "avg", box_grad: bool = False):
        super().__init__()
        self.output_size = pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)
        self.sampling_ratio = check_int(sampling_ratio, "sampling_ratio")
        self.aligned = check_bool(aligned, "aligned")
        self.pool = check_choice(pool, "pool", POOLS)
        self.box_grad = check_bool(box_grad, "box_grad")

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         self.pool, self.box_grad)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, pool={self.pool!r}"
                + (", box_grad=True" if self.box_grad else ""))
