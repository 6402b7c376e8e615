"""Non-finite features, single regressions, each worked out by hand (and checked against torchvision or
tests/naive.py where they have the op): which outputs a NaN / +inf / -inf cell reaches in roi_align (also its max
pool and the multilevel forms), prroi_pool and roi_pool.

One intended deviation from torchvision, pinned here (``test_roi_align_off_map_sample_does_not_read_cell_0_0``): its
CPU RoIAlign gives a sample off the map weight 0 at cell (0, 0) and still multiplies (0 * NaN = NaN); roikit's rule:
an output may be non-finite only if a sample it reads (its 4 bilinear taps, even a tap of weight 0) is.
"""
from __future__ import annotations

import math

import naive
import pytest
import torch
import torchvision
from _helpers import assert_same_non_finite_and_close

from roikit.layers import RoIPooler
from roikit.ops import multilevel_roi_align, prroi_pool, roi_align

NAN, INF = float("nan"), float("inf")


# ================================================================================================ regressions
def _ramp_with(bad, cell=(5, 5), size=10):
    x = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size) / 10
    x[0, 0, cell[0], cell[1]] = bad
    return x


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
def test_roi_align_bad_cell_stays_in_the_one_bin_that_samples_it(bad):
    # box (2, 2)-(8, 8), 3 x 3 bins of 2 cells, sampling_ratio 1: the samples sit at x, y in {3, 5, 7}; only sample
    # (5, 5) has a tap on cell (5, 5) (weight 1; its other taps (5, 6), (6, 5), (6, 6) are finite). So bin (1, 1)
    # is bad and the other 8 are finite. (Reported: roikit gave 9 NaN for a NaN cell, 8 NaN + 1 inf for an inf.)
    x = _ramp_with(bad)
    rois = torch.tensor([[0, 2.0, 2.0, 8.0, 8.0]])
    expected = torchvision.ops.roi_align(x, rois, 3, 1.0, 1, False)
    out = roi_align(x, rois, 3, 1.0, 1, False)
    hand = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    hand[0, 0, 1, 1] = True
    assert torch.equal(~torch.isfinite(expected), hand)  # torchvision agrees with the hand count
    assert (int(torch.isnan(out).sum()), int(torch.isinf(out).sum())) == (
        int(torch.isnan(expected).sum()), int(torch.isinf(expected).sum()))
    assert_same_non_finite_and_close(out, expected, 1e-5)


@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "+inf"])
def test_roi_align_tap_of_weight_zero_still_reads_the_cell(bad):
    # box (3, 4)-(5, 6), one bin, one sample at (y, x) = (5, 4) exactly: taps (5, 4) weight 1, (5, 5), (6, 4),
    # (6, 5) weight 0. A tap of weight 0 on a bad cell is read: 0 * inf = NaN, as in torchvision.
    x = _ramp_with(bad)
    rois = torch.tensor([[0, 3.0, 4.0, 5.0, 6.0]])
    expected = torchvision.ops.roi_align(x, rois, 1, 1.0, 1, False)
    assert torch.isnan(expected).all()
    assert torch.isnan(roi_align(x, rois, 1, 1.0, 1, False)).all()


