"""deform_roi_pool against mmcv's published values, torchvision's RoIAlign (offset 0), a naive float64 loop (values,
feature and offset gradients) and gradcheck.

The naive loop below shares no code with roikit: one Python loop per box, bin, channel and sample, with mmcv's
``bilinear_interpolate`` (a sample outside ``[-1, H] x [-1, W]`` is 0, one inside is clamped to the map) and its
derivative (0 where the sample is clamped): tests/naive.py's ``bilinear_slopes``. Dtypes, bad input, the pack
modules and hostile boxes are in test_deform_roi_pool_api.py, the Triton kernels in test_deform_roi_pool_triton.py.
"""
from __future__ import annotations

import math

import naive
import pytest
import torch
import torchvision
from _helpers import deform_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roikit.ops import DeformRoIPoolPack, ModulatedDeformRoIPoolPack, deform_roi_pool


# ---------------------------------------------------------------- the naive loop
def _box_bins(roi, offset_k, pooled, scale, sampling_ratio, gamma):
    """Yield (ph, pw, sample points, count, roi_h, roi_w) of one box, in mmcv's arithmetic."""
    x1, y1, x2, y2 = (float(v) * scale - 0.5 for v in roi[1:])
    roi_w, roi_h = x2 - x1, y2 - y1
    bin_h, bin_w = roi_h / pooled[0], roi_w / pooled[1]
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_h)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_w)
    for ph in range(pooled[0]):
        for pw in range(pooled[1]):
            sy = y1 + (gamma * roi_h * float(offset_k[1, ph, pw]) if offset_k is not None else 0.0)
            sx = x1 + (gamma * roi_w * float(offset_k[0, ph, pw]) if offset_k is not None else 0.0)
            points = [(sy + ph * bin_h + (iy + 0.5) * bin_h / gh, sx + pw * bin_w + (ix + 0.5) * bin_w / gw)
                      for iy in range(max(gh, 0)) for ix in range(max(gw, 0))]
            yield ph, pw, points, max(gh * gw, 1), roi_h, roi_w


def naive_loop(x, rois, offset, pooled, scale, sampling_ratio, gamma, grad=None):
    """Output [K, C, PH, PW] and, for ``grad``, the gradients of ``(out * grad).sum()`` for x and offset."""
    n, c, h, w = x.shape
    k_n = rois.shape[0]
    out = torch.zeros(k_n, c, *pooled, dtype=torch.float64)
    grad_x = torch.zeros(n, c, h, w, dtype=torch.float64)
    grad_offset = torch.zeros(k_n, 2, *pooled, dtype=torch.float64)
    maps = x.double().tolist()
    for k in range(k_n):
        b = int(rois[k, 0])
        off = None if offset is None else offset[k]
        for ph, pw, points, count, roi_h, roi_w in _box_bins(rois[k].tolist(), off, pooled, scale, sampling_ratio,
                                                             gamma):
            for ch in range(c):
                g = 0.0 if grad is None else float(grad[k, ch, ph, pw])
                total = d_y = d_x = 0.0
                for y, xx in points:
                    v, dy, dx, taps = naive.bilinear_slopes(maps[b][ch], y, xx)
                    total, d_y, d_x = total + v, d_y + dy, d_x + dx
                    for i, j, wt in taps:
                        grad_x[b, ch, i, j] += g * wt / count
                out[k, ch, ph, pw] = total / count
                grad_offset[k, 0, ph, pw] += g * gamma * roi_w * d_x / count
                grad_offset[k, 1, ph, pw] += g * gamma * roi_h * d_y / count
    return out, grad_x, grad_offset


