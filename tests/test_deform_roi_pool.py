"""deform_roi_pool against mmcv's published values, torchvision's RoIAlign (offset 0), a naive float64 loop (values,
feature and offset gradients) and gradcheck; the pack modules; the Triton kernels under the interpreter; hostile
boxes and offsets.

The naive loop below shares no code with roikit: one Python loop per box, bin, channel and sample, with mmcv's
``bilinear_interpolate`` (a sample outside ``[-1, H] x [-1, W]`` is 0, one inside is clamped to the map) and its
derivative (0 where the sample is clamped).
"""
from __future__ import annotations

import importlib
import math
import os
import time

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roikit.ops import (
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    deform_roi_pool,
    deterministic_backward,
    roi_align,
)
from roikit.ops.pytorch import deform_roi_pool as ref


# ---------------------------------------------------------------- the naive loop
def _bilinear(f, y, x):
    """mmcv's bilinear_interpolate on f (list of rows): value, d/dy, d/dx and the 4 taps (i, j, weight)."""
    h, w = len(f), len(f[0])
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0, 0.0, 0.0, []
    moves_y, moves_x = float(y >= 0), float(x >= 0)  # clamped to the first centre: does not move
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y, moves_y = float(y0), 0.0
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x, moves_x = float(x0), 0.0
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    value = hy * hx * f[y0][x0] + hy * lx * f[y0][x1] + ly * hx * f[y1][x0] + ly * lx * f[y1][x1]
    d_y = moves_y * (hx * (f[y1][x0] - f[y0][x0]) + lx * (f[y1][x1] - f[y0][x1]))
    d_x = moves_x * (hy * (f[y0][x1] - f[y0][x0]) + ly * (f[y1][x1] - f[y1][x0]))
    return value, d_y, d_x, [(y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)]


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


def naive(x, rois, offset, pooled, scale, sampling_ratio, gamma, grad=None):
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
                    v, dy, dx, taps = _bilinear(maps[b][ch], y, xx)
                    total, d_y, d_x = total + v, d_y + dy, d_x + dx
                    for i, j, wt in taps:
                        grad_x[b, ch, i, j] += g * wt / count
                out[k, ch, ph, pw] = total / count
                grad_offset[k, 0, ph, pw] += g * gamma * roi_w * d_x / count
                grad_offset[k, 1, ph, pw] += g * gamma * roi_h * d_y / count
    return out, grad_x, grad_offset


def _case(seed=0, dtype=torch.float64, k=6, size=(9, 11), pooled=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64).to(dtype)
    rois = torch.tensor([
        [0, 1.0, 2.0, 15.0, 17.0],  # inside
        [1, 4.0, 0.5, 20.0, 9.0],
        [1, -3.0, 5.0, 8.0, 30.0],  # partly outside
        [0, 20.0, 20.0, 3.0, 4.0],  # reversed
        [0, 5.0, 5.0, 5.0, 5.0],  # zero size
        [1, 40.0, 40.0, 60.0, 50.0],  # wholly outside
    ], dtype=torch.float64)[:k].to(dtype)
    offset = (torch.randn(k, 2, *pooled, generator=g, dtype=torch.float64) * 0.6).to(dtype)
    return x, rois, offset


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
    x, rois, offset = _case()
    xg, og = x.clone().requires_grad_(), offset.clone().requires_grad_()
    out = deform_roi_pool(xg, rois, og, (3, 2), 0.5, sampling_ratio, 0.1)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    expected, grad_x, grad_offset = naive(x, rois, offset, (3, 2), 0.5, sampling_ratio, 0.1, grad)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(xg.grad, grad_x, atol=1e-12, rtol=0)
    torch.testing.assert_close(og.grad, grad_offset, atol=1e-12, rtol=0)
    assert og.grad[:4].abs().sum() > 0  # the boxes on the map do move