@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "+inf"])
@pytest.mark.parametrize("via", ["multilevel_roi_align", "RoIPooler"])
def test_multilevel_bad_cell_counts_match_multiscale_roi_align(bad, via):
    # the same box and cell on level 0 of a two-level pyramid (10 x 10 at scale 1, 5 x 5 at scale 1/2); the FPN
    # rule sends a 6 px box to the finest level
    fine, coarse = _ramp_with(bad), torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    boxes = [torch.tensor([[2.0, 2.0, 8.0, 8.0]])]
    feats = {"p0": fine, "p1": coarse}
    expected = torchvision.ops.MultiScaleRoIAlign(["p0", "p1"], 3, 1)(feats, boxes, [(10, 10)])
    if via == "multilevel_roi_align":
        out = multilevel_roi_align([fine, coarse], boxes, 3, [1.0, 0.5], 1)
    else:
        out = RoIPooler(["p0", "p1"], 3, 1)(feats, boxes, [(10, 10)])
    assert int((~torch.isfinite(expected)).sum()) == 1
    assert (int(torch.isnan(out).sum()), int(torch.isinf(out).sum())) == (
        int(torch.isnan(expected).sum()), int(torch.isinf(expected).sum()))
    assert_same_non_finite_and_close(out, expected, 1e-5)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_roi_align_off_map_sample_does_not_read_cell_0_0(pool):
    # The intended deviation from torchvision. A 4 x 4 map of ones with NaN at cell (0, 0); box (2, 2)-(6, 3), one
    # bin 4 cells wide and 1 high, 2 x 2 samples at x in {3, 5}, y in {2.25, 2.75}. x = 3 is in the map (clamped to
    # column 3, value 1); x = 5 > W = 4 is off the map (value 0). No sample has a tap on (0, 0), so the average is
    # (1 + 0 + 1 + 0) / 4 = 0.5 and the max is 1. torchvision's kernel reads off-map samples as 0 * input[0, 0]:
    # NaN.
    x = torch.ones(1, 1, 4, 4)
    x[0, 0, 0, 0] = NAN
    rois = torch.tensor([[0, 2.0, 2.0, 6.0, 3.0]])
    if pool == "avg":
        assert torch.isnan(torchvision.ops.roi_align(x, rois, 1, 1.0, 2, False)).all()  # the deviation exists
    out = roi_align(x, rois, 1, 1.0, 2, False, pool=pool)
    assert out.flatten().tolist() == [0.5 if pool == "avg" else 1.0]


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("box", [(2.0, 2.0, 8.0, 8.0), (2.5, 2.5, 8.5, 8.5)], ids=["edges-on-cells", "half-shift"])
def test_prroi_pool_bad_cell_only_where_the_integral_weights_it(bad, box):
    # Which bins weight cell (5, 5): the naive integral of a map that is 1 there and 0 elsewhere. Box (2, 2)-(8, 8)
    # in 3 bins: [2, 4], [4, 6], [6, 8] per axis; the tent of cell 5 spans (4, 6), so only bin (1, 1) weights it.
    # Box (2.5, 2.5)-(8.5, 8.5): bins [2.5, 4.5], [4.5, 6.5], [6.5, 8.5]: bins 0 and 1 per axis, 4 of 9.
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    marker = torch.zeros(1, 1, 10, 10, dtype=torch.float64)
    marker[0, 0, 5, 5] = 1.0
    weighted = naive.prroi_pool(marker, rois, (3, 3), 1.0, False) > 0
    assert int(weighted.sum()) == (1 if box[0] == 2.0 else 4)
    x = _ramp_with(bad).double()
    out = prroi_pool(x, rois, 3, 1.0)
    kind = torch.isnan if math.isnan(bad) else (lambda t: t == bad)
    assert torch.equal(kind(out), weighted), f"non-finite outputs {(~torch.isfinite(out)).nonzero().tolist()}"
    assert torch.equal(torch.isfinite(out), ~weighted)
    zeroed = x.clone()
    zeroed[0, 0, 5, 5] = 0.0
    torch.testing.assert_close(out[~weighted], naive.prroi_pool(zeroed, rois, (3, 3), 1.0, False)[~weighted],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rounding", ["torchvision", "integer"])
def test_roi_pool_plus_inf_stays_inf_next_to_a_nan(rounding, dtype):
    # +inf wins every bin it is in; a NaN elsewhere in the map must not turn it into the largest finite value (the
    # NaN-to-lowest fix-up may not touch +inf). 4 x 4 map of zeros, +inf at (1, 1), NaN at (3, 3), box (0, 0)-(3, 3).
    # torchvision rounding, 2 x 2: rows and columns split [0, 2), [2, 4): bin (0, 0) holds the +inf, bin (1, 1) only
    # the NaN, which never wins (-FLT_MAX start, 0 beats it): [inf, 0, 0, 0]. Integer rounding: start 0, 3 cells,
    # 1 cell per bin: bins read cells 0 and 1 only: (1, 1) is +inf: [0, 0, 0, inf].
    x = torch.zeros(1, 1, 4, 4, dtype=dtype)
    x[0, 0, 1, 1], x[0, 0, 3, 3] = INF, NAN
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=dtype)
    by_hand = [INF, 0.0, 0.0, 0.0] if rounding == "torchvision" else [0.0, 0.0, 0.0, INF]
    if rounding == "torchvision":
        expected, expected_arg = torch.ops.torchvision.roi_pool(x, rois, 1.0, 2, 2)
    else:
        expected, expected_arg = naive.roi_pool(x, rois, (2, 2), 1.0, "integer")
    assert expected.flatten().tolist() == by_hand
    out, arg = torch.ops.roikit.roi_pool(x, rois, 1.0, 2, 2, rounding)
    assert out.flatten().tolist() == by_hand
    assert torch.equal(arg.long(), expected_arg.long())


def test_roi_align_max_nan_sample_never_wins():
    # naive.roi_align(pool="max") keeps the first sample with v > best: a NaN sample never wins; a bin whose samples
    # are all NaN keeps its -inf start. Map 1 x 3: [NaN, 5, 1]; box x -1..3, y 0..1, one bin, 2 x 2 samples at
    # x in {0, 2}, y in {0.25, 0.75} (y clamps to row 0, the only row). x = 0: taps (0, 0) weight 1 and (0, 1)
    # weight 0: 1 * NaN + 0 * 5 = NaN. x = 2: clamped to column 2: 1. Max of {NaN, 1, NaN, 1} = 1.
    x = torch.tensor([[[[NAN, 5.0, 1.0]]]], dtype=torch.float64)
    rois = torch.tensor([[0, -1.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    assert naive.roi_align(x, rois, (1, 1), 1.0, 2, False, "max")[0].flatten().tolist() == [1.0]
    assert roi_align(x, rois, 1, 1.0, 2, False, pool="max").flatten().tolist() == [1.0]
    # one cell, NaN: the single sample is NaN, nothing beats -inf
    lone = torch.tensor([[[[NAN]]]], dtype=torch.float64)
    box = torch.tensor([[0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert naive.roi_align(lone, box, (1, 1), 1.0, 1, False, "max")[0].flatten().tolist() == [-INF]
    assert roi_align(lone, box, 1, 1.0, 1, False, pool="max").flatten().tolist() == [-INF]


@pytest.mark.parametrize("bad", [INF, -INF], ids=["+inf", "-inf"])
def test_roi_align_border_sample_multiplies_all_four_taps(bad):
    # Map 1 x 2: [1.5, inf]; box (0, 0)-(0, 0), not aligned: forced to 1 x 1, one sample at (0.5, 0.5). H = 1: y
    # clamps to row 0 with ly = 0, so the taps are (0, 0) 0.5, (0, 1) 0.5, (0, 0) 0, (0, 1) 0: the last is
    # 0 * inf = NaN (torchvision's arithmetic, and roikit's rule that a tap of weight 0 is read). Not +-inf.
    x = torch.tensor([[[[1.5, bad]]]], dtype=torch.float64)
    rois = torch.tensor([[0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.isnan(torchvision.ops.roi_align(x, rois, 1, 1.0, -1, False)).all()
    assert torch.isnan(roi_align(x, rois, 1, 1.0, -1, False)).all()
