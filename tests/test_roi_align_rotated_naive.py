"""roi_align_rotated against a naive float64 loop (tests/naive.py: one Python loop per box, bin and sample, from the
formulas of detectron2's and mmcv's ROIAlignRotated kernels): every flag, gradcheck, hypothesis draws; non-finite
angles and cells; bounded work for huge boxes."""
from __future__ import annotations

import math

import naive
import pytest
import torch
import torchvision
from _helpers import random_rotated_rois
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roikit.ops import roi_align_rotated


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
    expected, weights = naive.roi_align_rotated(x, rois, (3, 2), 0.5, sampling_ratio, aligned, clockwise, radians)
    xg = x.clone().requires_grad_()
    out = roi_align_rotated(xg, rois, (3, 2), 0.5, sampling_ratio, aligned, clockwise, unit)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(xg.grad, naive.grad_from_taps(x, weights, grad), atol=1e-12, rtol=0)
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
    expected, weights = naive.roi_align_rotated(x, rois, (2, 3), 0.5, sampling_ratio, aligned, clockwise)
    xg = x.clone().requires_grad_()
    out = roi_align_rotated(xg, rois, (2, 3), 0.5, sampling_ratio, aligned, clockwise)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)
    grad = torch.ones_like(out)
    out.backward(grad)
    torch.testing.assert_close(xg.grad, naive.grad_from_taps(x, weights, grad), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("angle", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_angle_refused_by_the_registered_op(angle):
    """The registered op checks its own boxes (a torch.compile graph calls it past the public wrapper's checks): a
    non-finite angle is a ValueError naming the op and the row, forward and backward, not a silent zero."""
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 4.0, 4.0, 6.0, 6.0, 0.0], [0, 4.0, 4.0, 6.0, 6.0, angle]])
    for sampling_ratio in (-1, 2):
        with pytest.raises(ValueError, match=r"roikit::roi_align_rotated: rois must be finite; row 1"):
            torch.ops.roikit.roi_align_rotated(x, rois, 1.0, 3, 3, sampling_ratio, True, False, False)
    grad = torch.ones(2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"roikit::roi_align_rotated_backward: rois must be finite; row 1"):
        torch.ops.roikit.roi_align_rotated_backward(grad, rois, 1.0, 3, 3, 2, True, False, False, 1, 2, 8, 8, False)


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
    expected, _ = naive.roi_align_rotated(x, rois[1:], (2, 2), 2.0, 1)
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
        expected, _ = naive.roi_align_rotated(X.double(), rois.double(), (7, 7), 1.0, sampling_ratio)
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