def test_gradcheck_input_and_offset():
    x, rois, offset = _case(seed=4, k=4, size=(6, 7))
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
    x, rois, _ = _case(seed=5, k=3, size=(5, 6), pooled=(2, 2))
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
    torch.testing.assert_close(og.grad, naive(x, border, zero, (2, 2), 1.0, 2, 0.1, grad)[2])
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
    expected, grad_x, grad_offset = naive(x, rois, offset, pooled, 0.5, sampling_ratio, gamma, grad)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(xg.grad, grad_x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(og.grad, grad_offset, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------- dtypes, batches, determinism, empties
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    """Half types are read and accumulated in float32 (float32 boxes keep the geometry exact): the result is the
    float32 op on the same (rounded) values, in the features' dtype; so are the gradients."""
    x, rois, offset = _case(seed=8, dtype=torch.float32)
    xh, oh = x.to(dtype).requires_grad_(), offset.to(dtype).requires_grad_()
    out = deform_roi_pool(xh, rois, oh, (3, 2), 0.5, 2)
    xf, of = xh.detach().float().requires_grad_(), oh.detach().float().requires_grad_()
    expected = deform_roi_pool(xf, rois, of, (3, 2), 0.5, 2)
    assert out.dtype == dtype
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 0.0}[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    out.backward(grad)
    expected.backward(grad.float())
    assert xh.grad.dtype == oh.grad.dtype == dtype
    torch.testing.assert_close(xh.grad.float(), xf.grad, atol=tol * 4, rtol=tol * 4)
    torch.testing.assert_close(oh.grad.float(), of.grad, atol=tol * 4, rtol=tol * 4)


def test_list_of_boxes_and_one_image_at_a_time():
    x, rois, offset = _case(seed=10)
    out = deform_roi_pool(x, rois, offset, (3, 2), 0.5, 2)
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        single = deform_roi_pool(x[b:b + 1], [rois[k:k + 1, 1:]], offset[k:k + 1], (3, 2), 0.5, 2)
        torch.testing.assert_close(out[k:k + 1], single, atol=1e-13, rtol=0)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(2)])
    torch.testing.assert_close(deform_roi_pool(x, boxes, offset[order], (3, 2), 0.5, 2), out[order])


def test_backward_is_deterministic():
    x, rois, offset = _case(seed=11, dtype=torch.float32)
    grads = []
    for _ in range(2):
        xg, og = x.clone().requires_grad_(), offset.clone().requires_grad_()
        with deterministic_backward():
            deform_roi_pool(xg, rois, og, (3, 2), 0.5, 0).sum().backward()
        grads.append((xg.grad, og.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_no_boxes_and_empty_maps():
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    offset = torch.zeros(0, 2, 3, 3, requires_grad=True)
    out = deform_roi_pool(x, torch.zeros(0, 5), offset, 3)
    assert out.shape == (0, 3, 3, 3)
    out.sum().backward()
    assert not x.grad.any() and offset.grad.shape == (0, 2, 3, 3)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 2.0, 4.0, 3.0]])
    for shape in [(2, 3, 0, 7), (2, 3, 6, 0), (2, 0, 6, 7)]:
        e = torch.zeros(shape, requires_grad=True)
        o = torch.ones(2, 2, 3, 3, requires_grad=True)
        out = deform_roi_pool(e, rois, o, 3)
        assert out.shape == (2, shape[1], 3, 3) and not out.any()
        out.sum().backward()
        assert e.grad.shape == shape and not o.grad.any()


