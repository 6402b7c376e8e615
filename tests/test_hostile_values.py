"""Non-finite features and hostile boxes for every region op, property tests (hypothesis, derandomized): small maps
with NaN / +inf / -inf cells and every kind of box; the non-finite pattern, the finite values and the gradients must
be torchvision's (tests/naive.py's, or the exact integral's).

One intended deviation from torchvision: its CPU RoIAlign gives a sample off the map weight 0 at cell (0, 0) and
still multiplies (0 * NaN = NaN), so a non-finite cell (0, 0) spreads to every box with an off-map sample. roikit's
rule: an output may be non-finite only if a sample it reads (its 4 bilinear taps, even a tap of weight 0) is.
The differential RoIAlign draws here keep cell (0, 0) finite; test_hostile_regressions.py's
``test_roi_align_off_map_sample_does_not_read_cell_0_0`` pins the deviation.
"""
from __future__ import annotations

import math

import naive
import torch
import torchvision
from _helpers import assert_same_non_finite_and_close
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from roikit.ops import prroi_pool, roi_align, roi_pool

MiB = 2**20
NAN, INF = float("nan"), float("inf")


# ================================================================================================ properties
# no explain phase: its line tracer over the naive loops costs minutes and gigabytes while shrinking a failure
PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None, print_blob=True,
                             phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCALES = (1.0, 0.5, 0.25, 1 / 16)
AXIS_KINDS = ("ordinary", "huge", "reversed", "off_map", "fractional", "zero_size")
BAD_VALUES = (NAN, INF, -INF)


def _on_grid(draw, lo, hi, step=1 / 8):
    """A multiple of ``step`` in [lo, hi]: exact in float32 too (|v| <= 2^20, 3 fraction bits)."""
    return draw(st.integers(math.ceil(lo / step), max(math.ceil(lo / step), math.floor(hi / step)))) * step


def _axis(draw, kind, size):
    """(start, end) of one axis of a box in image pixels; ``size`` is the map's extent in pixels."""
    if kind == "ordinary":
        a = _on_grid(draw, 0, size, 1)
        return a, _on_grid(draw, a, size, 1)
    if kind == "fractional":
        a = _on_grid(draw, -size / 2, 1.5 * size)
        return a, a + _on_grid(draw, 1 / 8, size)
    if kind == "huge":  # up to 1e6 px: at least one end far away
        a = draw(st.integers(-10**6, math.ceil(size)))
        return float(a), float(draw(st.integers(max(a, 0) + 1, 10**6)))
    if kind == "reversed":
        a = _on_grid(draw, -size / 2, 1.5 * size)
        return a, a - _on_grid(draw, 1 / 8, size)
    if kind == "off_map":
        if draw(st.booleans()):  # before the map
            b = _on_grid(draw, -3 * size, -1 / 8)
            return b - _on_grid(draw, 0, size), b
        a = _on_grid(draw, size + 1 / 8, 4 * size)
        return a, a + _on_grid(draw, 0, size)
    a = _on_grid(draw, -size / 2, 1.5 * size)  # zero size
    return a, a


@st.composite
def hostile_cases(draw, keep_corner_finite=False, adaptive=True, huge=True, sort_boxes=False):
    """(x, rois, (PH, PW), scale, sampling_ratio, aligned): a small map with a few non-finite cells, hostile boxes."""
    n, c, h, w = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    x = torch.randn(n, c, h, w, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1))))
    if draw(st.booleans()):
        x = (2 * x).round()  # ties: the first maximum must win
    for b, ch, i, j, value in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, c - 1),
                                                      st.integers(0, h - 1), st.integers(0, w - 1),
                                                      st.sampled_from(BAD_VALUES)), max_size=4)):
        if not (keep_corner_finite and i == 0 and j == 0):
            x[b, ch, i, j] = value
    scale = draw(st.sampled_from(SCALES))
    sampling_ratio = draw(st.sampled_from([-1, 0, 1, 2, 3] if adaptive else [1, 2, 3]))
    aligned = draw(st.booleans())
    # with adaptive sampling a huge box means ~1e5 samples per axis and bin: the memory tests' business
    kinds = [k for k in AXIS_KINDS if k != "huge" or (huge and sampling_ratio > 0)]
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        x1, x2 = _axis(draw, draw(st.sampled_from(kinds)), w / scale)
        y1, y2 = _axis(draw, draw(st.sampled_from(kinds)), h / scale)
        if sort_boxes:
            x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        rows.append([float(draw(st.integers(0, n - 1))), x1, y1, x2, y2])
    pooled = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return x.to(dtype), torch.tensor(rows, dtype=dtype), pooled, scale, sampling_ratio, aligned


PROPERTY_GUARD = 256 * MiB  # a 9 x 9 map needs kilobytes; a box-sized kernel asks for terabytes (OOM kill in CI)