# ---------------------------------------------------------------- mmcv's published values
# mmcv, tests/test_ops/test_deform_roi_pool.py: `inputs` and `outputs`, checked by
# TestDeformRoIPool._test_deform_roi_pool_allclose with DeformRoIPoolPack((2, 2), C, spatial_scale=1.0,
# sampling_ratio=2) (its last offset layer starts at zero), output.backward(ones): (input, rois, output, input grad).
MMCV_CASES = [
    ([[[[1., 2.], [3., 4.]]]], [[0., 0., 0., 1., 1.]],
     [[[[1, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0., 0., 1., 1.]],
     [[[[1., 1.25], [1.5, 1.75]], [[4, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]], [[0., 0., 0., 3., 3.]],
     [[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.4296875, 0.4296875, 0.04296875], [0.4296875, 0.390625, 0.390625, 0.0390625],
        [0.4296875, 0.390625, 0.390625, 0.0390625], [0.04296875, 0.0390625, 0.0390625, 0.00390625]]]]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("case", range(len(MMCV_CASES)))
@pytest.mark.parametrize("modulated", [False, True], ids=["pack", "modulated"])
def test_mmcv_published_values(case, dtype, modulated):
    """mmcv's expected outputs and input gradients; the modulated pack starts with every mask at sigmoid(0) = 0.5
    and no gradient through the mask (its last layer is zero), so it gives half of each."""
    x_list, rois_list, expected_out, expected_grad = MMCV_CASES[case]
    x = torch.tensor(x_list, dtype=dtype, requires_grad=True)
    rois = torch.tensor(rois_list, dtype=dtype)
    cls = ModulatedDeformRoIPoolPack if modulated else DeformRoIPoolPack
    pool = cls((2, 2), x.shape[1], spatial_scale=1.0, sampling_ratio=2).to(dtype)
    out = pool(x, rois)
    out.backward(torch.ones_like(out))
    factor = 0.5 if modulated else 1.0
    tol = dict(atol=1e-3, rtol=1e-3)  # mmcv's np.allclose(..., 1e-3)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), factor * torch.tensor(expected_out, dtype=torch.float64), **tol)
    torch.testing.assert_close(x.grad.double(), factor * torch.tensor(expected_grad, dtype=torch.float64), **tol)


# ---------------------------------------------------------------- offset 0 is RoIAlign (aligned=True)
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_offset_is_torchvision_roi_align_aligned(make_rois, sampling_ratio, dtype):
    """mmcv's kernel has no minimum box size (no ``max(roi_w, 0.1)``, unlike mmdet v1's deform PS-RoI pooling), so
    offset 0 and torchvision's roi_align(aligned=True) agree on every box: outside, zero-size, reversed (not with
    adaptive sampling: torchvision's CPU kernel then sizes a table by a negative sample count and raises)."""
    rois = make_rois(k=24, n=2, size=(13, 17), scale=0.5, dtype=dtype, reversed_boxes=sampling_ratio > 0)
    x = torch.randn(2, 4, 13, 17, dtype=dtype, generator=torch.Generator().manual_seed(1))
    expected = torchvision.ops.roi_align(x, rois, (3, 4), 0.5, sampling_ratio, aligned=True)
    zero = torch.zeros(24, 2, 3, 4, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(deform_roi_pool(x, rois, zero, (3, 4), 0.5, sampling_ratio), expected, **tol)
    torch.testing.assert_close(deform_roi_pool(x, rois, None, (3, 4), 0.5, sampling_ratio), expected, **tol)


def test_a_uniform_offset_is_roi_align_on_the_moved_box():
    """Every bin moved by (dx, dy) = gamma * (roi_w, roi_h) * (0.7, -0.4) is RoIAlign of the box moved so."""
    x = torch.randn(1, 2, 12, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rois = torch.tensor([[0, 3.0, 4.0, 21.0, 17.0], [0, -5.0, 10.0, 9.0, 30.0]], dtype=torch.float64)
    offset = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    offset[:, 0], offset[:, 1] = 0.7, -0.4
    w, h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]  # in pixels: the shift in pixels is gamma * size * o
    moved = rois.clone()
    moved[:, [1, 3]] += (0.1 * w * 0.7)[:, None]
    moved[:, [2, 4]] += (0.1 * h * -0.4)[:, None]
    expected = torchvision.ops.roi_align(x, moved, 3, 1.0, 2, aligned=True)
    torch.testing.assert_close(deform_roi_pool(x, rois, offset, 3, 1.0, 2, 0.1), expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- the naive loop: values and both gradients
@pytest.mark.parametrize("sampling_ratio", [0, 2, 3])
def test_matches_naive_loop(sampling_ratio):
    x, rois, offset = deform_case()
    xg, og = x.clone().requires_grad_(), offset.clone().requires_grad_()
    out = deform_roi_pool(xg, rois, og, (3, 2), 0.5, sampling_ratio, 0.1)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    expected, grad_x, grad_offset = naive_loop(x, rois, offset, (3, 2), 0.5, sampling_ratio, 0.1, grad)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(xg.grad, grad_x, atol=1e-12, rtol=0)
    torch.testing.assert_close(og.grad, grad_offset, atol=1e-12, rtol=0)
    assert og.grad[:4].abs().sum() > 0  # the boxes on the map do move


def test_gradcheck_input_and_offset():
    x, rois, offset = deform_case(seed=4, k=4, size=(6, 7))
    x = x[:1, :2]
    rois[:, 0] = 0
    x.requires_grad_()
    offset.requires_grad_()
    for sampling_ratio in (2, 0):
        assert torch.autograd.gradcheck(
            lambda a, o, s=sampling_ratio: deform_roi_pool(a, rois, o, (3, 2), 0.5, s, 0.3), (x, offset),
            fast_mode=True)
    assert torch.autograd.gradcheck(lambda a: deform_roi_pool(a, rois, None, (3, 2), 0.5, 2), (x,))


def test_gradcheck_modulated_pack_with_live_heads():
    """mmcv gradchecks its packs with the heads at their zero start; here every layer is random, so the offsets
    and masks move and the gradient flows through both heads too."""
    torch.manual_seed(0)
    pool = ModulatedDeformRoIPoolPack((2, 2), 3, deform_fc_channels=5, spatial_scale=0.5, sampling_ratio=2,
                                      gamma=0.2).double()
    for p in pool.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, rois, _ = deform_case(seed=5, k=3, size=(5, 6), pooled=(2, 2))
    x = x[:1]
    rois[:, 0] = 0
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pool(a, rois), (x,), fast_mode=True)


def _mmcv_offset_gradient(x, rois, offset, pooled, scale, sampling_ratio, gamma, grad):
    """mmcv's deform_roi_pool_backward_cuda_kernel's grad_offset: the slope of the bilinear formula at the
    *unclamped* sample (y, x) with the clamped taps."""
    k_n, c = rois.shape[0], x.shape[1]
    h, w = x.shape[2:]
    out = torch.zeros(k_n, 2, *pooled, dtype=torch.float64)
    for k in range(k_n):
        b = int(rois[k, 0])
        for ph, pw, points, count, roi_h, roi_w in _box_bins(rois[k].tolist(), offset[k], pooled, scale,
                                                             sampling_ratio, gamma):
            for ch in range(c):
                f = x[b, ch].tolist()
                g = float(grad[k, ch, ph, pw]) / count
                for y, xx in points:
                    if y < -1.0 or y > h or xx < -1.0 or xx > w:
                        continue
                    y0 = min(int(max(y, 0.0)), h - 1)
                    x0 = min(int(max(xx, 0.0)), w - 1)
                    y1, x1 = min(y0 + 1, h - 1) if y0 < h - 1 else y0, min(x0 + 1, w - 1) if x0 < w - 1 else x0
                    out[k, 0, ph, pw] += gamma * roi_w * g * (f[y1][x1] * (y - y0) + f[y0][x1] * (y1 - y)
                                                              + f[y1][x0] * (y0 - y) + f[y0][x0] * (y - y1))
                    out[k, 1, ph, pw] += gamma * roi_h * g * (f[y1][x1] * (xx - x0) + f[y1][x0] * (x1 - xx)
                                                              + f[y0][x1] * (x0 - xx) + f[y0][x0] * (xx - x1))
    return out


def test_offset_gradient_agrees_with_mmcv_inside_and_differs_at_the_border():
    """Inside the map the offset gradient is mmcv's. Where a sample is clamped to the edge (here x in [-1, 0),
    where the forward does not change with x) mmcv's formula still has the bilinear slope along x, and its slope
    along y weighs the taps with the unclamped x (extrapolated weights); roikit's gradient is the forward's
    derivative: 0 along x, the clamped sample's slope along y (the naive loop's)."""
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    inside = torch.tensor([[0, 2.0, 2.0, 6.0, 6.0]], dtype=torch.float64)  # samples at 1.62 ... 5.12
    offset = torch.full((1, 2, 2, 2), 0.3, dtype=torch.float64)
    grad = torch.randn(1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    og = offset.clone().requires_grad_()
    deform_roi_pool(x, inside, og, 2, 1.0, 2, 0.1).backward(grad)
    torch.testing.assert_close(og.grad, _mmcv_offset_gradient(x, inside, offset, (2, 2), 1.0, 2, 0.1, grad))

    border = torch.tensor([[0, -0.4, 3.0, 0.4, 7.0]], dtype=torch.float64)  # x samples at -0.8 ... -0.2
    zero = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    og = zero.clone().requires_grad_()
    deform_roi_pool(x, border, og, 2, 1.0, 2, 0.1).backward(grad)
    mmcv = _mmcv_offset_gradient(x, border, zero, (2, 2), 1.0, 2, 0.1, grad)
    assert torch.equal(og.grad[:, 0], torch.zeros_like(og.grad[:, 0])) and mmcv[:, 0].abs().min() > 0
    torch.testing.assert_close(og.grad, naive_loop(x, border, zero, (2, 2), 1.0, 2, 0.1, grad)[2])
    assert (og.grad[:, 1] - mmcv[:, 1]).abs().min() > 1e-3


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    pooled=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    boxes=st.lists(st.tuples(*[st.floats(-6, 20, allow_nan=False, width=32)] * 4), min_size=1, max_size=3),
    offsets=st.floats(-3, 3, width=32),
    sampling_ratio=st.integers(-1, 3),
    gamma=st.sampled_from([0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_differential_against_naive_loop(size, pooled, boxes, offsets, sampling_ratio, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, *size, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0.0, *b] for b in boxes], dtype=torch.float64)
    offset = torch.randn(len(boxes), 2, *pooled, generator=g, dtype=torch.float64) * offsets
    xg, og = x.clone().requires_grad_(), offset.clone().requires_grad_()
    out = deform_roi_pool(xg, rois, og, pooled, 0.5, sampling_ratio, gamma)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    expected, grad_x, grad_offset = naive_loop(x, rois, offset, pooled, 0.5, sampling_ratio, gamma, grad)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(xg.grad, grad_x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(og.grad, grad_offset, atol=1e-9, rtol=1e-9)
