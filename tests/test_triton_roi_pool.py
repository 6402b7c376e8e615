"""The RoIPool and RoISPP Triton kernels (``roikit.ops.triton.roi_pool``), run on the CPU by Triton's interpreter,
against the plain-PyTorch reference and torchvision: outputs, argmax and gradients (atomic and deterministic backward)
in every dtype, contiguous and channels-last maps, huge coordinates. Shared inputs and helpers: ``triton_cases.py``.
"""
import pytest
import torch
from triton_cases import PH, PW, RP, SCALE, close, make_input, make_rois, small_map, time_limit

import roikit.ops
from roikit.ops.pytorch import roi_pool as ref_pool

# log2(0) and sqrt(-1) of degenerate boxes are computed in numpy by the interpreter, which warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------- roi_pool and roi_spp
@pytest.mark.parametrize("rounding", ["torchvision", "integer"])
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                  (torch.float16, True), (torch.bfloat16, False)])
def test_roi_pool(rounding, dtype, channels_last):
    x, rois = make_input(dtype, channels_last), make_rois(dtype)
    out_ref, arg_ref = ref_pool.roi_pool_forward(x, rois, SCALE, PH, PW, rounding)
    out, arg = RP.roi_pool_forward(x, rois, SCALE, PH, PW, rounding)
    assert torch.equal(out, out_ref) and torch.equal(arg, arg_ref)  # a max is exact in any dtype
    grad = torch.randn(out.shape).to(dtype)
    expected = ref_pool.roi_pool_backward(grad, rois, arg_ref, 2, 3, 7, 13)
    for det in (False, True):
        got = RP.roi_pool_backward(grad, rois, arg, 2, 3, 7, 13, det)
        close(got, expected, dtype, f"gradient, deterministic={det}")


def test_roi_pool_matches_torchvision_and_deterministic_chunks(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    x, rois = make_input(), make_rois()
    out, arg = RP.roi_pool_forward(x, rois, SCALE, PH, PW, "torchvision")
    assert torch.equal(out, torchvision.ops.roi_pool(x, rois, (PH, PW), SCALE))
    grad = torch.randn_like(out)
    first = RP.roi_pool_backward(grad, rois, arg, 2, 3, 7, 13, True)
    monkeypatch.setattr(RP, "MAX_ENTRIES", 8)
    assert torch.equal(RP.roi_pool_backward(grad, rois, arg, 2, 3, 7, 13, True), first)


def test_roi_spp():
    x, rois = make_input(), make_rois()
    for rounding in ("torchvision", "integer"):
        expected = roikit.ops.roi_spp(x, rois, (1, 2, 3), SCALE, rounding)
        assert torch.equal(RP.roi_spp_forward(x, rois, (1, 2, 3), SCALE, rounding), expected)


@pytest.mark.parametrize("rounding", ["torchvision", "integer"])
def test_roi_pool_huge_coordinates(rounding):
    """Coordinates in cells clamped to +-2^52 before they become integers (they overflowed int64), bins clipped to
    the map: the reference's bins, values and argmax."""
    x = small_map(seed=7)
    rois = torch.tensor([[0, 0, 0, 1e30, 1e30], [0, -1e30, -1e30, 5, 5], [0, -1e30, 3, 1e30, 1e20],
                         [0, 1e4, 1e4, 2e4, 2e4], [0, -2e4, -3e4, 1e4, 8]])
    with time_limit(60):
        out, arg = RP.roi_pool_forward(x, rois, 0.5, 3, 3, rounding)
    out_ref, arg_ref = ref_pool.roi_pool_forward(x, rois, 0.5, 3, 3, rounding)
    assert torch.equal(out, out_ref) and torch.equal(arg, arg_ref)
