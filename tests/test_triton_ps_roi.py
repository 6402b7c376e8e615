"""The position-sensitive Triton kernels (``roikit.ops.triton.ps_roi``), run on the CPU by Triton's interpreter,
against the plain-PyTorch reference (``roikit.ops.pytorch.ps_roi``, itself checked against torchvision in
``test_ps_roi.py``) and against torchvision directly.

Outputs and gradients (atomic and deterministic backward), float32 to 1e-5, float16 / bfloat16 to their precision,
contiguous and channels-last maps, odd shapes (C' = 3, a 3 x 2 grid, a 7 x 13 map), boxes inside, partly and wholly
outside the map, zero-size and reversed, no boxes, hostile boxes under a time limit, and the CUDA registration.
"""
import pytest
import torch
from triton_cases import PH, PS, PW, SCALE, close, compile_for_sm90, time_limit
from triton_cases import make_rois as make_roi_cases

from roikit.ops.pytorch import ps_roi as ref

# log2(0) of degenerate boxes is computed in numpy by the interpreter, which warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

C_OUT = 3  # P = 6 bins: input channels C' * 6
SHAPE = (2, C_OUT * PH * PW, 7, 13)


def make_input(dtype=torch.float32, channels_last=False, seed=0):
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_rois(dtype=torch.float32):
    """triton_cases' boxes and one more: most of the map, up to the last row and column (PSRoIPool never reads
    them)."""
    most = torch.tensor([[1, 2.0, 2.0, 50.0, 26.0]], dtype=torch.float64)
    return torch.cat([make_roi_cases(torch.float64), most]).to(dtype)


# ---------------------------------------------------------------- ps_roi_align
@pytest.mark.parametrize("sampling_ratio", [2, 1, -1])
def test_ps_roi_align_float32(sampling_ratio):
    x, rois = make_input(), make_rois()
    out = PS.ps_roi_align_forward(x, rois, SCALE, PH, PW, sampling_ratio)
    expected = ref.ps_roi_align_forward(x, rois, SCALE, PH, PW, sampling_ratio)
    assert out.shape == (8, C_OUT, PH, PW)
    close(out, expected, torch.float32, "output")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    want = ref.ps_roi_align_backward(grad, rois, SCALE, PH, PW, sampling_ratio, *SHAPE)
    for det in (False, True):
        got = PS.ps_roi_align_backward(grad, rois, SCALE, PH, PW, sampling_ratio, *SHAPE, det)
        close(got, want, torch.float32, f"gradient, deterministic={det}")


