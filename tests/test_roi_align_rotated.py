"""roi_align_rotated against mmcv's and detectron2's hand-written expected values and torchvision's roi_align at
angle 0 (and at 90 / 180 degrees on a turned map); the module and RoIPooler with rotated boxes.

The naive float64 loop (tests/naive.py) is in test_roi_align_rotated_naive.py; dtypes, bad input, torch.library and
the Triton kernels in test_roi_align_rotated_api.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision

from roikit.ops import RoIAlignRotated, roi_align_rotated


def xyxy_to_rotated(rois, angle=0.0):
    """[K, 5] (n, x1, y1, x2, y2) -> [K, 6] (n, cx, cy, w, h, angle)."""
    n, x1, y1, x2, y2 = rois.unbind(1)
    return torch.stack([n, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.full_like(n, angle)], dim=1)


# ---------------------------------------------------------------- peer libraries' hand-written values
# mmcv, tests/test_ops/test_roi_align_rotated.py (inputs, outputs; _test_roialign_rotated_allclose): 2 x 2 bins,
# spatial_scale 1, sampling_ratio 2, aligned=True, clockwise=False, angles in radians; the gradient is that of
# output.sum().
MMCV_CASES = [
    ([[[[1., 2.], [3., 4.]]]], [[0., 0.5, 0.5, 1., 1., 0]],
     [[[[1.0, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]]]], [[0., 0.5, 0.5, 1., 1., math.pi / 2]],
     [[[[1.5, 1], [1.75, 1.25]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0.5, 0.5, 1., 1., 0]],
     [[[[1.0, 1.25], [1.5, 1.75]], [[4.0, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
     [[0., 1.5, 1.5, 3., 3., 0]],
     [[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875], [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250], [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
     [[0., 1.5, 1.5, 3., 3., math.pi / 2]],
     [[[[7.5625, 1.9375], [10.375, 4.75]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875], [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250], [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
]


@pytest.mark.parametrize("case", range(len(MMCV_CASES)))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, 1e-2)])
def test_mmcv_expected_values(case, dtype, tol):
    x, rois, expected, expected_grad = (torch.tensor(v, dtype=torch.float64) for v in MMCV_CASES[case])
    x = x.to(dtype).requires_grad_()
    out = roi_align_rotated(x, rois.to(dtype), (2, 2), 1.0, 2, aligned=True, clockwise=False, angle_unit="radians")
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(x.grad.double(), expected_grad, atol=tol, rtol=0)
    # the same box in degrees (roikit's default unit)
    degrees = rois.clone()
    degrees[:, 5] = torch.rad2deg(degrees[:, 5])
    torch.testing.assert_close(roi_align_rotated(x.detach(), degrees.to(dtype), 2, 1.0, 2).double(), expected,
                               atol=tol, rtol=0)


def _rot90(img, num):
    """detectron2's helper: turn an image num x 90 degrees (transpose, then flip the rows)."""
    for _ in range(num % 4):
        img = img.transpose(0, 1).flip(0)
    return img


@pytest.mark.parametrize("quarter", range(4))
def test_detectron2_forward_output_0_90_180_270(quarter):
    """detectron2, tests/layers/test_roi_align_rotated.py, test_forward_output_0_90_180_270: the 5 x 5 arange map,
    box [1, 1, 3, 3] turned by 90 * i degrees, 4 x 4 bins, adaptive sampling; the expected output is an upsampled
    [[6, 7], [11, 12]] turned the other way."""
    img = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    rois = torch.tensor([[0, 2.0, 2.0, 2.0, 2.0, 90.0 * quarter]])
    expected = torch.tensor([[4.5, 5.0, 5.5, 6.0], [7.0, 7.5, 8.0, 8.5], [9.5, 10.0, 10.5, 11.0],
                             [12.0, 12.5, 13.0, 13.5]])
    out = roi_align_rotated(img, rois, (4, 4), 1.0, 0)
    torch.testing.assert_close(out[0, 0], _rot90(expected, -quarter), atol=1e-5, rtol=0)