def bounded(memory_guard, call):
    """``call()`` with at most ``PROPERTY_GUARD`` more address space: a runaway allocation fails the test."""
    try:
        with memory_guard(PROPERTY_GUARD):
            return call()
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, MemoryError) or "allocate" in str(e)):
            raise
        message = (f"roikit ran out of a {PROPERTY_GUARD >> 20} MiB address-space allowance on a map of at most "
                   f"2 x 3 x 9 x 9 (box-sized memory): {str(e)[:200]}")
    # raised outside the except block: the allocation error's frames (and the tensors they hold) are not kept
    raise AssertionError(message)


def _tolerance(dtype):
    return 1e-5 if dtype == torch.float64 else 1e-4




# ------------------------------------------------------------------ roi_pool against torchvision and the naive loop
@PROPERTY_SETTINGS
@given(hostile_cases(), st.integers(0, 2**31))
def test_roi_pool_torchvision_rounding_matches_torchvision(memory_guard, case, seed):
    x, rois, (ph, pw), scale, _, _ = case
    expected, expected_arg = torch.ops.torchvision.roi_pool(x, rois, scale, ph, pw)
    out, arg = bounded(memory_guard, lambda: torch.ops.roikit.roi_pool(x, rois, scale, ph, pw, "torchvision"))
    torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)  # NaN never wins: no NaN out
    assert torch.equal(arg.long(), expected_arg.long()), "argmax differs from torchvision's"
    if bool(torch.isfinite(x).all()):
        xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        tv = torchvision.ops.roi_pool(xt, rois, (ph, pw), scale)
        grad = torch.randn(tv.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
        tv.backward(grad)
        bounded(memory_guard, lambda: roi_pool(xr, rois, (ph, pw), scale).backward(grad))
        torch.testing.assert_close(xr.grad, xt.grad, atol=0, rtol=0, msg="gradient differs from torchvision's")


@PROPERTY_SETTINGS
@given(hostile_cases())
def test_roi_pool_integer_rounding_matches_naive_loop(memory_guard, case):
    x, rois, (ph, pw), scale, _, _ = case
    expected, expected_arg = naive.roi_pool(x.double().numpy(), rois, (ph, pw), scale, "integer")
    out, arg = bounded(memory_guard, lambda: torch.ops.roikit.roi_pool(x, rois, scale, ph, pw, "integer"))
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(arg.long(), expected_arg), "argmax differs from the naive loop's"


# ------------------------------------------------------------------ roi_align against torchvision and the naive loop
@st.composite
def roi_align_cases(draw):
    # torchvision crashes on reversed boxes with aligned=True and adaptive sampling (a negative sample count sizes
    # a vector): draw sorted boxes there (tests/test_roi_align.py checks that case against the naive loop)
    x, rois, pooled, scale, sampling_ratio, aligned = draw(hostile_cases(keep_corner_finite=True))
    if aligned and sampling_ratio <= 0:
        rois[:, [1, 3]] = rois[:, [1, 3]].sort(dim=1).values
        rois[:, [2, 4]] = rois[:, [2, 4]].sort(dim=1).values
    return x, rois, pooled, scale, sampling_ratio, aligned


@PROPERTY_SETTINGS
@given(roi_align_cases(), st.integers(0, 2**31))
def test_roi_align_matches_torchvision(memory_guard, case, seed):
    x, rois, pooled, scale, sampling_ratio, aligned = case
    expected = torchvision.ops.roi_align(x, rois, pooled, scale, sampling_ratio, aligned)
    out = bounded(memory_guard, lambda: roi_align(x, rois, pooled, scale, sampling_ratio, aligned))
    assert_same_non_finite_and_close(out, expected, _tolerance(x.dtype))
    if bool(torch.isfinite(x).all()):
        xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        tv = torchvision.ops.roi_align(xt, rois, pooled, scale, sampling_ratio, aligned)
        grad = torch.randn(tv.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
        tv.backward(grad)
        bounded(memory_guard, lambda: roi_align(xr, rois, pooled, scale, sampling_ratio, aligned).backward(grad))
        tol = _tolerance(x.dtype)
        torch.testing.assert_close(xr.grad, xt.grad, rtol=tol, atol=tol, msg="gradient differs from torchvision's")


def _samples_per_bin(rois, pooled, scale, sampling_ratio, aligned):
    """The largest gh * gw over the boxes, as RoIAlign counts them."""
    most = 1
    for row in rois.double().tolist():
        sizes = [(row[3] - row[1]) * scale, (row[4] - row[2]) * scale]
        grid = []
        for size, p in zip(sizes, (pooled[1], pooled[0])):
            size = size if aligned else max(size, 1.0)
            grid.append(sampling_ratio if sampling_ratio > 0 else max(math.ceil(size / p), 0))
        most = max(most, grid[0] * grid[1])
    return most


@PROPERTY_SETTINGS
@given(hostile_cases())
def test_roi_align_max_matches_naive_loop(memory_guard, case):
    # naive.roi_align(pool="max"): a sample off the map counts 0, NaN never wins (v > best), so a bin whose samples
    # are all NaN gives -inf; +inf wins
    x, rois, pooled, scale, sampling_ratio, aligned = case
    if _samples_per_bin(rois, pooled, scale, sampling_ratio, aligned) * pooled[0] * pooled[1] * len(rois) > 20000:
        sampling_ratio = 2  # keep the Python loop short
    expected, _ = naive.roi_align(x.double().numpy(), rois, pooled, scale, sampling_ratio, aligned, pool="max")
    out = bounded(memory_guard, lambda: roi_align(x, rois, pooled, scale, sampling_ratio, aligned, pool="max"))
    assert_same_non_finite_and_close(out, expected, _tolerance(x.dtype))


# ------------------------------------------------------------------ prroi_pool against the exact integral
def _kind(values):
    """What a sum over these non-finite values gives: NaN, +inf, -inf or None (no non-finite value)."""
    values = set(values)
    if not values:
        return None
    if any(math.isnan(v) for v in values) or {INF, -INF} <= values:
        return "nan"
    return "+inf" if INF in values else "-inf"


def _out_kind(v):
    return "nan" if math.isnan(v) else "+inf" if v == INF else "-inf" if v == -INF else None


def prroi_non_finite_expectation(x, rois, pooled, scale, aligned):
    """For each output [K, C, PH, PW]: the kind of non-finite value it must have, or None (must be finite), or
    "either" where a bad cell's tent meets the bin within rounding of the coordinates (a sliver whose weight may
    round to 0). A bin weights cell i iff (lo, hi) overlaps (i - 1, i + 1) by more than nothing."""
    n, c, h, w = x.shape
    off = 0.5 if aligned else 0.0
    eps = torch.finfo(x.dtype).eps
    bad = [(b, ch, i, j, float(x[b, ch, i, j])) for b, ch, i, j in (~torch.isfinite(x)).nonzero().tolist()]
    expectation = {}
    for k, row in enumerate(rois.double().tolist()):
        x1, y1, x2, y2 = (v * scale - off for v in row[1:])
        delta = 1e-3 + 8 * eps * max(1.0, abs(x1), abs(y1), abs(x2), abs(y2))
        ybins, xbins = naive.prroi_bins(y1, y2, pooled[0]), naive.prroi_bins(x1, x2, pooled[1])
        for p in range(pooled[0]):
            for q in range(pooled[1]):
                for ch in range(c):
                    must, may = [], []
                    for b, bch, i, j, v in bad:
                        if b != int(row[0]) or bch != ch or ybins is None or xbins is None:
                            continue
                        (ylo, yhi), (xlo, xhi) = ybins[p], xbins[q]

                        def meets(lo, hi, cell, d):
                            return max(lo + d, cell - 1) < min(hi - d, cell + 1)
                        if meets(ylo, yhi, i, delta) and meets(xlo, xhi, j, delta):
                            must.append(v)
                        if meets(ylo, yhi, i, -delta) and meets(xlo, xhi, j, -delta):
                            may.append(v)
                    want = _kind(must)
                    expectation[(k, ch, p, q)] = want if want == _kind(may) else "either"
    return expectation


@PROPERTY_SETTINGS
@given(hostile_cases(adaptive=False))
def test_prroi_pool_matches_exact_integral(memory_guard, case):
    x, rois, pooled, scale, _, aligned = case
    out = bounded(memory_guard, lambda: prroi_pool(x, rois, pooled, scale, aligned)).double()
    expectation = prroi_non_finite_expectation(x, rois, pooled, scale, aligned)
    wrong = [(idx, want, out[idx].item()) for idx, want in expectation.items()
             if want != "either" and _out_kind(out[idx].item()) != want]
    assert not wrong, (f"{len(wrong)} outputs [k, c, ph, pw] with the wrong non-finite kind (expected kind, roikit's "
                       f"value), first: {wrong[:5]}")
    finite_map = torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # bad cells weigh 0 where outputs are finite
    expected = naive.prroi_pool_exact(finite_map, rois, pooled, scale, aligned)
    sure = torch.tensor([[[[expectation[(k, ch, p, q)] is None for q in range(pooled[1])] for p in range(pooled[0])]
                          for ch in range(x.shape[1])] for k in range(len(rois))])
    tol = _tolerance(x.dtype)
    torch.testing.assert_close(out[sure], expected[sure], rtol=tol,
                               atol=tol * max(1.0, float(finite_map.abs().max())))


def test_exact_integral_oracle_agrees_with_naive_midpoint_rule():
    # the exact-integral oracle (naive.prroi_pool_exact) against the dense midpoint rule, on ordinary and off-map boxes
    torch.manual_seed(3)
    x = torch.randn(2, 2, 7, 9, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 9.5, 10.0], [1, -3.0, 4.25, 6.0, 16.0], [1, 12.0, -2.0, 20.0, 3.0],
                         [0, 5.0, 5.0, 5.0, 9.0]], dtype=torch.float64)
    for aligned in (False, True):  # the midpoint rule's error is O(1 / steps^2)
        torch.testing.assert_close(naive.prroi_pool_exact(x, rois, (2, 2), 0.5, aligned),
                                   naive.prroi_pool(x, rois, (2, 2), 0.5, aligned, steps=160), atol=1e-4, rtol=0)
