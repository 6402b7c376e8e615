"""The RoIAlign Triton kernels (``roikit.ops.triton.roi_align``), run on the CPU by Triton's interpreter, against the
plain-PyTorch reference and torchvision: outputs and gradients (atomic and deterministic backward), float32 to 1e-5,
float16 / bfloat16 to their precision, contiguous and channels-last maps; hostile boxes (work bounded by the map,
under a time limit), the max rule, non-finite cells. Shared inputs and helpers: ``triton_cases.py``.
"""
import pytest
import torch
from triton_cases import (
    NON_FINITE_ROIS,
    PH,
    PW,
    RA,
    SCALE,
    assert_same_non_finite,
    close,
    make_input,
    make_rois,
    non_finite_map,
    small_map,
    time_limit,
)

from roikit.ops.pytorch import roi_align as ref_align

# log2(0) and sqrt(-1) of degenerate boxes are computed in numpy by the interpreter, which warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------- roi_align
@pytest.mark.parametrize("pool_max", [False, True], ids=["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roi_align_float32(pool_max, aligned, sampling_ratio):
    x, rois = make_input(), make_rois()
    settings = (SCALE, PH, PW, sampling_ratio, aligned, pool_max)
    out_ref, arg_ref = ref_align.roi_align_forward(x, rois, *settings)
    out, arg = RA.roi_align_forward(x, rois, *settings)
    close(out, out_ref, torch.float32, "output")
    if pool_max:
        assert torch.equal(arg, arg_ref)
    grad = torch.randn_like(out_ref)
    shape = (2, 3, 7, 13)
    expected = ref_align.roi_align_backward(grad, rois, arg_ref, SCALE, PH, PW, *shape, sampling_ratio, aligned,
                                            pool_max)
    for det in (False, True):
        got = RA.roi_align_backward(grad, rois, arg, SCALE, PH, PW, *shape, sampling_ratio, aligned, pool_max, det)
        close(got, expected, torch.float32, f"gradient, deterministic={det}")


def test_roi_align_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    x, rois = make_input(), make_rois()
    out, _ = RA.roi_align_forward(x, rois, SCALE, PH, PW, 2, True, False)
    close(out, torchvision.ops.roi_align(x, rois, (PH, PW), SCALE, 2, True), torch.float32, "vs torchvision")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool_max", [False, True], ids=["avg", "max"])
def test_roi_align_half_channels_last(dtype, pool_max):
    x, rois = make_input(dtype, channels_last=True), make_rois(dtype)
    settings = (SCALE, PH, PW, 2, True, pool_max)
    out_ref, arg_ref = ref_align.roi_align_forward(x, rois, *settings)
    out, arg = RA.roi_align_forward(x, rois, *settings)
    assert out.dtype == dtype
    close(out, out_ref, dtype, "output")
    grad = torch.randn(out.shape).to(dtype)
    expected = ref_align.roi_align_backward(grad, rois, arg_ref, SCALE, PH, PW, 2, 3, 7, 13, 2, True, pool_max)
    for det in (False, True):
        got = RA.roi_align_backward(grad, rois, arg, SCALE, PH, PW, 2, 3, 7, 13, 2, True, pool_max, det)
        assert got.dtype == dtype
        close(got, expected, dtype, f"gradient, deterministic={det}")


@pytest.mark.parametrize("pool_max", [False, True], ids=["avg", "max"])
def test_roi_align_deterministic_is_bitwise_and_chunked(monkeypatch, pool_max):
    x, rois = make_input(), make_rois()
    out, arg = RA.roi_align_forward(x, rois, SCALE, PH, PW, -1, False, pool_max)
    grad = torch.randn_like(out)
    args = (grad, rois, arg, SCALE, PH, PW, 2, 3, 7, 13, -1, False, pool_max, True)
    first = RA.roi_align_backward(*args)
    assert torch.equal(first, RA.roi_align_backward(*args))
    monkeypatch.setattr(RA, "MAX_ENTRIES", 64)  # one box per chunk: the chunks accumulate in order
    chunked = RA.roi_align_backward(*args)
    close(chunked, first, torch.float32, "chunked")



# ---------------------------------------------------------------- hostile inputs: bounded work, max rule, precision
# Each compares the kernels with the reference on the same inputs. The work tests run under a time limit: before the
# kernels were bounded by the map, these boxes looped over every sample of the box (a 10,000 px box: 1429^2 samples
# a bin, hours in the interpreter) or overflowed an int32 cast.
HOSTILE_ALIGN = [  # (box in px on a 10 x 10 map at scale 1, sampling_ratio)
    ([0, 0, 0, 1e4, 1e4], -1),  # 10,000 px, adaptive: 1429 samples a bin and axis, about 11 on the map
    ([0, 0, 0, 1e30, 1e30], -1),  # ceil(bin) overflowed int32; clamped to 2^52 cells, MAX_GRID samples
    ([0, -1e30, -1e30, 1e30, 1e30], 1000),  # the deterministic backward sized 4 P 1000^2 entries for it
    ([0, -3e4, -50, 1e4, 3e4], 1000),  # a few of 1000 samples on the map, the others skipped
    ([0, -6, 2.5, 4, 17], 7),  # ordinary: partly off the map on both sides
]


@pytest.mark.parametrize("pool_max", [False, True], ids=["avg", "max"])
@pytest.mark.parametrize("box,sampling_ratio", HOSTILE_ALIGN, ids=["10k_px", "1e30_px", "sr1000_huge", "sr1000",
                                                                   "ordinary"])
def test_roi_align_work_bounded_by_the_map(box, sampling_ratio, pool_max, monkeypatch):
    x, rois = small_map(), torch.tensor([box])
    settings = (1.0, 7, 7, sampling_ratio, False, pool_max)
    launches = []

    def spy(gin, keys, *args, **kwargs):  # the deterministic backward's entries, launch by launch
        launches.append(keys.numel())
        return gather(gin, keys, *args, **kwargs)

    gather = RA.gather_bins
    monkeypatch.setattr(RA, "gather_bins", spy)
    with time_limit(60):
        out, arg = RA.roi_align_forward(x, rois, *settings)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        got = [RA.roi_align_backward(grad, rois, arg, 1.0, 7, 7, 1, 2, 10, 10, sampling_ratio, False, pool_max, det)
               for det in (False, True)]
    out_ref, arg_ref = ref_align.roi_align_forward(x, rois, *settings)
    close(out, out_ref, torch.float32, "output")
    if pool_max:
        assert torch.equal(arg, arg_ref)
    expected = ref_align.roi_align_backward(grad, rois, arg_ref, 1.0, 7, 7, 1, 2, 10, 10, sampling_ratio, False,
                                            pool_max)
    for det, g in zip((False, True), got):
        close(g, expected, torch.float32, f"gradient, deterministic={det}")
    # entries: a window of the samples on the map (adaptive: at most about 2 H + 6 a bin and axis), never the grid
    assert max(launches, default=0) <= RA.MAX_ENTRIES
    assert sum(launches) <= 4 * 49 * (2 * 10 + 6) ** 2


def test_roi_align_deterministic_splits_a_box_into_launches(monkeypatch):
    """A box with more entries than MAX_ENTRIES is done in several launches (a slot offset), in a fixed order."""
    x, rois = make_input(), make_rois()
    out, arg = RA.roi_align_forward(x, rois, SCALE, PH, PW, 6, True, True)
    grad = torch.randn_like(out)
    args = (grad, rois, arg, SCALE, PH, PW, 2, 3, 7, 13, 6, True, True, True)
    whole = RA.roi_align_backward(*args)
    sizes = []
    gather = RA.gather_bins
    monkeypatch.setattr(RA, "gather_bins", lambda gin, keys, *a, **k: (sizes.append(keys.numel()),
                                                                       gather(gin, keys, *a, **k)))
    monkeypatch.setattr(RA, "MAX_ENTRIES", 4 * 37)  # a box has up to 6 bins x 6 x 6 slots: split in 37s
    split = RA.roi_align_backward(*args)
    assert max(sizes) <= 4 * 37 and len(sizes) > rois.shape[0]
    assert torch.equal(split, RA.roi_align_backward(*args))  # the same bits again
    close(split, whole, torch.float32, "split")
    expected = ref_align.roi_align_backward(grad, rois, arg, SCALE, PH, PW, 2, 3, 7, 13, 6, True, True)
    close(split, expected, torch.float32, "vs reference")


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_max_rule(aligned):
    """0 for a sample off the map, which competes; NaN never wins; the first of equal samples (iy * gw + ix);
    -inf and argmax -1 when nothing beats -inf; 0 and argmax -1 for a bin without samples."""
    g = torch.Generator().manual_seed(2)
    x = -1.0 - torch.rand(1, 2, 6, 6, generator=g)  # all negative: an off-map sample's 0 wins
    x[0, 0, 2, 2] = float("nan")
    x[0, 0, 1:4, 3:5] = -0.25  # equal values: the first sample wins
    x[0, 1] = float("-inf")
    x[0, 1, 4:, 4:] = float("nan")
    rois = torch.tensor([
        [0, -8.0, -8.0, 3.0, 3.0],  # starts off the map: its first invalid sample is sample 0, skipped
        [0, 2.0, 2.0, 12.0, 12.0],  # ends off the map: the first invalid sample is the one past the run
        [0, 1.0, 1.0, 3.5, 3.5],  # over the NaN cell
        [0, 2.5, 0.5, 4.5, 3.5],  # over the equal cells
        [0, 3.0, 3.0, 3.0, 3.0],  # zero size: no sample when aligned (adaptive)
        [0, -1e4, 1.0, 2.0, 1e4],  # huge, partly on the map
    ])
    for sampling_ratio in (3, -1):
        settings = (1.0, 2, 2, sampling_ratio, aligned, True)
        out, arg = RA.roi_align_forward(x, rois, *settings)
        out_ref, arg_ref = ref_align.roi_align_forward(x, rois, *settings)
        torch.testing.assert_close(out, out_ref, equal_nan=True, msg=f"sampling_ratio={sampling_ratio}")
        assert torch.equal(arg, arg_ref), (sampling_ratio, arg, arg_ref)
        assert not out.isnan().any()  # NaN never wins
        assert (out[:, 1] == float("-inf")).any() and (arg[out == float("-inf")] == -1).all()
    if aligned:  # the zero-size box has no sample
        assert not out[4].any() and (arg[4] == -1).all()



@pytest.mark.parametrize("pool_max", [False, True], ids=["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_non_finite_cells(aligned, pool_max):
    """An output is non-finite only if a tap it reads is (0 * inf = NaN on a weight-0 tap): the reference's rule."""
    x = non_finite_map()
    for sampling_ratio in (2, -1):
        settings = (1.0, 2, 3, sampling_ratio, aligned, pool_max)
        out, arg = RA.roi_align_forward(x, NON_FINITE_ROIS, *settings)
        out_ref, arg_ref = ref_align.roi_align_forward(x, NON_FINITE_ROIS, *settings)
        assert_same_non_finite(out, out_ref, f"sampling_ratio={sampling_ratio}")
        if pool_max:
            assert torch.equal(arg, arg_ref)
    assert out.isfinite().any() and not out.isfinite().all()
