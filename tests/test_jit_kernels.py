"""The numba CPU path (roikit/ops/pytorch/jit.py) against torchvision bit for bit, and against the plain path.

Both ways a kernel reads the map are run (per-box copies of the cells a box reads, and channels-last blocks of the
whole map), with more channels than one block, on contiguous and channels-last maps; ties, -inf and NaN cells for
RoIPool. torchvision's CPU kernels are the oracle (the same sums in the same order: equal bits); the plain path
(matrix products, shares no kernel code) must agree to rounding.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from roikit.ops import roi_align, roi_pool
from roikit.ops.pytorch import jit

pytestmark = pytest.mark.skipif(not jit.enabled(), reason="numba is not installed (the plain path runs)")

C = 2 * jit.CHANNEL_BLOCK + 3  # two full channel blocks and a remainder


@pytest.fixture(params=["per_box", "channels_last"])
def read_path(request, monkeypatch):
    """Force one of the two ways the forward kernels read the map."""
    monkeypatch.setattr(jit, "_use_channels_last", lambda cells, input: request.param == "channels_last")
    return request.param


def _map(dtype, seed=0, layout="contiguous"):
    x = torch.randn(2, C, 13, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (2, True), (0, False), (3, True), (1, False)])
def test_roi_align_equals_torchvision_bit_for_bit(read_path, dtype, sampling_ratio, aligned, make_rois):
    # torchvision's CPU kernel crashes on reversed boxes with aligned=True and adaptive sampling: none drawn there
    rois = make_rois(k=40, dtype=dtype, reversed_boxes=not (aligned and sampling_ratio <= 0))
    for layout in ("contiguous", "channels_last"):
        x = _map(dtype, layout=layout)
        xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = torchvision.ops.roi_align(xt, rois, (5, 4), 0.5, sampling_ratio, aligned)
        out = roi_align(xr, rois, (5, 4), 0.5, sampling_ratio, aligned)
        assert torch.equal(out, expected), f"forward, {layout}: max diff {(out - expected).abs().max():.3g}"
        grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
        expected.backward(grad)
        out.backward(grad)
        assert torch.equal(xr.grad, xt.grad), f"backward, {layout}: max diff {(xr.grad - xt.grad).abs().max():.3g}"


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roi_align_agrees_with_the_plain_path(read_path, sampling_ratio, make_rois):
    rois = make_rois(k=30, dtype=torch.float32)
    x = _map(torch.float32, seed=3)
    xj, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = roi_align(xj, rois, 7, 0.5, sampling_ratio, True)
    with jit.disabled():
        assert jit.roi_align_forward(x, rois, 0.5, 7, 7, sampling_ratio, True) is None  # really the plain path
        ref = roi_align(xp, rois, 7, 0.5, sampling_ratio, True)
        ref.backward(torch.ones_like(ref))
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xj.grad, xp.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_roi_align_bfloat16_is_torchvision_in_float32_rounded(read_path, layout, make_rois):
    # the kernels read a bfloat16 map as its bits (a channels-last one as contiguous bfloat16 chunks) and widen
    rois = make_rois(k=20, dtype=torch.float32)
    x = _map(torch.bfloat16, layout=layout)
    expected = torchvision.ops.roi_align(x.float(), rois, 3, 0.5, 2, True).to(torch.bfloat16)
    assert torch.equal(roi_align(x, rois, 3, 0.5, 2, True), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.5, 1 / 16])
def test_roi_pool_equals_torchvision_bit_for_bit(read_path, dtype, scale, make_rois):
    rois = make_rois(k=40, dtype=dtype, scale=scale)
    x = (2 * _map(torch.float64, seed=5)).round().to(dtype)  # ties: the first cell (row-major) must win
    x[0, 1, 2, 3], x[1, 4, 5, 6], x[0, 0, 0, 0] = float("nan"), float("-inf"), float("inf")
    x[1, C - 1] = torch.finfo(torch.float32).min  # a whole plane at -FLT_MAX: nothing beats the start
    for layout in ("contiguous", "channels_last"):
        xl = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
        expected, expected_arg = torch.ops.torchvision.roi_pool(xl, rois, scale, 5, 4)
        out, arg = torch.ops.roikit.roi_pool(xl, rois, scale, 5, 4, "torchvision")
        torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
        assert torch.equal(arg.long(), expected_arg.long()), layout
    finite = torch.nan_to_num(x, nan=0.0, posinf=7.0, neginf=-7.0)
    xt, xr = finite.clone().requires_grad_(), finite.clone().requires_grad_()
    expected = torchvision.ops.roi_pool(xt, rois, (5, 4), scale)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected.backward(grad)
    roi_pool(xr, rois, (5, 4), scale).backward(grad)
    assert torch.equal(xr.grad, xt.grad)


def test_roi_pool_integer_rounding_agrees_with_the_plain_path(read_path, make_rois):
    rois = make_rois(k=30, dtype=torch.float32)
    x = (2 * _map(torch.float32, seed=6)).round()
    out, arg = torch.ops.roikit.roi_pool(x, rois, 0.5, 7, 7, "integer")
    with jit.disabled():
        ref, ref_arg = torch.ops.roikit.roi_pool(x, rois, 0.5, 7, 7, "integer")
    assert torch.equal(out, ref) and torch.equal(arg, ref_arg)


def test_roi_pool_bfloat16_is_torchvision_in_float32(make_rois):
    rois = make_rois(k=20, dtype=torch.float32)
    x = _map(torch.bfloat16)
    assert torch.equal(roi_pool(x, rois, 3, 0.5), torchvision.ops.roi_pool(x.float(), rois, 3, 0.5).bfloat16())


def test_same_bits_on_one_and_two_threads(make_rois):
    rois = make_rois(k=64, dtype=torch.float32)
    x = _map(torch.float32, seed=7).requires_grad_()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x.grad = None
            out = roi_align(x, rois, 7, 0.5, 2, True)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), x.grad.clone(), roi_pool(x.detach(), rois, 7, 0.5)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_declines_what_it_does_not_take():
    x = torch.randn(1, jit.MIN_CHANNELS, 8, 8)
    assert jit.roi_align_forward(x[:, :1], torch.tensor([[0.0, 1, 1, 5, 5]]), 1.0, 7, 7, 2, True) is None
    many = torch.tensor([[0.0, 0.0, 0.0, 8.0 * (jit.MAX_SAMPLES + 1) * 7, 8.0]])  # adaptive: 65+ samples per bin
    assert jit.roi_align_forward(x, many, 1.0, 7, 7, -1, True) is None
    assert jit.roi_align_forward(x, many, 1.0, 7, 7, 2, True) is not None
    with jit.disabled():
        assert not jit.enabled() and jit.roi_pool_forward(x, many, 1.0, 7, 7, "torchvision") is None
    assert jit.enabled()


def test_roi_pool_bfloat16_gradient_is_torchvision_in_float32(make_rois):
    # distinct values: no ties, so each bin's cell is the same in bfloat16 and float32; every sum rounded once
    rois = make_rois(k=20, dtype=torch.float32)
    x = torch.randperm(2 * C * 13 * 17, generator=torch.Generator().manual_seed(3)).reshape(2, C, 13, 17)
    x = (x.to(torch.float32) / 64).bfloat16()
    grad = torch.randn(20, C, 3, 3, generator=torch.Generator().manual_seed(4)).bfloat16()
    xt, xr = x.float().requires_grad_(), x.clone().requires_grad_()
    torchvision.ops.roi_pool(xt, rois, 3, 0.5).backward(grad.float())
    roi_pool(xr, rois, 3, 0.5).backward(grad)
    assert torch.equal(xr.grad, xt.grad.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (2, True), (0, False), (-1, True), (3, False)])
def test_roi_align_tables_are_the_plain_paths_geometry(dtype, sampling_ratio, aligned, make_rois):
    """The numba tables (jit._align_parts) against geometry.sampling_grid + jit._axis_table (torch ops, the plain
    path's arithmetic) on boxes inside, across and outside the map, zero-size, reversed and huge, bit for bit."""
    from roikit.ops.geometry import sampling_grid

    rois = make_rois(k=40, dtype=dtype, reversed_boxes=not aligned)
    huge = torch.tensor([[1, -1e30, 2.5, 1e30, 7.25], [0, 3.3, -7.1, 3.3, 1e20], [1, 0.1, 0.2, 0.30000001, 0.4]])
    rois = torch.cat([rois, huge.to(dtype)])
    (y1, bin_h, gh), (x1, bin_w, gw) = sampling_grid(rois, 0.3, (5, 4), sampling_ratio, aligned)
    taken = (torch.minimum(gh, gw) >= 0) & (torch.maximum(gh, gw) <= jit.MAX_SAMPLES)
    if sampling_ratio <= 0:
        assert not taken.all()  # the huge boxes ask for more than MAX_SAMPLES: the whole call is declined
        with pytest.raises(jit._Declined):
            list(jit._align_parts(rois, 0.3, (5, 4), sampling_ratio, aligned, 13, 17))
    rois, y1, bin_h, gh, x1, bin_w, gw = (t[taken] for t in (rois, y1, bin_h, gh, x1, bin_w, gw))
    (sl, batch, y, x, count, cells), = jit._align_parts(rois, 0.3, (5, 4), sampling_ratio, aligned, 13, 17)
    expected_y = jit._axis_table(y1, bin_h, gh, 5, max(int(gh.max()), 1), 13)
    expected_x = jit._axis_table(x1, bin_w, gw, 4, max(int(gw.max()), 1), 17)
    for got, want in zip((*y, *x), (*expected_y, *expected_x)):
        assert got.dtype == want.numpy().dtype and (got == want.numpy()).all()
    assert (batch == rois[:, 0].long().numpy()).all() and (count == (gh * gw).numpy()).all()

    def copied(low, high, valid):  # the span of a box's valid taps along an axis, at most two cells per sample
        first = torch.where(valid, low, 2**31 - 1).flatten(1).amin(dim=1).long()
        last = torch.where(valid, high, -1).flatten(1).amax(dim=1).long()
        return torch.minimum((last - first + 1).clamp(min=0), torch.tensor(2 * low[0].numel()))

    assert cells == int((copied(*expected_y[:2], expected_y[4]) * copied(*expected_x[:2], expected_x[4])).sum())


@pytest.mark.parametrize("slices", ["one", "several"])
def test_roi_align_bfloat16_gradient_is_torchvision_in_float32_rounded(slices, monkeypatch, make_rois):
    # one slice of boxes: each block of channels is added up in float32 planes and rounded once into the bfloat16
    # map; several slices (tables held a slice at a time): a float32 map of every channel, rounded at the end
    if slices == "several":
        monkeypatch.setattr(jit, "CHUNK_BUDGET", 200)  # 4 boxes' tables per slice
    rois = make_rois(k=20, dtype=torch.float32)
    x = _map(torch.bfloat16)
    grad = torch.randn(20, C, 3, 3, generator=torch.Generator().manual_seed(4)).bfloat16()
    xt = x.float().requires_grad_()
    torchvision.ops.roi_align(xt, rois, 3, 0.5, 2, True).backward(grad.float())
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xr = x.clone().requires_grad_()
            roi_align(xr, rois, 3, 0.5, 2, True).backward(grad)
            assert xr.grad.dtype == torch.bfloat16 and torch.equal(xr.grad, xt.grad.bfloat16()), threads
    finally:
        torch.set_num_threads(before)