# ---------------------------------------------------------------- bad input
def test_bad_input_is_a_value_error():
    x = torch.randn(2, 3, 6, 7)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 2.0, 4.0, 3.0]])
    good = torch.zeros(2, 2, 3, 3)
    cases = [
        (lambda: deform_roi_pool(x, rois, torch.zeros(2, 2, 3, 2), 3), r"offset must be None or a Tensor\[K, 2, PH"),
        (lambda: deform_roi_pool(x, rois, torch.zeros(3, 2, 3, 3), 3), r"\[2, 2, 3, 3\]"),
        (lambda: deform_roi_pool(x, rois, torch.zeros(2, 1, 3, 3), 3), "offset must be None"),
        (lambda: deform_roi_pool(x, rois, "offset", 3), "offset must be None"),
        (lambda: deform_roi_pool(x, rois, good.long(), 3), "offset must be a floating-point"),
        (lambda: deform_roi_pool(x, rois, good.to("meta"), 3), "offset is on meta"),
        (lambda: deform_roi_pool(x, rois, torch.full_like(good, math.nan), 3), "offset must be finite"),
        (lambda: deform_roi_pool(x, rois, torch.full_like(good, math.inf), 3), "offset must be finite"),
        (lambda: deform_roi_pool(x, rois[:, :4], None, 3), r"Tensor\[K, 5\]"),
        (lambda: deform_roi_pool(x, torch.tensor([[2.0, 0, 0, 1, 1]]), None, 3), r"must lie in \[0, 2\)"),
        (lambda: deform_roi_pool(x, rois, good, 3, gamma=math.nan), "gamma must be a finite number"),
        (lambda: deform_roi_pool(x, rois, good, 3, gamma=math.inf), "gamma must be a finite number"),
        (lambda: deform_roi_pool(x, rois, good, 3, gamma="0.1"), "gamma must be a finite number"),
        (lambda: deform_roi_pool(x, rois, good, 3, gamma=True), "gamma must be a finite number"),
        (lambda: deform_roi_pool(x, rois, good, 3, sampling_ratio=2.0), "sampling_ratio must be an int"),
        (lambda: deform_roi_pool(x, rois, good, 3, spatial_scale=0.0), "spatial_scale must be positive"),
        (lambda: deform_roi_pool(x, rois, good, (3, 0)), "output_size must be positive"),
        (lambda: deform_roi_pool(x[0], rois, good, 3), "4-D"),
        (lambda: DeformRoIPool(3, gamma=math.nan), "gamma must be a finite number"),
        (lambda: DeformRoIPoolPack(3, 4)(x, rois), "input has 3 channels but this DeformRoIPoolPack was built for "
                                                   "output_channels=4"),
        (lambda: DeformRoIPoolPack(3, 0), "output_channels must be >= 1"),
        (lambda: ModulatedDeformRoIPoolPack(3, 3, deform_fc_channels=1.5), "deform_fc_channels must be an int"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------- registration, compile, modules
def test_opcheck():
    x, rois, offset = _case(seed=12, k=4)
    op = torch.ops.roikit.deform_roi_pool.default
    torch.library.opcheck(op, (x.clone().requires_grad_(), rois, offset.clone().requires_grad_(), 0.5, 3, 2, 2, 0.1))
    torch.library.opcheck(op, (x.clone().requires_grad_(), rois, None, 0.5, 3, 2, 0, 0.1))
    torch.library.opcheck(op, (x.clone().requires_grad_(), rois, offset, 0.5, 3, 2, 2, 0.1))  # no offset grad


def test_torch_compile_fullgraph_matches_eager():
    x, rois, offset = _case(seed=13, dtype=torch.float32)

    def f(a, o):
        return deform_roi_pool(a, rois, o, (3, 2), 0.5, 2, 0.1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xe, oe = x.clone().requires_grad_(), offset.clone().requires_grad_()
    xc, oc = x.clone().requires_grad_(), offset.clone().requires_grad_()
    eager, comp = f(xe, oe), compiled(xc, oc)
    torch.testing.assert_close(comp, eager, atol=0, rtol=0)
    eager.square().sum().backward()
    comp.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=0, rtol=0)
    torch.testing.assert_close(oc.grad, oe.grad, atol=0, rtol=0)


def test_pack_compiles_and_autocasts():
    torch.manual_seed(1)
    pool = DeformRoIPoolPack((3, 2), 3, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2)
    torch.nn.init.normal_(pool.offset_fc[-1].weight, std=0.1)
    x, rois, _ = _case(seed=14, dtype=torch.float32)
    torch.testing.assert_close(torch.compile(pool, fullgraph=True, backend="aot_eager")(x, rois), pool(x, rois))
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("roikit::deform_roi_pool", key)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_roi_pool(x.bfloat16(), rois, torch.zeros(6, 2, 3, 2, dtype=torch.bfloat16), (3, 2), 0.5, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, roi_align(x.bfloat16().float(), rois, (3, 2), 0.5, 2, True).bfloat16(),
                               atol=0, rtol=0)


def test_pack_modules_structure_repr_and_mask():
    pack = ModulatedDeformRoIPoolPack((2, 3), 4, deform_fc_channels=6, spatial_scale=0.25, gamma=0.2)
    assert sorted(pack.state_dict()) == sorted(  # mmcv's names: its checkpoints load
        [f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
        + [f"mask_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")])
    assert pack.offset_fc[4].out_features == 2 * 6 and pack.mask_fc[2].out_features == 6
    assert pack.offset_fc[0].in_features == pack.mask_fc[0].in_features == 4 * 6
    assert "output_size=(2, 3), spatial_scale=0.25, sampling_ratio=0, gamma=0.2, output_channels=4" in repr(pack)
    torch.manual_seed(2)
    for p in pack.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 4, 10, 12)
    rois = torch.tensor([[0, 2.0, 3.0, 30.0, 25.0], [0, 10.0, 1.0, 44.0, 39.0]])
    flat = deform_roi_pool(x, rois, None, (2, 3), 0.25, 0, 0.2).flatten(1)
    offset = pack.offset_fc(flat).view(2, 2, 2, 3)
    mask = torch.sigmoid(pack.mask_fc[:3](flat)).view(2, 1, 2, 3)
    expected = deform_roi_pool(x, rois, offset, (2, 3), 0.25, 0, 0.2) * mask
    torch.testing.assert_close(pack(x, rois), expected)
    plain = DeformRoIPool((2, 3), 0.25, 0, 0.2)
    assert repr(plain) == "DeformRoIPool(output_size=(2, 3), spatial_scale=0.25, sampling_ratio=0, gamma=0.2)"
    torch.testing.assert_close(plain(x, rois, offset), expected / mask)


# ---------------------------------------------------------------- hostile boxes and offsets
HOSTILE = [  # (box in px on a 20 x 20 map at scale 1, sampling_ratio, offset value)
    ([0, 0, 0, 1e4, 1e4], 0, 0.0),  # 10,000 px, adaptive: 1429 samples a bin and axis, about 22 on the map
    ([0, 0, 0, 1e4, 1e4], 0, -0.05),  # the same, its bins moved back onto the map
    ([0, 0, 0, 1e30, 1e30], 0, 0.0),  # MAX_GRID samples a bin and axis
    ([0, -1e30, -1e30, 1e30, 1e30], 1000, 1e30),  # offsets overflow float32: inf * 0 = NaN corners, off the map
    ([0, 2, 3, 15, 12], 1000, 1e6),  # an ordinary box moved a million boxes away
    ([0, 2, 3, 15, 12], 5, 0.2),  # ordinary
]


@pytest.mark.parametrize("box, sampling_ratio, value", HOSTILE,
                         ids=["10k_px", "10k_px_moved", "1e30_px", "1e30_offsets", "1e6_offsets", "ordinary"])
def test_hostile_boxes_and_offsets_bounded(peak_memory, box, sampling_ratio, value):
    """Memory and time follow the map, not the box or its offsets: peak under 128 MiB (a box-sized table would
    take gigabytes) and a few seconds. Values: a bin moved off the map is 0; at offset 0 the result is roi_align's
    (the row-times-column path, tested against torchvision there)."""
    x = torch.randn(1, 8, 20, 20, generator=torch.Generator().manual_seed(15))
    rois = torch.tensor([box], dtype=torch.float32)
    offset = torch.full((1, 2, 7, 7), value).requires_grad_()
    xg = x.clone().requires_grad_()
    deform_roi_pool(x[:, :, :4, :4], rois, offset.detach(), 7, 1.0, sampling_ratio)  # warm-up

    def run():
        out = deform_roi_pool(xg, rois, offset, 7, 1.0, sampling_ratio)
        out.backward(torch.ones_like(out))
        return out

    start = time.perf_counter()
    out, extra, _ = peak_memory(run)
    seconds = time.perf_counter() - start
    assert extra < 128 * 2**20, f"{extra / 2**20:.0f} MiB"
    assert seconds < 20.0, f"{seconds:.1f} s"
    assert out.shape == (1, 8, 7, 7) and bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(xg.grad).all()) and bool(torch.isfinite(offset.grad).all())
    if abs(value) >= 1e6:
        assert not out.any() and not xg.grad.any() and not offset.grad.any()
    if value == 0.0:
        torch.testing.assert_close(out, roi_align(x, rois, 7, 1.0, sampling_ratio, True), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Triton kernels (interpreter)
def _kernels():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    module = importlib.import_module("roikit.ops.triton.deform_roi_pool")
    if type(module._deform_fwd_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


TRITON_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _triton_case(dtype, channels_last, seed=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, 13, generator=g).to(dtype)  # odd: C = 3, a 7 x 13 map (28 x 52 px at stride 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([
        [0, 1.0, 1.5, 30.3, 20.2], [1, -10.0, -5.0, 8.0, 40.0], [0, 5.0, 5.0, 5.0, 5.0], [1, 20.0, 20.0, 3.0, 4.0],
        [0, 100.0, 100.0, 120.0, 130.0], [1, 0.0, 0.0, 52.0, 28.0], [0, 10.5, 6.25, 22.0, 14.0],
    ])
    offset = torch.randn(7, 2, 3, 5, generator=g)
    return x, rois, offset


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy log2(0) of degenerate boxes
@pytest.mark.parametrize("dtype, channels_last, sampling_ratio, with_offset", [
    (torch.float32, False, 2, True), (torch.float32, False, 0, True), (torch.float32, True, 0, False),
    (torch.float16, True, 2, True), (torch.bfloat16, False, 0, True),
])
def test_triton_kernels_match_the_reference(dtype, channels_last, sampling_ratio, with_offset):
    """A 3 x 5 output on a 3 x 7 x 13 map: forward, the feature gradient (atomic and deterministic, bitwise
    repeatable) and the offset gradient, against the plain-PyTorch reference (on the same rounded values)."""
    T = _kernels()
    x, rois, offset = _triton_case(dtype, channels_last)
    offset = offset if with_offset else None
    args = (0.25, 3, 5, sampling_ratio, 0.1)
    out = T.deform_roi_pool_forward(x, rois, offset, *args)
    expected = ref.deform_roi_pool_forward(x.float(), rois, offset, *args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **TRITON_TOL[dtype])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(17)).to(dtype)
    exp_x, exp_off = ref.deform_roi_pool_backward(grad.float(), x.float(), rois, offset, *args, True)
    atomic = T.deform_roi_pool_backward(grad, x, rois, offset, *args, True, False)
    determ = [T.deform_roi_pool_backward(grad, x, rois, offset, *args, True, True) for _ in range(2)]
    assert torch.equal(determ[0][0], determ[1][0]) and torch.equal(determ[0][1], determ[1][1])
    tol = dict(atol=5e-5, rtol=5e-5) if dtype == torch.float32 else TRITON_TOL[dtype]
    for got_x, got_off in (atomic, determ[0]):
        torch.testing.assert_close(got_x.float(), exp_x, **tol)
        if with_offset:
            torch.testing.assert_close(got_off, exp_off, **tol)
        else:
            assert got_off.numel() == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_non_finite_cells_and_hostile_offsets():
    """A NaN cell and an inf cell: the same non-finite outputs and NaN offset gradients as the reference; bins
    moved far off the map (offsets 1e30 overflow float32) are 0 with no gradient."""
    T = _kernels()
    x, rois, offset = _triton_case(torch.float32, False, seed=18)
    x[0, 1, 3, 4] = math.nan
    x[1, 2, 5, 9] = math.inf
    offset[3] = 1e30
    offset[6, :, 1, 2] = -1e6
    for sampling_ratio in (0, 2):
        args = (0.25, 3, 5, sampling_ratio, 0.1)
        out = T.deform_roi_pool_forward(x, rois, offset, *args)
        expected = ref.deform_roi_pool_forward(x, rois, offset, *args)
        torch.testing.assert_close(out, expected, equal_nan=True, atol=1e-5, rtol=1e-5)
        assert not out[3].any() and not out[6, :, 1, 2].any()
        grad = torch.ones_like(out)
        exp_x, exp_off = ref.deform_roi_pool_backward(grad, x, rois, offset, *args, True)
        for det in (False, True):
            got_x, got_off = T.deform_roi_pool_backward(grad, x, rois, offset, *args, True, det)
            torch.testing.assert_close(got_x, exp_x, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got_off, exp_off, equal_nan=True, atol=1e-4, rtol=1e-4)
        assert exp_off.isnan().any() and not exp_off[3].any()
