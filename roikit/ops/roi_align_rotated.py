"""Rotated RoIAlign (rotated-box detectors: RRPN, RoI Transformer, detectron2's RROIHeads, mmrotate)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _library
from ._utils import (
    autocast_to_float32,
    check_bool,
    check_choice,
    check_features,
    check_int,
    check_roi_values,
    check_spatial_scale,
    fx_leaf,
    pair,
)

ANGLE_UNITS = ("degrees", "radians")
RotatedBoxesType = Tensor | Sequence[Tensor]


@fx_leaf
def roi_align_rotated(
    input: Tensor,
    boxes: RotatedBoxesType,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    clockwise: bool = False,
    angle_unit: str = "degrees",
) -> Tensor:
    """RoIAlign over rotated boxes: each box's bins are laid out along its own axes, and every bin averages
    bilinearly interpolated samples of the feature map.

    Args:
        input (Tensor[N, C, H, W]): the feature map.
        boxes (Tensor[K, 6] or List[Tensor[L, 5]]): ``(batch_index, cx, cy, w, h, angle)`` rows in image pixels, or
            one ``(cx, cy, w, h, angle)`` tensor per image: the centre, the width along the box's own x axis, the
            height along its y axis, and the angle it is turned by. On ``input``'s device, any floating dtype.
        output_size (int or Tuple[int, int]): ``(PH, PW)``; row ``ph`` runs along the box's height, from its
            ``-h / 2`` side (the top at angle 0).
        spatial_scale (float): ``1 / stride``: at stride 16, ``1 / 16`` maps a 320 px wide box to 20 cells.
        sampling_ratio (int): samples per bin along each axis; ``<= 0`` takes ``ceil(bin size)`` samples.
        aligned (bool): ``True`` (the default, and detectron2's only mode) shifts the centre by -0.5 cell: cell
            ``(u, v)`` is centred on pixel ``((v + 0.5) s, (u + 0.5) s)``. ``False`` is mmcv's legacy mode: no
            shift, and boxes forced to at least 1 x 1 cell about their centre (``roi_align(aligned=False)`` grows
            a small box from its top-left corner instead; otherwise an angle-0 box equals ``roi_align``'s).
        clockwise (bool): ``False`` (the default): a positive angle turns the box counterclockwise as seen on the
            image (y pointing down), as detectron2's ``RotatedBoxes``. ``True`` negates the angle (mmcv's flag).
        angle_unit (str): ``"degrees"`` (detectron2) or ``"radians"`` (mmcv).

    A sample at box-frame offset ``(yy, xx)`` from the centre lies at ``y = yy cos t - xx sin t + cy``,
    ``x = yy sin t + xx cos t + cx`` (``t`` the angle in radians, ``-t`` with ``clockwise``). A sample outside
    ``[-1, H] x [-1, W]`` counts as 0 and reads nothing; one inside is clamped to the map. Only the samples that can
    land on the map are visited, so a box far larger than the map costs no more than the map (with adaptive
    sampling); memory is the map, the output and a fixed chunk, whatever the boxes. Under autocast the op runs in
    float32 and returns the features' dtype.

    **The two references, and how to get each.** detectron2's ``ROIAlignRotated(output_size, spatial_scale,
    sampling_ratio)`` is ``aligned=True, clockwise=False, angle_unit="degrees"`` (the defaults). mmcv's
    ``roi_align_rotated(input, rois, output_size, spatial_scale, sampling_ratio, aligned, clockwise)`` is the same
    ``aligned`` and ``clockwise`` with ``angle_unit="radians"``. Where they differ:

    * angle: degrees in detectron2, radians in mmcv (mmcv's docstring says radians; its kernels take the value as
      it is); the direction is the same for ``clockwise=False`` (detectron2 has no flag).
    * offset 0.5: always in detectron2; in mmcv only with ``aligned=True``.
    * minimum box size: mmcv with ``aligned=False`` makes the box at least 1 x 1 cell; detectron2 (and mmcv with
      ``aligned=True``) keeps it as it is; their CPU kernels refuse a negative width or height (an assertion),
      their CUDA kernels take it. roikit refuses it with a ValueError when ``aligned=True``.
    * adaptive sampling count: both ``ceil(bin size)``; mmcv rounds the bin size to float32 before ``ceil`` (also
      for float64 boxes), detectron2 does not. roikit takes the ceiling in the boxes' compute dtype (float64 for
      float64 boxes), as detectron2; an empty bin (a zero-size box) gets no sample and pools 0 in both and here.
    * samples outside the map: both count them as 0 by the same ``[-1, H] x [-1, W]`` rule, but their CPU kernels
      still read cell (0, 0) with weight 0, so a NaN there spreads to every box with an off-map sample; their CUDA
      kernels and roikit read nothing for such a sample.

    Returns:
        Tensor[K, C, PH, PW].
    """
    input, boxes, dtype = autocast_to_float32(input, boxes)
    check_features(input)
    ph, pw = pair(output_size)
    scale = check_spatial_scale(spatial_scale)
    check_int(sampling_ratio, "sampling_ratio")
    check_bool(aligned, "aligned")
    check_bool(clockwise, "clockwise")
    check_choice(angle_unit, "angle_unit", ANGLE_UNITS)
    rois = convert_rotated_boxes_to_rois(boxes, input, aligned, check_values=False)  # the op checks the values
    out = _library.roi_align_rotated_op(input, rois, scale, ph, pw, sampling_ratio, aligned, clockwise,
                                        angle_unit == "radians")
    return out if dtype is None else out.to(dtype)


def convert_rotated_boxes_to_rois(boxes: RotatedBoxesType, input: Tensor, aligned: bool = True,
                                  check_values: bool = True) -> Tensor:
    """Rotated boxes as ``Tensor[K, 6]`` or a list of ``Tensor[L_i, 5]`` (one per image) -> checked ``Tensor[K, 6]``
    ``(batch_index, cx, cy, w, h, angle)``.

    On the features' device, any floating dtype. With ``check_values``, in eager mode the values are checked too: the
    batch index an integer in ``[0, N)``, every value finite, and with ``aligned`` no negative width or height
    (``roikit::roi_align_rotated`` checks them itself, also in compiled graphs).
    """
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != input.shape[0]:
            raise ValueError(f"boxes is a list of {len(boxes)} tensors but input has a batch of {input.shape[0]} "
                             "images; give one Tensor[L, 5] (cx, cy, w, h, angle) per image")
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 5:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"boxes[{i}] must be a Tensor[L, 5] (cx, cy, w, h, angle), got {shape}")
            _check_device_dtype(b, input, f"boxes[{i}]")
        if len(boxes) == 0:
            rois = input.new_zeros((0, 6))
        else:
            rois = torch.cat([torch.cat([torch.full((b.shape[0], 1), i, dtype=b.dtype, device=b.device), b], dim=1)
                              for i, b in enumerate(boxes)], dim=0)
    elif isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 6:
            raise ValueError("boxes must be a Tensor[K, 6] (batch index, cx, cy, w, h, angle) or a list of "
                             f"Tensor[L, 5], got shape {tuple(boxes.shape)}")
        _check_device_dtype(boxes, input, "boxes")
        rois = boxes
    else:
        raise ValueError(f"boxes must be a Tensor[K, 6] or a list of Tensor[L, 5], got {type(boxes).__name__}")
    if check_values and not torch.compiler.is_compiling() and rois.numel() > 0:
        check_roi_values(rois, input.shape[0])
        if aligned and bool((rois[:, 3:5] < 0).any()):
            bad = (rois[:, 3:5] < 0).any(dim=1).nonzero()[0].item()
            raise ValueError(f"boxes must have a width and height >= 0 with aligned=True (detectron2 and mmcv refuse "
                             f"them too); row {bad} is {rois[bad].tolist()}")
    return rois.contiguous()


def _check_device_dtype(boxes: Tensor, input: Tensor, name: str) -> None:
    if boxes.device != input.device:
        raise ValueError(f"{name} is on {boxes.device} but input is on {input.device}; put both on one device")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {boxes.dtype}")


class RoIAlignRotated(nn.Module):
    """Module form of :func:`roi_align_rotated`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = True, clockwise: bool = False, angle_unit: str = "degrees"):
        super().__init__()
        self.output_size = pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)
        self.sampling_ratio = check_int(sampling_ratio, "sampling_ratio")
        self.aligned = check_bool(aligned, "aligned")
        self.clockwise = check_bool(clockwise, "clockwise")
        self.angle_unit = check_choice(angle_unit, "angle_unit", ANGLE_UNITS)

    def forward(self, input: Tensor, boxes: RotatedBoxesType) -> Tensor:
        return roi_align_rotated(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio,
                                 self.aligned, self.clockwise, self.angle_unit)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, clockwise={self.clockwise}, "
                f"angle_unit={self.angle_unit!r}")
