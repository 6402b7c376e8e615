"""roi_align_rotated's interface: half types, boxes as lists, empty maps, bad input as ValueError; torch.library
(opcheck, torch.compile, autocast, deterministic backward, fx); the Triton kernels under the interpreter against
the plain-PyTorch reference."""
from __future__ import annotations

import naive
import pytest
import torch
import torch.fx
from _helpers import assert_compiled_matches_eager, random_rotated_rois, triton_module

from roikit.ops import RoIAlignRotated, deterministic_backward, roi_align_rotated


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
    expected, _ = naive.roi_align_rotated(x.double(), neg, (3, 3), 1.0, 2, aligned=False)
    torch.testing.assert_close(roi_align_rotated(x.double(), neg, 3, 1.0, 2, aligned=False), expected)


# ---------------------------------------------------------------- torch.library: opcheck, compile, autocast, fx
def test_opcheck_and_compile_fullgraph():
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = random_rotated_rois(5, 2, (10, 12), 0.5, seed=9)
    for args in ((0.5, 3, 2, 2, True, False, False), (0.5, 2, 3, -1, False, True, True)):
        torch.library.opcheck(torch.ops.roikit.roi_align_rotated.default, (x, rois, *args))

    def f(t):
        return roi_align_rotated(t, rois, 3, 0.5, 2)

    assert_compiled_matches_eager(f, x)


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


# ---------------------------------------------------------------- the Triton kernels, under the interpreter
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

    kernels = triton_module("roi_align_rotated")
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
    kernels = triton_module("roi_align_rotated")
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