def test_ps_roi_align_matches_torchvision():
    """Outputs and gradients against torchvision's ps_roi_align itself (not only the reference), on the boxes where
    torchvision's adaptive grid is not empty (it divides 0 by 0 there; roikit gives 0)."""
    torchvision = pytest.importorskip("torchvision")
    x, rois = make_input(), make_rois()[[0, 1, 4, 5, 6, 7]]
    xt = x.clone().requires_grad_()
    expected = torchvision.ops.ps_roi_align(xt, rois, (PH, PW), SCALE, -1)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    expected.backward(grad)
    out = PS.ps_roi_align_forward(x, rois, SCALE, PH, PW, -1)
    close(out, expected.detach(), torch.float32, "output vs torchvision")
    for det in (False, True):
        got = PS.ps_roi_align_backward(grad, rois, SCALE, PH, PW, -1, *SHAPE, det)
        close(got, xt.grad, torch.float32, f"gradient vs torchvision, deterministic={det}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ps_roi_align_half(dtype, channels_last):
    x, rois = make_input(dtype, channels_last), make_rois(dtype)
    out = PS.ps_roi_align_forward(x, rois, SCALE, PH, PW, 2)
    assert out.dtype == dtype
    close(out, ref.ps_roi_align_forward(x, rois, SCALE, PH, PW, 2), dtype, "output")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = ref.ps_roi_align_backward(grad, rois, SCALE, PH, PW, 2, *SHAPE)
    for det in (False, True):
        got = PS.ps_roi_align_backward(grad, rois, SCALE, PH, PW, 2, *SHAPE, det)
        assert got.dtype == dtype
        close(got, want, dtype, f"gradient, deterministic={det}")


def test_ps_roi_align_channels_last_float32():
    x, rois = make_input(channels_last=True), make_rois()
    close(PS.ps_roi_align_forward(x, rois, SCALE, PH, PW, -1), ref.ps_roi_align_forward(x, rois, SCALE, PH, PW, -1),
          torch.float32, "channels-last output")


def test_ps_roi_align_deterministic_bits_and_chunks(monkeypatch):
    rois = make_rois()
    grad = torch.randn(8, C_OUT, PH, PW, generator=torch.Generator().manual_seed(4))
    args = (grad, rois, SCALE, PH, PW, -1, *SHAPE, True)
    first = PS.ps_roi_align_backward(*args)
    assert torch.equal(first, PS.ps_roi_align_backward(*args))
    monkeypatch.setattr(PS, "MAX_ENTRIES", 64)  # a few sample slots per launch: launches accumulate in order
    close(PS.ps_roi_align_backward(*args), first, torch.float32, "chunked")


# ---------------------------------------------------------------- ps_roi_pool
def test_ps_roi_pool_float32():
    x, rois = make_input(), make_rois()
    out = PS.ps_roi_pool_forward(x, rois, SCALE, PH, PW)
    close(out, ref.ps_roi_pool_forward(x, rois, SCALE, PH, PW), torch.float32, "output")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    want = ref.ps_roi_pool_backward(grad, rois, SCALE, PH, PW, *SHAPE)
    for det in (False, True):
        got = PS.ps_roi_pool_backward(grad, rois, SCALE, PH, PW, *SHAPE, det)
        close(got, want, torch.float32, f"gradient, deterministic={det}")


def test_ps_roi_pool_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    x, rois = make_input(), make_rois()
    close(PS.ps_roi_pool_forward(x, rois, SCALE, PH, PW), torchvision.ops.ps_roi_pool(x, rois, (PH, PW), SCALE),
          torch.float32, "vs torchvision")


def test_ps_roi_pool_by_hand():
    """arange(64) as 4 channels of 4 x 4, box (0, 0, 4, 4) into 2 x 2 (the hand-worked case of test_ps_roi.py):
    2.5, 20, 40.5, 58; the gradient of bin (0, 0) spreads 1 / 4 over cells (0..1, 0..1) of channel 0."""
    x = torch.arange(64, dtype=torch.float32).reshape(1, 4, 4, 4)
    rois = torch.tensor([[0.0, 0, 0, 4, 4]])
    assert PS.ps_roi_pool_forward(x, rois, 1.0, 2, 2).tolist() == [[[[2.5, 20.0], [40.5, 58.0]]]]
    grad = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    for det in (False, True):
        g = PS.ps_roi_pool_backward(grad, rois, 1.0, 2, 2, 1, 4, 4, 4, det)
        expected = torch.zeros(1, 4, 4, 4)
        expected[0, 0, :2, :2] = 0.25
        assert torch.equal(g, expected)


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.float16, False),
                                                 (torch.bfloat16, True)])
def test_ps_roi_pool_dtypes_layouts(dtype, channels_last, monkeypatch):
    x, rois = make_input(dtype, channels_last), make_rois(dtype)
    out = PS.ps_roi_pool_forward(x, rois, SCALE, PH, PW)
    assert out.dtype == dtype
    close(out, ref.ps_roi_pool_forward(x, rois, SCALE, PH, PW), dtype, "output")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    want = ref.ps_roi_pool_backward(grad, rois, SCALE, PH, PW, *SHAPE)
    close(PS.ps_roi_pool_backward(grad, rois, SCALE, PH, PW, *SHAPE, False), want, dtype, "atomic gradient")
    det = PS.ps_roi_pool_backward(grad, rois, SCALE, PH, PW, *SHAPE, True)
    close(det, want, dtype, "deterministic gradient")
    monkeypatch.setattr(PS, "MAX_ENTRIES", 16)  # several launches, one box split over several
    assert torch.equal(PS.ps_roi_pool_backward(grad, rois, SCALE, PH, PW, *SHAPE, True), det)


