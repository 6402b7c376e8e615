"""roi_align_rotated against mmcv's and detectron2's hand-written expected values, torchvision's roi_align at angle 0
(and at 90 / 180 degrees on a turned map), a naive float64 loop, gradcheck, and the Triton kernels (interpreter).

The naive loop below shares no code with roikit: one Python loop per box, bin and sample, written from the
formulas of detectron2's and mmcv's ROIAlignRotated kernels (one bilinear sample: tests/naive.py's, torchvision's rule).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.fx
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import bilinear

from roikit.ops import RoIAlignRotated, deterministic_backward, roi_align_rotated


# ---------------------------------------------------------------- the naive loop (the expected function)
def naive(x, rois, pooled, scale, sampling_ratio, aligned=True, clockwise=False, radians=False):
    """Output [K, C, PH, PW] (float64) and the gradient weights {(k, c, ph, pw): [(n, i, j, weight)]}."""
    _, channels, _, _ = x.shape
    ph_n, pw_n = pooled
    out = torch.zeros(rois.shape[0], channels, ph_n, pw_n, dtype=torch.float64)
    weights = {}
    for k, roi in enumerate(rois.tolist()):
        n, cx, cy, w, h, angle = roi
        n = int(n)
        off = 0.5 if aligned else 0.0
        # coordinates in cells are clamped to +-2^52 (roikit's documented bound, as for roi_align)
        cx, cy, w, h = (min(max(v * scale, -2.0**52), 2.0**52) for v in (cx, cy, w, h))
        cx, cy = cx - off, cy - off
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        theta = angle if radians else angle * math.pi / 180
        theta = -theta if clockwise else theta
        c, s = math.cos(theta), math.sin(theta)
        bh, bw = h / ph_n, w / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bh)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bw)
        count = max(gh * gw, 1)
        for p in range(ph_n):
            for q in range(pw_n):
                points = []
                for iy in range(max(gh, 0)):
                    yy = -h / 2 + p * bh + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        xx = -w / 2 + q * bw + (ix + 0.5) * bw / gw
                        points.append((yy * c - xx * s + cy, yy * s + xx * c + cx))
                for ch in range(channels):
                    samples = [bilinear(x[n, ch], y, xp) for y, xp in points]
                    out[k, ch, p, q] = sum(v for v, _ in samples) / count
                    weights[(k, ch, p, q)] = [(n, i, j, wt / count) for _, taps in samples for i, j, wt in taps]
    return out, weights


def naive_grad(x, weights, grad):
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for (k, c, p, q), taps in weights.items():
        for n, i, j, wt in taps:
            expected[n, c, i, j] += wt * float(grad[k, c, p, q])
    return expected


def random_rotated_rois(k, n, size, scale, seed, dtype=torch.float64, max_side=1.0):
    """Boxes around and off a map of ``size`` cells: centres from -20% to 120%, sides up to ``max_side`` map sizes,
    any angle; one zero-size box and one wholly off the map."""
    g = torch.Generator().manual_seed(seed)
    h, w = size[0] / scale, size[1] / scale
    centre = (torch.rand(k, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2) * torch.tensor([w, h])
    sides = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h]) * max_side + 0.2
    angle = torch.rand(k, 1, generator=g, dtype=torch.float64) * 720 - 360
    idx = torch.randint(0, n, (k, 1), generator=g).to(torch.float64)
    rois = torch.cat([idx, centre, sides, angle], dim=1)
    rois[0, 3:5] = 0.0  # zero size
    rois[1, 1:3] = torch.tensor([-3 * w, 4 * h])  # wholly off the map
    return rois.to(dtype)


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


# ---------------------------------------------------------------- the naive loop: any angle, every flag
@pytest.mark.parametrize("aligned, clockwise, radians", [(True, False, False), (False, True, False),
                                                         (True, True, True), (False, False, True)])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_matches_naive_loop(aligned, clockwise, radians, sampling_ratio):
    torch.manual_seed(3)
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    rois = random_rotated_rois(8, 2, (9, 11), 0.5, seed=4)
    if radians:
        rois[:, 5] = torch.deg2rad(rois[:, 5])
    unit = "radians" if radians else "degrees"
    expected, weights = naive(x, rois, (3, 2), 0.5, sampling_ratio, aligned, clockwise, radians)
    xg = x.clone().requires_grad_()
    out = roi_align_rotated(xg, rois, (3, 2), 0.5, sampling_ratio, aligned, clockwise, unit)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(xg.grad, naive_grad(x, weights, grad), atol=1e-12, rtol=0)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck(aligned):
    torch.manual_seed(5)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = random_rotated_rois(5, 2, (6, 7), 0.5, seed=6)
    assert torch.autograd.gradcheck(lambda t: roi_align_rotated(t, rois, (3, 2), 0.5, 2, aligned), (x,))


def _small_case(draw_):
    """A small map, boxes of any size and angle (also huge, zero-size, far off the map), settings."""
    h, w = draw_(st.integers(1, 6)), draw_(st.integers(1, 6))
    k = draw_(st.integers(1, 4))
    side = st.one_of(st.floats(0, 20), st.sampled_from([0.0, 1e4, 1e30]))
    rows = [[float(draw_(st.integers(0, 1))), draw_(st.floats(-30, 30)), draw_(st.floats(-30, 30)), draw_(side),
             draw_(side), draw_(st.floats(-720, 720))] for _ in range(k)]
    sampling_ratio = draw_(st.sampled_from([-1, 1, 2, 3]))
    return h, w, torch.tensor(rows, dtype=torch.float64), sampling_ratio, draw_(st.booleans()), draw_(st.booleans())


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hypothesis_matches_naive_loop(data):
    h, w, rois, sampling_ratio, aligned, clockwise = _small_case(data.draw)
    if sampling_ratio <= 0 and bool((rois[:, 3:5] > 100).any()):
        sampling_ratio = 2  # keep the naive loop short (the kernels' bound is tested below)
    x = torch.randn(2, 2, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * 7 + w))
    expected, weights = naive(x, rois, (2, 3), 0.5, sampling_ratio, aligned, clockwise)
    xg = x.clone().requires_grad_()
    out = roi_align_rotated(xg, rois, (2, 3), 0.5, sampling_ratio, aligned, clockwise)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)
    grad = torch.ones_like(out)
    out.backward(grad)
    torch.testing.assert_close(xg.grad, naive_grad(x, weights, grad), atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------- dtypes, layouts, boxes as lists, module
def test_half_and_bfloat16_accumulate_in_float32():
    torch.manual_seed(7)
    x = torch.randn(2, 4, 13, 17)
    rois = random_rotated_rois(12, 2, (13, 17), 0.5, seed=8, dtype=torch.float32)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        xd = x.to(dtype).requires_grad_()
        out = roi_align_rotated(xd, rois.to(dtype), 7, 0.5, 2)
        assert out.dtype == dtype
        ref = roi_align_rotated(x.to(dtype).double(), rois.to(dtype).double(), 7, 0.5, 2)
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        out.float().sum().backward()
        assert xd.grad.dtype == dtype


def test_list_of_boxes_several_images_and_empty():
    x = torch.randn(2, 3, 10, 10)
    boxes = [torch.tensor([[4.0, 4.0, 8.0, 6.0, 30.0]]), torch.tensor([[5.0, 2.0, 9.0, 7.0, -45.0],
                                                                       [3.0, 3.0, 4.0, 4.0, 0.0]])]
    rois = torch.tensor([[0, 4.0, 4.0, 8.0, 6.0, 30.0], [1, 5.0, 2.0, 9.0, 7.0, -45.0], [1, 3.0, 3.0, 4.0, 4.0, 0.0]])
    out = roi_align_rotated(x, rois, 3)
    torch.testing.assert_close(roi_align_rotated(x, boxes, 3), out, atol=0, rtol=0)
    for k in range(3):  # several images = one image at a time
        b = int(rois[k, 0])
        one = torch.cat([torch.zeros(1, 1), rois[k:k + 1, 1:]], 1)
        torch.testing.assert_close(roi_align_rotated(x[b:b + 1], one, 3), out[k:k + 1], atol=1e-6, rtol=0)
    assert roi_align_rotated(x, torch.zeros(0, 6), (3, 4)).shape == (0, 3, 3, 4)
    xg = x.clone().requires_grad_()
    roi_align_rotated(xg, [torch.zeros(0, 5), torch.zeros(0, 5)], 3).sum().backward()
    assert xg.grad is not None and not xg.grad.any()


@pytest.mark.parametrize("shape", [(2, 3, 0, 12), (2, 3, 10, 0), (2, 0, 10, 12)], ids=["H=0", "W=0", "C=0"])
def test_empty_map_gives_zeros(shape):
    x = torch.zeros(shape, requires_grad=True)
    out = roi_align_rotated(x, torch.tensor([[0, 4.0, 4.0, 8.0, 6.0, 30.0]]), 3)
    assert out.shape == (1, shape[1], 3, 3) and not out.any()
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_module_repr_and_forward():
    m = RoIAlignRotated(7, spatial_scale=1 / 16, sampling_ratio=2)
    assert repr(m) == ("RoIAlignRotated(output_size=(7, 7), spatial_scale=0.0625, sampling_ratio=2, aligned=True, "
                       "clockwise=False, angle_unit='degrees')")
    x = torch.randn(1, 2, 20, 20)
    rois = torch.tensor([[0, 100.0, 80.0, 190.0, 130.0, 0.0]])
    boxes = torch.tensor([[0, 5.0, 15.0, 195.0, 145.0]])
    torch.testing.assert_close(m(x, rois), torchvision.ops.roi_align(x, boxes, 7, 1 / 16, 2, True))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("boxes, message", [
    (torch.zeros(3, 5), r"Tensor\[K, 6\]"),
    (torch.zeros(3, 6, 1), r"Tensor\[K, 6\]"),
    (torch.tensor([[2.0, 0, 0, 1, 1, 0]]), r"batch index and must lie in \[0, 2\)"),
    (torch.tensor([[0.5, 0, 0, 1, 1, 0]]), "integer values"),
    (torch.tensor([[0.0, 1, 1, 1, 1, float("nan")]]), "finite"),
    (torch.tensor([[0.0, 1, 1, 1, 1, float("inf")]]), "finite"),
    (torch.tensor([[0.0, 1, 1, float("inf"), 1, 0]]), "finite"),
    (torch.tensor([[0.0, 1, 1, -2, 1, 0]]), "width and height >= 0 with aligned=True"),
    (torch.zeros(2, 6, dtype=torch.int64), "floating-point"),
    ([torch.zeros(1, 5)], "list of 1 tensors but input has a batch of 2"),
    ([torch.zeros(1, 5), torch.zeros(1, 4)], r"boxes\[1\] must be a Tensor\[L, 5\]"),
    ("boxes", "must be a Tensor"),
])
def test_bad_boxes(boxes, message):
    with pytest.raises(ValueError, match=message):
        roi_align_rotated(torch.randn(2, 3, 10, 12), boxes, 3)


def test_bad_settings():
    x, rois = torch.randn(2, 3, 10, 12), torch.tensor([[0, 4.0, 4.0, 8.0, 6.0, 30.0]])
    with pytest.raises(ValueError, match="clockwise must be True or False"):
        roi_align_rotated(x, rois, 3, clockwise="yes")
    with pytest.raises(ValueError, match="angle_unit must be one of 'degrees', 'radians'"):
        roi_align_rotated(x, rois, 3, angle_unit="turns")
    with pytest.raises(ValueError, match="spatial_scale must be positive"):
        RoIAlignRotated(3, spatial_scale=0.0)
    with pytest.raises(ValueError, match="4-D"):
        roi_align_rotated(x[0], rois, 3)
    # aligned=False takes a negative size as 1 cell (mmcv's legacy rule), as the naive loop does
    neg = torch.tensor([[0, 8.0, 8.0, -3.0, 5.0, 20.0]], dtype=torch.float64)
    expected, _ = naive(x.double(), neg, (3, 3), 1.0, 2, aligned=False)
    torch.testing.assert_close(roi_align_rotated(x.double(), neg, 3, 1.0, 2, aligned=False), expected)


@pytest.mark.parametrize("angle", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_angle_past_the_checks_pools_zero(angle):
    """Under torch.compile the value checks do not run (as roi_align's): the registered op itself must take a
    non-finite angle (or coordinate) without a crash, a hang or a large allocation, and pool 0 (no sample lands)."""
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 4.0, 4.0, 6.0, 6.0, angle], [0, float("nan"), 4.0, 6.0, 6.0, 0.0],
                         [0, 4.0, 4.0, float("inf"), 6.0, 10.0]])
    for sampling_ratio in (-1, 2):
        out = torch.ops.roikit.roi_align_rotated(x, rois, 1.0, 3, 3, sampling_ratio, True, False, False)
        assert not out[:2].any() and bool(torch.isfinite(out).all())
        out.sum().backward()
        assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_cell_reaches_only_the_bins_that_read_it(bad):
    """roikit's rule (as its roi_align): an output is non-finite only if one of its samples reads the cell, through
    any of its 4 taps; a sample off the map reads nothing (detectron2's and mmcv's CPU kernels read cell (0, 0) with
    weight 0 for it, so a NaN there spreads to every box with an off-map sample)."""
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    x[0, 0, 0, 0] = bad
    rois = torch.tensor([[0, 5.0, 5.0, 4.0, 4.0, 45.0],  # off the map partly, far from cell (0, 0)
                         [0, 0.5, 0.5, 1.0, 1.0, 0.0]], dtype=torch.float64)  # samples on cells 0 and 1
    finite = x.clone()
    finite[0, 0, 0, 0] = 0.0
    out = roi_align_rotated(x, rois, 2, 2.0, 1)
    torch.testing.assert_close(out[0], roi_align_rotated(finite, rois, 2, 2.0, 1)[0], atol=0, rtol=0)
    assert bool(torch.isfinite(out[0]).all())
    expected, _ = naive(x, rois[1:], (2, 2), 2.0, 1)
    torch.testing.assert_close(out[1:], expected, equal_nan=True)
    assert not bool(torch.isfinite(out[1]).all())


# ---------------------------------------------------------------- bounded work for huge boxes
X = torch.randn(1, 8, 20, 20, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("side", [1e4, 1e30])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_huge_boxes_bounded_memory_and_time(peak_memory, side, sampling_ratio, angle):
    """A 10,000 px and a 1e30 px box over a 20 x 20 map: the samples of a bin that can land on the map are found
    first, so memory stays a few MiB and time a fraction of a second (detectron2's CPU kernel would tabulate
    1429^2 x 49 samples for the 10,000 px box, and cannot count the 1e30 px box's samples in an int). With
    sampling_ratio 2 the naive loop checks the values too."""
    rois = torch.tensor([[0, 10.0, 10.0, side, side, angle]])
    roi_align_rotated(X, torch.tensor([[0, 8.0, 8.0, 15.0, 15.0, 20.0]]), 7, 1.0, 2)  # first-call costs
    out, extra, seconds = peak_memory(lambda: roi_align_rotated(X, rois, 7, 1.0, sampling_ratio),
                                      address_space=1 << 30)
    assert extra < 64 * 2**20 and seconds < 10.0, (extra / 2**20, seconds)
    assert out.shape == (1, 8, 7, 7) and bool(torch.isfinite(out).all())
    if sampling_ratio > 0:
        expected, _ = naive(X.double(), rois.double(), (7, 7), 1.0, sampling_ratio)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    if side == 1e4 and angle == 0.0:  # the box's middle bin holds the whole map: torchvision with sr 2 agrees
        tv = torchvision.ops.roi_align(X, torch.tensor([[0, 10 - side / 2, 10 - side / 2, 10 + side / 2,
                                                         10 + side / 2]]), 7, 1.0, 2, True)
        assert torch.allclose(roi_align_rotated(X, rois, 7, 1.0, 2), tv, atol=1e-6)


def test_huge_box_adaptive_reads_the_whole_map_once():
    """A 10,000 px box at 30 degrees over the map, adaptive sampling (1429^2 samples per bin): every cell of the
    map sits inside one of its bins, so the gradient of the sum is count^-1 x (the bilinear weight each cell gets),
    which sums to (samples on the map) / count; compare with a direct count of the samples on the map."""
    x = X[:, :1].clone().requires_grad_()
    rois = torch.tensor([[0, 10.0, 10.0, 1e4, 1e4, 30.0]], dtype=torch.float64)
    out = roi_align_rotated(x.double(), rois, 7, 1.0, -1)
    out.sum().backward()
    # samples at yy, xx = -5000 + (i + 0.5) * 10000 / (7 * 1429): those landing in [-1, 20] after the turn
    spacing = 1e4 / (7 * 1429)
    i = torch.arange(7 * 1429, dtype=torch.float64)
    pos = -5000 + (i + 0.5) * spacing
    pos = pos[pos.abs() < 40]  # the map lies within 30 cells of the centre
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    yy, xx = pos[:, None], pos[None, :]
    y, xp = yy * c - xx * s + 9.5, yy * s + xx * c + 9.5
    on_map = int(((y >= -1) & (y <= 20) & (xp >= -1) & (xp <= 20)).sum())
    assert on_map > 300
    torch.testing.assert_close(x.grad.sum().double(), torch.tensor(on_map / 1429**2, dtype=torch.float64))


# ---------------------------------------------------------------- torch.library: opcheck, compile, autocast, fx
def test_opcheck_and_compile_fullgraph():
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = random_rotated_rois(5, 2, (10, 12), 0.5, seed=9)
    for args in ((0.5, 3, 2, 2, True, False, False), (0.5, 2, 3, -1, False, True, True)):
        torch.library.opcheck(torch.ops.roikit.roi_align_rotated.default, (x, rois, *args))

    def f(t):
        return roi_align_rotated(t, rois, 3, 0.5, 2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xe, xc = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    eager, comp = f(xe), compiled(xc)
    torch.testing.assert_close(comp, eager, atol=0, rtol=0)
    eager.sum().backward()
    comp.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=0, rtol=0)


def test_autocast_runs_in_float32():
    x = torch.randn(2, 3, 10, 12)
    rois = random_rotated_rois(5, 2, (10, 12), 0.5, seed=10, dtype=torch.float32)
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("roikit::roi_align_rotated", key)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = roi_align_rotated(x, rois, 3, 0.5, 2)
        mixed = roi_align_rotated(x.bfloat16(), rois, 3, 0.5, 2)
    assert same.dtype == torch.float32 and mixed.dtype == torch.bfloat16
    torch.testing.assert_close(same, roi_align_rotated(x, rois, 3, 0.5, 2), atol=0, rtol=0)
    torch.testing.assert_close(mixed, roi_align_rotated(x.bfloat16().float(), rois, 3, 0.5, 2).bfloat16(),
                               atol=0, rtol=0)


def test_backward_is_deterministic_and_fx_traces_a_leaf():
    x = torch.randn(2, 3, 10, 12)
    rois = random_rotated_rois(6, 2, (10, 12), 0.5, seed=11, dtype=torch.float32)
    grads = []
    for _ in range(2):
        xg = x.clone().requires_grad_()
        with deterministic_backward():
            roi_align_rotated(xg, rois, 3, 0.5).sum().backward()
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.pool = RoIAlignRotated(3, 0.5, 2)

        def forward(self, t, r):
            return self.pool(self.conv(t), r).sum((2, 3))

    model = Model()
    traced = torch.fx.symbolic_trace(model)
    called = {getattr(n.target, "__name__", None) for n in traced.graph.nodes if n.op == "call_function"}
    assert "roi_align_rotated" in called
    torch.testing.assert_close(traced(x, rois), model(x, rois), atol=0, rtol=0)


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


# ---------------------------------------------------------------- the Triton kernels, under the interpreter
def _kernels():
    pytest.importorskip("triton")
    module = importlib.import_module("roikit.ops.triton.roi_align_rotated")
    if not any(type(v).__name__ == "InterpretedFunction" for v in vars(module).values()):
        module = importlib.reload(module)
    return module


KERNEL_ROIS = torch.tensor([
    [0, 10.0, 8.0, 20.0, 12.0, 30.0],  # inside, turned
    [1, -4.0, 3.0, 14.0, 30.0, -75.0],  # partly outside
    [0, 25.0, 14.0, 0.0, 0.0, 0.0],  # zero size
    [1, 26.0, 14.0, 52.0, 28.0, 180.0],  # the whole map, upside down
    [0, 200.0, 200.0, 10.0, 10.0, 45.0],  # wholly outside
    [1, 20.0, 12.0, 400.0, 300.0, 33.0],  # far larger than the map
    [0, 13.5, 6.25, 6.0, 3.0, 400.0],  # small, a few cells
])
KERNEL_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.float16, True),
                                                  (torch.bfloat16, False)])
@pytest.mark.parametrize("aligned, sampling_ratio, clockwise", [(True, 2, False), (False, -1, True)])
def test_triton_kernels_match_the_reference(dtype, channels_last, aligned, sampling_ratio, clockwise):
    from roikit.ops.pytorch import roi_align_rotated as reference

    kernels = _kernels()
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 7, 13, generator=g).to(dtype)  # odd: C = 3, a 7 x 13 map
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = KERNEL_ROIS.clone()
    settings_ = (0.25, 3, 2, sampling_ratio, aligned, clockwise, False)
    expected = reference.roi_align_rotated_forward(x, rois, *settings_)
    out = kernels.roi_align_rotated_forward(x, rois, *settings_)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), **KERNEL_TOL[dtype])
    grad = torch.randn(out.shape, generator=g).to(dtype)
    expected_grad = reference.roi_align_rotated_backward(grad, rois, *settings_, 2, 3, 7, 13)
    for deterministic in (False, True):
        got = kernels.roi_align_rotated_backward(grad, rois, *settings_, 2, 3, 7, 13, deterministic)
        torch.testing.assert_close(got.float(), expected_grad.float(), **KERNEL_TOL[dtype],
                                   msg=f"deterministic={deterministic}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_deterministic_backward_is_bitwise_and_chunked(monkeypatch):
    kernels = _kernels()
    x = torch.randn(2, 3, 7, 13, generator=torch.Generator().manual_seed(14))
    rois = KERNEL_ROIS.clone()
    settings_ = (0.25, 3, 2, 2, True, False, True)  # radians this time
    out = kernels.roi_align_rotated_forward(x, rois, *settings_)
    grad = torch.randn_like(out)
    args = (grad, rois, *settings_, 2, 3, 7, 13, True)
    first = kernels.roi_align_rotated_backward(*args)
    assert torch.equal(first, kernels.roi_align_rotated_backward(*args))
    monkeypatch.setattr(kernels, "MAX_ENTRIES", 64)  # many launches, one box split over several
    torch.testing.assert_close(kernels.roi_align_rotated_backward(*args), first, atol=1e-6, rtol=1e-6)
    no_boxes = kernels.roi_align_rotated_backward(grad[:0], rois[:0], *settings_, 2, 3, 7, 13, True)
    assert no_boxes.shape == (2, 3, 7, 13) and not no_boxes.any()
    assert kernels.roi_align_rotated_forward(x, rois[:0], *settings_).shape == (0, 3, 3, 2)
