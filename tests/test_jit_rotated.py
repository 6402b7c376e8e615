"""Rotated RoIAlign's numba path (roikit/ops/pytorch/_numba_rotated.py) against the plain path and torchvision.

The kernels sample the plain path's points with its weights and add in another order (the plain path sums a bin
in one matrix product), so outputs and gradients agree to rounding: within 1e-6 in float32 (1e-12 in float64).
torchvision's roi_align is the oracle at angle 0 (another formula for the same samples: to rounding too).
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from roikit.ops import roi_align_rotated
from roikit.ops.pytorch import jit
from roikit.ops.pytorch import roi_align_rotated as rotated

pytestmark = pytest.mark.skipif(rotated._kernels() is None or not jit.enabled(), reason="numba is not installed")

C = 19  # more than jit.MIN_CHANNELS, not a multiple of a vector
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _map(dtype=torch.float32, seed=0, n=2, size=(13, 17)):
    return torch.randn(n, C, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _boxes(k=30, dtype=torch.float32, seed=1, angles=True):
    """(n, cx, cy, w, h, angle) in pixels at scale 0.5 on a 13 x 17 map: inside, across the edges and off it."""
    g = torch.Generator().manual_seed(seed)
    cx, cy = torch.rand(k, generator=g) * 44 -5, torch.rand(k, generator=g) * 36 - 5
    w, h = torch.rand(k, generator=g) * 30 + 0.5, torch.rand(k, generator=g) * 30 + 0.5
    angle = torch.rand(k, generator=g) * 360 - 180 if angles else torch.zeros(k)
    n = torch.randint(0, 2, (k,), generator=g).double()
    return torch.stack([n, cx, cy, w, h, angle], 1).to(dtype)


def _both_paths(x, rois, *args, grad_seed=2):
    """(output, gradient) of the numba path and of the plain path (``jit.disabled()``)."""
    results = []
    for plain in (False, True):
        xr = x.clone().requires_grad_()
        if plain:
            with jit.disabled():
                assert rotated.jit_forward(x, rois, 0.5, 3, 4, 2, True, False, False) is None
                out = roi_align_rotated(xr, rois, *args)
        else:
            out = roi_align_rotated(xr, rois, *args)
        grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), xr.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio,aligned,clockwise", [(2, True, False), (-1, True, True), (0, False, False),
                                                              (3, False, True)])
def test_numba_path_agrees_with_the_plain_path(dtype, sampling_ratio, aligned, clockwise):
    x, rois = _map(dtype), _boxes(dtype=dtype)
    (out, grad), (ref, ref_grad) = _both_paths(x, rois, (3, 4), 0.5, sampling_ratio, aligned, clockwise)
    assert out.any() and grad.any()
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(grad, ref_grad, atol=TOL[dtype], rtol=TOL[dtype])


def test_angle_zero_is_torchvision_roi_align():
    x = _map()
    rotated_rois = _boxes(angles=False)
    n, cx, cy, w, h, _ = rotated_rois.unbind(1)
    rois = torch.stack([n, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = torchvision.ops.roi_align(xt, rois, (3, 4), 0.5, 2, aligned=True)
    out = roi_align_rotated(xr, rotated_rois, (3, 4), 0.5, 2, aligned=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    expected.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(xr.grad, xt.grad, atol=1e-5, rtol=1e-5)


def test_hostile_boxes_and_cells_as_the_plain_path():
    # huge, zero-size, reversed (negative sides), far off the map, a fixed ratio on a zero-size box; a map with
    # NaN and inf cells: an output is non-finite exactly where the plain path's is
    x = _map(torch.float64, seed=4)
    x[0, 3, 2, 2], x[1, 5, 6, 9] = float("nan"), float("inf")
    rois = torch.tensor([[0, 8.0, 6.0, 1e6, 3e5, 30.0], [1, 8.0, 6.0, 0.0, 0.0, 10.0], [0, 10.0, 8.0, -6.0, 9.0, 45.0],
                         [1, 1e4, -1e4, 12.0, 12.0, 0.0], [0, 16.0, 12.0, 1e30, 1e30, 89.0],
                         [1, 5.0, 5.0, 7.0, -3.0, -120.0]], dtype=torch.float64)
    rois = torch.cat([rois, _boxes(k=10, dtype=torch.float64, seed=5)])
    for sampling_ratio, aligned in ((-1, False), (2, False), (2, True)):
        kept = rois if not aligned else rois[(rois[:, 3:5] >= 0).all(1)]  # aligned=True refuses reversed boxes
        (out, grad), (ref, ref_grad) = _both_paths(x, kept, (3, 4), 0.5, sampling_ratio, aligned, False)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12, equal_nan=True)
    finite = torch.nan_to_num(x, nan=0.0, posinf=3.0)
    (out, grad), (ref, ref_grad) = _both_paths(finite, rois, (3, 4), 0.5, -1, False, True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)


def test_gradcheck_through_the_numba_path():
    x = _map(torch.float64, n=1, size=(6, 7))[:, :C].requires_grad_()
    rois = torch.tensor([[0, 5.0, 4.0, 7.0, 5.0, 30.0], [0, 8.0, 6.0, 9.0, 4.0, -60.0]], dtype=torch.float64)
    assert rotated.jit_forward(x.detach(), rois, 0.5, 2, 2, 2, True, False, False) is not None  # the numba path
    assert torch.autograd.gradcheck(lambda t: roi_align_rotated(t, rois, 2, 0.5, 2), (x,))


def test_same_bits_on_one_and_two_threads_and_channels_last():
    x, rois = _map(seed=6), _boxes(k=64, seed=7)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for layout in (torch.contiguous_format, torch.channels_last):
                xr = x.clone(memory_format=layout).requires_grad_()
                out = roi_align_rotated(xr, rois, 7, 0.5, 2)
                out.backward(torch.ones_like(out))
                results.append((out.detach(), xr.grad))
    finally:
        torch.set_num_threads(before)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


def test_declines_what_it_does_not_take():
    rois = _boxes(k=3)
    assert rotated.jit_forward(_map()[:, : jit.MIN_CHANNELS - 1], rois, 0.5, 2, 2, 2, True, False, False) is None
    assert rotated.jit_forward(_map(), rois[:0], 0.5, 2, 2, 2, True, False, False) is None
    assert rotated.jit_forward(_map(), rois, 0.5, 2, 2, 2, True, False, False) is not None
    assert rotated.jit_backward(torch.ones(3, C, 2, 2), rois, 0.5, 2, 2, 2, True, False, False, 2, C, 13, 17) \
        is not None
    with jit.disabled():
        assert rotated.jit_backward(torch.ones(3, C, 2, 2), rois, 0.5, 2, 2, 2, True, False, False, 2, C, 13, 17) \
            is None
