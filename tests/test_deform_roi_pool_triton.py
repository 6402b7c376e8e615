"""deform_roi_pool's Triton kernels under Triton's interpreter, against the plain-PyTorch reference: forward, the
feature and offset gradients (atomic and deterministic), non-finite cells and hostile offsets."""
from __future__ import annotations

import math

import pytest
import torch
from _helpers import triton_module

from roikit.ops.pytorch import deform_roi_pool as ref

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
    T = triton_module("deform_roi_pool")
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
    T = triton_module("deform_roi_pool")
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