def test_not_aligned_small_box_grows_about_its_centre():
    """mmcv's legacy rule (aligned=False): a box under 1 x 1 cell becomes 1 x 1 cell about its centre (torchvision's
    roi_align grows it from its top-left corner instead)."""
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    rois = torch.tensor([[0, 4.2, 3.6, 0.3, 0.0, 0.0]], dtype=torch.float64)
    grown = torch.tensor([[0, 3.7, 3.1, 4.7, 4.1]], dtype=torch.float64)
    torch.testing.assert_close(roi_align_rotated(x, rois, 2, 1.0, 2, aligned=False),
                               torchvision.ops.roi_align(x, grown, 2, 1.0, 2, aligned=False), atol=1e-12, rtol=0)


def test_detectron2_empty_box_is_zero():
    """detectron2's test_empty_box: a zero-size box pools 0 (no sample with adaptive sampling)."""
    out = roi_align_rotated(torch.rand(1, 1, 5, 5), torch.tensor([[0, 2.0, 3.0, 0.0, 0.0, 0.0]]), (7, 7), 1.0, 0)
    assert out.shape == (1, 1, 7, 7) and not out.any()


def test_detectron2_gradcheck_and_gradient_equals_roi_align():
    """detectron2's test_roi_align_rotated_gradcheck_cpu (also on a transposed map), and its CUDA test's idea on the
    CPU: at angle 0 the gradient equals RoIAlign's (aligned) for the same boxes."""
    x = torch.rand(1, 1, 10, 10, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 4.5, 4.5, 9, 9, 0], [0, 2, 7, 4, 4, 0], [0, 7, 7, 4, 4, 0]], dtype=torch.float64)
    op = RoIAlignRotated((5, 5), 0.5, 1)
    assert torch.autograd.gradcheck(lambda t: op(t, rois), (x,))
    assert torch.autograd.gradcheck(lambda t: op(t, rois), (x.transpose(2, 3),))
    xr, xa = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    roi_align_rotated(xr, rois, 5, 1.0, 2).sum().backward()
    boxes = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9]], dtype=torch.float64)
    torchvision.ops.roi_align(xa, boxes, 5, 1.0, 2, aligned=True).sum().backward()
    torch.testing.assert_close(xr.grad, xa.grad, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- oracles: torchvision's roi_align
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_angle_zero_matches_torchvision(aligned, sampling_ratio, dtype, make_rois, layouts):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 17, dtype=dtype)
    boxes = make_rois(dtype=dtype, reversed_boxes=False)
    if not aligned:
        # a box under 1 cell is grown to 1 cell about its centre here (mmcv), from its top-left corner by
        # torchvision: grow those boxes about their centre first (to 1 cell, or 3 px: 1.5 cells), for both
        small = boxes.clone()
        centre, side = (small[:, 1:3] + small[:, 3:5]) / 2, (small[:, 3:5] - small[:, 1:3]).clamp(min=3.0)
        boxes = torch.cat([small[:, :1], centre - side / 2, centre + side / 2], dim=1)
    xt = x.clone().requires_grad_()
    expected = torchvision.ops.roi_align(xt, boxes, (5, 4), 0.5, sampling_ratio, aligned)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, xl in layouts(x):
        xl = xl.detach().requires_grad_()
        out = roi_align_rotated(xl, xyxy_to_rotated(boxes), (5, 4), 0.5, sampling_ratio, aligned)
        out.backward(grad)
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol, msg=f"output, {name}")
        torch.testing.assert_close(xl.grad, xt.grad, atol=tol, rtol=tol, msg=f"gradient, {name}")


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_angle_180_is_roi_align_on_the_flipped_map(sampling_ratio, make_rois):
    """Turned by 180 degrees, a box reads the map flipped both ways: cell y becomes H - 1 - y, so the box is the
    axis-aligned box about the mirrored centre ``H / s - cy`` of the flipped map (aligned pixel model)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64)
    boxes = make_rois(dtype=torch.float64, reversed_boxes=False)
    rot = xyxy_to_rotated(boxes, 180.0)
    mirrored = rot.clone()
    mirrored[:, 1], mirrored[:, 2] = 17 / 0.5 - rot[:, 1], 13 / 0.5 - rot[:, 2]
    half_w, half_h = mirrored[:, 3] / 2, mirrored[:, 4] / 2
    flipped_boxes = torch.stack([boxes[:, 0], mirrored[:, 1] - half_w, mirrored[:, 2] - half_h,
                                 mirrored[:, 1] + half_w, mirrored[:, 2] + half_h], dim=1)
    expected = torchvision.ops.roi_align(x.flip(2, 3), flipped_boxes, (5, 4), 0.5, sampling_ratio, True)
    out = roi_align_rotated(x, rot, (5, 4), 0.5, sampling_ratio)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("clockwise", [False, True])
def test_angle_90_is_roi_align_on_the_transposed_map(clockwise, make_rois):
    """Turned by 90 degrees counterclockwise, sample (yy, xx) reads (cy - xx, cx + yy): the axis-aligned box on the
    transposed map with its columns flipped, centred at (H / s - cy, cx) in that map's (x, y). With
    ``clockwise=True`` an angle of -90 is the same turn."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64)
    boxes = make_rois(dtype=torch.float64, reversed_boxes=False)
    rot = xyxy_to_rotated(boxes, -90.0 if clockwise else 90.0)
    turned = x.transpose(2, 3).flip(3)  # [N, C, W, H]
    cx, cy = 13 / 0.5 - rot[:, 2], rot[:, 1]
    half_w, half_h = rot[:, 3] / 2, rot[:, 4] / 2
    turned_boxes = torch.stack([boxes[:, 0], cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)
    expected = torchvision.ops.roi_align(turned, turned_boxes, (5, 4), 0.5, 2, True)
    out = roi_align_rotated(x, rot, (5, 4), 0.5, 2, clockwise=clockwise)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)