# ---------------------------------------------------------------- edge cases and hostile boxes
def test_no_boxes_and_empty_output_channels():
    x, rois = make_input(), make_rois()[:0]
    grad = torch.zeros(0, C_OUT, PH, PW)
    for det in (False, True):
        assert not PS.ps_roi_align_backward(grad, rois, SCALE, PH, PW, 2, *SHAPE, det).any()
        assert not PS.ps_roi_pool_backward(grad, rois, SCALE, PH, PW, *SHAPE, det).any()
    assert PS.ps_roi_align_forward(x, rois, SCALE, PH, PW, 2).shape == (0, C_OUT, PH, PW)
    assert PS.ps_roi_pool_forward(x, rois, SCALE, PH, PW).shape == (0, C_OUT, PH, PW)
    x0 = torch.zeros(2, 0, 7, 13)  # C' = 0
    assert PS.ps_roi_align_forward(x0, make_rois(), SCALE, PH, PW, 2).shape == (8, 0, PH, PW)
    assert PS.ps_roi_pool_forward(x0, make_rois(), SCALE, PH, PW).shape == (8, 0, PH, PW)


def test_one_by_one_map():
    """A 1 x 1 map (sizes equal to 1 are specialized by Triton): every bin of PSRoIPool is empty (clipped to
    [0, 0]), PSRoIAlign's samples all clamp to the one cell."""
    x = torch.randn(1, 6, 1, 1, generator=torch.Generator().manual_seed(7))
    rois = torch.tensor([[0, 0.0, 0, 1, 1], [0, -3.0, -2, 4, 5]])
    close(PS.ps_roi_align_forward(x, rois, 1.0, PH, PW, 2), ref.ps_roi_align_forward(x, rois, 1.0, PH, PW, 2),
          torch.float32, "align")
    close(PS.ps_roi_pool_forward(x, rois, 1.0, PH, PW), ref.ps_roi_pool_forward(x, rois, 1.0, PH, PW),
          torch.float32, "pool")
    grad = torch.ones(2, 1, PH, PW)
    for det in (False, True):
        close(PS.ps_roi_align_backward(grad, rois, 1.0, PH, PW, 2, 1, 6, 1, 1, det),
              ref.ps_roi_align_backward(grad, rois, 1.0, PH, PW, 2, 1, 6, 1, 1), torch.float32, "align gradient")


def test_non_finite_cells_stay_where_read():
    """An output is NaN or infinite only if a tap (PSRoIAlign, also a weight-0 one) or a cell (PSRoIPool) it reads
    is: the reference's rule, bin by bin."""
    x = make_input()
    x[0, 0, 1, 1] = float("nan")  # channel 0: bin (0, 0) of output channel 0
    x[0, 7, 3, 4] = float("inf")  # channel 7: bin (0, 1) of output channel 1
    x[1, 14, 2, 2] = float("-inf")  # channel 14: bin (1, 0) of output channel 2
    rois = make_rois()
    for out, want in ((PS.ps_roi_align_forward(x, rois, SCALE, PH, PW, 2),
                       ref.ps_roi_align_forward(x, rois, SCALE, PH, PW, 2)),
                      (PS.ps_roi_pool_forward(x, rois, SCALE, PH, PW), ref.ps_roi_pool_forward(x, rois, SCALE, PH, PW))):
        assert torch.equal(torch.isnan(out), torch.isnan(want))
        assert torch.equal(torch.isposinf(out), torch.isposinf(want))
        assert torch.equal(torch.isneginf(out), torch.isneginf(want))
        assert not out.isfinite().all() and out.isfinite().any()
        finite = want.isfinite()
        close(out[finite], want[finite], torch.float32, "finite outputs")


@pytest.mark.parametrize("box,sampling_ratio", [([0, 0, 0, 1e4, 1e4], -1), ([0, -1e30, -1e30, 1e30, 1e30], 1000),
                                                ([0, -3e4, -50, 1e4, 3e4], 1000)],
                         ids=["10k_px", "1e30_px_sr1000", "sr1000"])
def test_work_bounded_by_the_map(box, sampling_ratio, monkeypatch):
    """A 10,000 px box with adaptive sampling has 1429 samples per bin and axis, a 1e30 px one 1000: only the ones
    on the 10 x 10 map are read and given entries (before bounding, minutes to hours in the interpreter)."""
    x = torch.randn(1, 2 * 9, 10, 10, generator=torch.Generator().manual_seed(8))
    rois = torch.tensor([box])
    launches = []

    def spy(out, keys, *args, **kwargs):
        launches.append(keys.numel())
        return gather(out, keys, *args, **kwargs)

    gather = PS.gather_bins
    monkeypatch.setattr(PS, "gather_bins", spy)
    grad = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(9))
    with time_limit(60):
        out = PS.ps_roi_align_forward(x, rois, 1.0, 3, 3, sampling_ratio)
        got = [PS.ps_roi_align_backward(grad, rois, 1.0, 3, 3, sampling_ratio, 1, 18, 10, 10, det)
               for det in (False, True)]
        pooled = PS.ps_roi_pool_forward(x, rois, 1.0, 3, 3)
        pool_grads = [PS.ps_roi_pool_backward(grad, rois, 1.0, 3, 3, 1, 18, 10, 10, det) for det in (False, True)]
    close(out, ref.ps_roi_align_forward(x, rois, 1.0, 3, 3, sampling_ratio), torch.float32, "align")
    want = ref.ps_roi_align_backward(grad, rois, 1.0, 3, 3, sampling_ratio, 1, 18, 10, 10)
    for g in got:
        close(g, want, torch.float32, "align gradient")
    close(pooled, ref.ps_roi_pool_forward(x, rois, 1.0, 3, 3), torch.float32, "pool")
    want = ref.ps_roi_pool_backward(grad, rois, 1.0, 3, 3, 1, 18, 10, 10)
    for g in pool_grads:
        close(g, want, torch.float32, "pool gradient")
    # RoIAlign's entries: at most about 2 H + 6 samples a bin and axis on the map, 4 taps each; PSRoIPool's: the map
    assert sum(launches[:-1]) <= 4 * 9 * (2 * 10 + 6) ** 2 and launches[-1] <= 9 * 9 * 9


# ---------------------------------------------------------------- registration
def test_cuda_kernels_registered():
    import roikit.ops  # noqa: F401

    for op in ("ps_roi_align", "ps_roi_align_backward", "ps_roi_pool", "ps_roi_pool_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"roikit::{op}", "CUDA"), op


# ---------------------------------------------------------------- compiled for a GPU, without one
# The interpreter does not run Triton's compiler (typing, constexpr specialization of ints equal to 1): every kernel
# the launchers start is compiled for sm_90 instead of launched (triton_cases.compile_for_sm90). This also compiles
# the kernel of roi_align(box_grad=True) (roikit.ops.triton.roi_align_box_grad, tested in
# test_roi_align_box_grad.py), written with these: one compile run for both.
LAUNCHES = r'''
from roikit.ops.triton import ps_roi as PS
from roikit.ops.triton import roi_align_box_grad as BG

rois = torch.tensor([[0, 1.0, 1.5, 30.3, 20.2], [1, 0, 0, 52, 28]])
for x in (torch.randn(2, 18, 7, 13), torch.randn(2, 9, 1, 1).bfloat16()):  # the second: C' = H = W = 1
    n, c, h, w = x.shape
    out = PS.ps_roi_align_forward(x, rois, 0.25, 3, 3, -1)
    pooled = PS.ps_roi_pool_forward(x.contiguous(memory_format=torch.channels_last), rois.half(), 0.25, 3, 3)
    for det in (False, True):
        PS.ps_roi_align_backward(out, rois, 0.25, 3, 3, 2, n, c, h, w, det)
        PS.ps_roi_pool_backward(pooled, rois, 0.25, 3, 3, n, c, h, w, det)
    for aligned, pool_max in ((False, False), (True, True)):
        arg = torch.zeros((2, c, 7, 7), dtype=torch.int64)
        out = torch.zeros((2, c, 7, 7), dtype=x.dtype)
        BG.roi_align_box_backward(out, x, rois, out, arg, 0.25, 7, 7, -1, aligned, pool_max)
'''


def test_kernels_compile_for_sm90():
    compile_for_sm90(LAUNCHES)