def test_module_repr_and_forward():
    m = RoIAlignRotated(7, spatial_scale=1 / 16, sampling_ratio=2)
    assert repr(m) == ("RoIAlignRotated(output_size=(7, 7), spatial_scale=0.0625, sampling_ratio=2, aligned=True, "
                       "clockwise=False, angle_unit='degrees')")
    x = torch.randn(1, 2, 20, 20)
    rois = torch.tensor([[0, 100.0, 80.0, 190.0, 130.0, 0.0]])
    boxes = torch.tensor([[0, 5.0, 15.0, 195.0, 145.0]])
    torch.testing.assert_close(m(x, rois), torchvision.ops.roi_align(x, boxes, 7, 1 / 16, 2, True))

# ---------------------------------------------------------------- RoIPooler with rotated boxes
def test_roipooler_rotated_boxes_one_map_and_a_pyramid():
    from roikit.layers import RoIPooler

    torch.manual_seed(12)
    f0, f1 = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8)
    boxes = [torch.tensor([[20.0, 30.0, 24.0, 12.0, 30.0], [40.0, 40.0, 120.0, 100.0, -60.0]]),
             torch.tensor([[10.0, 50.0, 300.0, 200.0, 90.0]])]
    rois = torch.tensor([[0, 20.0, 30.0, 24.0, 12.0, 30.0], [0, 40.0, 40.0, 120.0, 100.0, -60.0],
                         [1, 10.0, 50.0, 300.0, 200.0, 90.0]])
    one = RoIPooler(["0"], 3, 2, "roi_align_rotated")
    assert one.output_shape(4) == (4, 3, 3)
    torch.testing.assert_close(one({"0": f0}, boxes, [(64, 64)] * 2), roi_align_rotated(f0, rois, 3, 0.25, 2))
    # two levels: FPN's rule on sqrt(w h) sends the small box (sqrt 288 = 17 px) to level 0, the others to level 1
    two = RoIPooler(["0", "1"], 3, 2, "roi_align_rotated", canonical_scale=64, canonical_level=3)
    out = two({"0": f0, "1": f1}, boxes, [(64, 64)] * 2)
    torch.testing.assert_close(out[:1], roi_align_rotated(f0, rois[:1], 3, 0.25, 2))
    torch.testing.assert_close(out[1:], roi_align_rotated(f1, rois[1:], 3, 0.125, 2))
    with pytest.raises(ValueError, match=r"Tensor\[L, 5\]"):
        one({"0": f0}, [torch.zeros(1, 4), torch.zeros(0, 4)], [(64, 64)] * 2)
