"""Hostile sizes for every region op, in bounded memory and time: boxes far larger than the map, huge coordinates and
scales, a million boxes. What "bounded" means, against torchvision (or tests/naive.py where torchvision has no op):

* Each case is run for roikit and for torchvision in the same test and roikit's peak extra resident memory must stay
  within ``max(1.5 x torchvision's, torchvision's + 64 MiB)``, its time within ``max(2 s, 20 x torchvision's +
  0.5 s)``. Where torchvision's own call is undefined (a coordinate or a sample count cast to int) or is itself
  box-sized (RoIAlign's per-bin sample table: 1.5 GB for sampling_ratio=1000, 3 GB for a 10,000 px box with adaptive
  sampling), roikit is held to a fixed bound instead: a bounded implementation needs a few MiB for one box on a
  12.8 KB map, a chunked one tens of MiB (bound: 128 MiB), a box-sized one gigabytes.
* The two max-pooled RoIAligns over tens of millions of samples take seconds idle and minutes on a loaded machine,
  so no fixed number of seconds holds them: their time is the process's CPU time, bounded by the same op on a
  sixteenth or less of the samples, run just before (linear growth allowed with 3x slack: a cost quadratic in the
  samples is 16x or more over it), and that smaller call by torchvision's average of its samples (100x; measured
  ~35x). A call past twice its bound is stopped there (a CPU-time alarm), not waited out.
* A million boxes are measured in a fresh process (the heap a long session leaves behind moves the peak).

NaN / inf features: test_hostile_values.py (property tests) and test_hostile_regressions.py (cases by hand).
"""
from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import time
from pathlib import Path

import naive
import pytest
import torch
import torchvision
from _helpers import time_limit

from roikit.ops import multilevel_roi_align, prroi_pool, roi_align, roi_pool, roi_spp
from roikit.utils.memory import measure_peak

MiB = 2**20
SLACK = 64 * MiB  # torchvision's peak + this is always allowed
# where there is no yardstick: a chunked kernel holds tens of MiB for one box, a box-sized one gigabytes
FIXED_BOUND = 128 * MiB
LINEAR_SLACK = 3.0  # a long call's CPU time may be this times its share-scaled reference's (see the docstring)
PER_SAMPLE_SLACK = 100.0  # roikit's max over the reference's samples against torchvision's average of them


# =============================================================================================== bounded memory
def _box(*xyxy):
    return torch.tensor([[0.0, *xyxy]])


X = torch.randn(1, 8, 20, 20, generator=torch.Generator().manual_seed(0))  # 12.8 KB
X_HALF = X[:, :, ::2, ::2].contiguous()  # the next pyramid level (spatial_scale 1/2)
BIG = _box(0, 0, 10000, 10000)  # 10,000 px: 500 x the map
HUGE = _box(0, 0, 1e30, 1e30)
ORDINARY = _box(0, 0, 15, 15)
SPP_LEVELS = (1, 2, 3, 6)


def _tv_spp(rois, scale):
    return torch.cat([torchvision.ops.roi_pool(X, rois, n, scale).reshape(len(rois), -1) for n in SPP_LEVELS], 1)


def _tv_multiscale(rois, sampling_ratio):
    pooler = torchvision.ops.MultiScaleRoIAlign(["p0", "p1"], 7, sampling_ratio)
    return pooler({"p0": X, "p1": X_HALF}, [rois[:, 1:]], [(20, 20)])  # scales 1 and 1/2, inferred


def _rk_multilevel(rois, sampling_ratio, scales=(1.0, 0.5)):
    return multilevel_roi_align([X, X_HALF], rois, 7, list(scales), sampling_ratio)


def _naive_integer_pool(rois, scale):
    return naive.roi_pool(X.double().numpy(), rois, (7, 7), scale, "integer")[0]


def _exact_equal(expected):
    def check(out):
        torch.testing.assert_close(out, expected(), atol=0, rtol=0)
    return check


def _close(expected, tol=1e-5):
    def check(out):
        torch.testing.assert_close(out.double(), expected().double(), atol=tol, rtol=1e-4)
    return check


def _at_least_the_average(rois, sampling_ratio):
    """max pooling of the samples >= their mean (the same samples; a cheap check where no oracle is affordable)."""
    def check(out):
        avg = roi_align(X, rois, 7, 1.0, sampling_ratio)
        assert bool((out >= avg - 1e-5).all()), "roi_align max below the average of the same samples"
    return check


def _prroi_exact(rois, scale):
    def check(out):
        torch.testing.assert_close(out.double(), naive.prroi_pool_exact(X.double(), rois.double(), (7, 7), scale, False),
                                   atol=1e-5, rtol=1e-4)
    return check


# (id, roikit call, torchvision call or None, value check or None, fixed bound when no torchvision call, seconds)
# torchvision None: its call is undefined here, or box-sized itself (see the module docstring); the number it gave
# on the development box is in the comment.
CASES = [
    # roi_pool, torchvision rounding: equal to torchvision.ops.roi_pool bit for bit
    ("roi_pool-10000px", lambda: roi_pool(X, BIG, 7, 1.0), lambda: torchvision.ops.roi_pool(X, BIG, 7, 1.0),
     _exact_equal(lambda: torchvision.ops.roi_pool(X, BIG, 7, 1.0)), None, None),
    ("roi_pool-scale1e6", lambda: roi_pool(X, ORDINARY, 7, 1e6), lambda: torchvision.ops.roi_pool(X, ORDINARY, 7, 1e6),
     _exact_equal(lambda: torchvision.ops.roi_pool(X, ORDINARY, 7, 1e6)), None, None),
    ("roi_pool-1e30px", lambda: roi_pool(X, HUGE, 7, 1.0), None, None, FIXED_BOUND, 2.0),  # torchvision: (int) round(1e30)
    # roi_pool, integer rounding: torchvision's roi_pool as the yardstick, the naive loop for the values
    ("roi_pool_integer-10000px", lambda: roi_pool(X, BIG, 7, 1.0, "integer"),
     lambda: torchvision.ops.roi_pool(X, BIG, 7, 1.0), _close(lambda: _naive_integer_pool(BIG, 1.0), 0), None, None),
    ("roi_pool_integer-scale1e6", lambda: roi_pool(X, ORDINARY, 7, 1e6, "integer"),
     lambda: torchvision.ops.roi_pool(X, ORDINARY, 7, 1e6), _close(lambda: _naive_integer_pool(ORDINARY, 1e6), 0),
     None, None),
    ("roi_pool_integer-1e30px", lambda: roi_pool(X, HUGE, 7, 1.0, "integer"), None, None, FIXED_BOUND, 2.0),
    # roi_spp: torchvision's roi_pool at each level, concatenated
    ("roi_spp-10000px", lambda: roi_spp(X, BIG, SPP_LEVELS), lambda: _tv_spp(BIG, 1.0),
     _exact_equal(lambda: _tv_spp(BIG, 1.0)), None, None),
    ("roi_spp-scale1e6", lambda: roi_spp(X, ORDINARY, SPP_LEVELS, 1e6), lambda: _tv_spp(ORDINARY, 1e6),
     _exact_equal(lambda: _tv_spp(ORDINARY, 1e6)), None, None),
    ("roi_spp-1e30px", lambda: roi_spp(X, HUGE, SPP_LEVELS), None, None, FIXED_BOUND, 2.0),
    # roi_align, average
    ("roi_align-10000px-sr2", lambda: roi_align(X, BIG, 7, 1.0, 2), lambda: torchvision.ops.roi_align(X, BIG, 7, 1.0, 2),
     _close(lambda: torchvision.ops.roi_align(X, BIG, 7, 1.0, 2)), None, None),
    # torchvision: 3053 MiB, 2.8 s (1429^2 x 49 precomputed samples)
    ("roi_align-10000px-adaptive", lambda: roi_align(X, BIG, 7, 1.0, -1), None, None, FIXED_BOUND, 2.0),
    ("roi_align-1e30px-sr2", lambda: roi_align(X, HUGE, 7, 1.0, 2), lambda: torchvision.ops.roi_align(X, HUGE, 7, 1.0, 2),
     _close(lambda: torchvision.ops.roi_align(X, HUGE, 7, 1.0, 2)), None, None),
    ("roi_align-1e30px-adaptive", lambda: roi_align(X, HUGE, 7, 1.0, -1), None, None, FIXED_BOUND, 2.0),  # (int) 1.4e29
    ("roi_align-scale1e6-sr2", lambda: roi_align(X, ORDINARY, 7, 1e6, 2),
     lambda: torchvision.ops.roi_align(X, ORDINARY, 7, 1e6, 2),
     _close(lambda: torchvision.ops.roi_align(X, ORDINARY, 7, 1e6, 2)), None, None),
    # torchvision: 1495 MiB, 1.5 s
    ("roi_align-sr1000", lambda: roi_align(X, ORDINARY, 7, 1.0, 1000), None, None, FIXED_BOUND, 2.0),
    # roi_align, max: no torchvision op; torchvision's roi_align (same samples) is the yardstick
    # 49 M samples x 8 channels to evaluate; torchvision's average of the same samples takes 1.5 GB and 1.5 s
    # here: time bounded by the same call at sampling_ratio=250 (test_bounded_memory_roi_align_max_sr1000)
    ("roi_align_max-2000px-adaptive", lambda: roi_align(X, _box(0, 0, 2000, 2000), 7, 1.0, -1, pool="max"),
     lambda: torchvision.ops.roi_align(X, _box(0, 0, 2000, 2000), 7, 1.0, -1),
     _at_least_the_average(_box(0, 0, 2000, 2000), -1), None, None),
    ("roi_align_max-1e30px-sr2", lambda: roi_align(X, HUGE, 7, 1.0, 2, pool="max"), None,
     _close(lambda: naive.roi_align(X.double().numpy(), HUGE, (7, 7), 1.0, 2, False, "max")[0]), FIXED_BOUND, 2.0),
    ("roi_align_max-scale1e6-sr2", lambda: roi_align(X, ORDINARY, 7, 1e6, 2, pool="max"), None,
     _close(lambda: naive.roi_align(X.double().numpy(), ORDINARY, (7, 7), 1e6, 2, False, "max")[0]), FIXED_BOUND, 2.0),
    # prroi_pool: torchvision's roi_align over the same box as the yardstick, the exact integral for the values
    ("prroi_pool-10000px", lambda: prroi_pool(X, BIG, 7, 1.0), lambda: torchvision.ops.roi_align(X, BIG, 7, 1.0, 2),
     _prroi_exact(BIG, 1.0), None, None),
    ("prroi_pool-1e30px", lambda: prroi_pool(X, HUGE, 7, 1.0), lambda: torchvision.ops.roi_align(X, HUGE, 7, 1.0, 2),
     None, None, None),
    ("prroi_pool-scale1e6", lambda: prroi_pool(X, ORDINARY, 7, 1e6),
     lambda: torchvision.ops.roi_align(X, ORDINARY, 7, 1e6, 2), _prroi_exact(ORDINARY, 1e6), None, None),
    # multilevel_roi_align: torchvision's MultiScaleRoIAlign (maps 1x8x20x20 and 1x8x10x10, scales 1 and 1/2)
    ("multilevel-10000px-sr2", lambda: _rk_multilevel(BIG, 2), lambda: _tv_multiscale(BIG, 2),
     _close(lambda: _tv_multiscale(BIG, 2)), None, None),
    # torchvision: 800 MiB (715^2 x 49 samples at level 1)
    ("multilevel-10000px-adaptive", lambda: _rk_multilevel(BIG, -1), None, None, FIXED_BOUND, 2.0),
    ("multilevel-1e30px-sr2", lambda: _rk_multilevel(HUGE, 2), lambda: _tv_multiscale(HUGE, 2),
     _close(lambda: _tv_multiscale(HUGE, 2)), None, None),
    # no torchvision form: MultiScaleRoIAlign infers its scales from image sizes
    ("multilevel-scale1e6", lambda: _rk_multilevel(ORDINARY, 2, (1e6, 5e5)), None, None, FIXED_BOUND, 2.0),
]


@functools.cache
def _warm_up():
    """Run every op once on an ordinary box, so that first-call costs (code, threads) do not count."""
    for call in (lambda: roi_pool(X, ORDINARY, 7), lambda: roi_pool(X, ORDINARY, 7, 1.0, "integer"),
                 lambda: roi_spp(X, ORDINARY), lambda: roi_align(X, ORDINARY, 7, 1.0, 2),
                 lambda: roi_align(X, ORDINARY, 7, 1.0, 2, pool="max"), lambda: prroi_pool(X, ORDINARY, 7),
                 lambda: _rk_multilevel(ORDINARY, 2), lambda: torchvision.ops.roi_pool(X, ORDINARY, 7),
                 lambda: torchvision.ops.roi_align(X, ORDINARY, 7, 1.0, 2), lambda: _tv_multiscale(ORDINARY, 2)):
        call()
    return True


def _cpu_seconds(call) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


def linear_cpu_bound(reference_seconds: float, share: float) -> float:
    """The CPU seconds allowed a call that does ``share`` times the work of a reference that took
    ``reference_seconds``: linear growth with LINEAR_SLACK, plus half a second."""
    return LINEAR_SLACK * share * reference_seconds + 0.5


def check_bounded(measure, name, roikit_call, torchvision_call=None, fixed_bound=None, fixed_seconds=2.0,
                  reference=None):
    """Measure torchvision's call (the yardstick), then roikit's; assert roikit's peak extra memory and time.
    Returns roikit's result.

    ``reference``: ``(roikit's call on 1/share of the samples, torchvision's average of those samples, share)``:
    the time is then CPU time, bounded by :func:`linear_cpu_bound` of the smaller call's (itself within
    PER_SAMPLE_SLACK x torchvision's + 0.5 s), instead of ``fixed_seconds`` of wall time."""
    _warm_up()
    if torchvision_call is not None:
        tv_out, tv_bytes, tv_seconds = measure(torchvision_call)
        del tv_out
        allowed = max(1.5 * tv_bytes, tv_bytes + SLACK)
        allowed_seconds = max(2.0, 20 * tv_seconds + 0.5)
        yardstick = f"torchvision {tv_bytes / MiB:.1f} MiB, {tv_seconds:.3f} s"
    else:
        allowed, allowed_seconds, yardstick = fixed_bound, fixed_seconds, "fixed bound"
    clock, deadline = "s", None
    if reference is not None:
        small_call, tv_small_call, share = reference
        tv_small = _cpu_seconds(tv_small_call)
        small = _cpu_seconds(small_call)
        assert small <= PER_SAMPLE_SLACK * tv_small + 0.5, (
            f"{name}: on 1/{share:.0f} of the samples roikit took {small:.2f} CPU s, torchvision's average "
            f"{tv_small:.3f} CPU s: over {PER_SAMPLE_SLACK:.0f}x")
        allowed_seconds = linear_cpu_bound(small, share)
        clock, deadline = "CPU s", 2 * allowed_seconds
        yardstick += f"; 1/{share:.0f} of the samples: {small:.2f} CPU s, torchvision {tv_small:.3f} CPU s"
    guard = max(4 * int(allowed), 1 << 30)  # fail fast rather than swap: a box-sized call asks for gigabytes
    failure, used = None, {}

    def timed():
        start = time.process_time()
        try:
            with time_limit(deadline, cpu=True) if deadline else contextlib.nullcontext():
                return roikit_call()
        finally:
            used["cpu"] = time.process_time() - start

    try:
        out, rk_bytes, rk_seconds = measure(timed, address_space=guard)
    except TimeoutError:
        failure = (f"{name}: roikit stopped after {used['cpu']:.1f} CPU s, twice the {allowed_seconds:.1f} CPU s "
                   f"allowed ({yardstick})")
    except (RuntimeError, MemoryError) as e:
        failure = (f"{name}: roikit raised {type(e).__name__} under a {guard / MiB:.0f} MiB address-space guard "
                   f"(allowed peak {allowed / MiB:.0f} MiB; {yardstick}): {str(e)[:300]}")
    if failure is not None:  # failed outside the except block: the error's frames and tensors are not kept
        pytest.fail(failure)
    if reference is not None:
        rk_seconds = used["cpu"]
    report = (f"{name}: roikit {rk_bytes / MiB:.1f} MiB, {rk_seconds:.3f} {clock}; allowed {allowed / MiB:.1f} MiB, "
              f"{allowed_seconds:.1f} {clock} ({yardstick})")
    assert rk_bytes <= allowed, report
    assert rk_seconds <= allowed_seconds, report
    return out


@pytest.mark.parametrize("name, roikit_call, torchvision_call, check, fixed_bound, fixed_seconds",
                         [pytest.param(*case, id=case[0]) for case in CASES])
def test_bounded_memory_and_time(peak_memory, name, roikit_call, torchvision_call, check, fixed_bound,
                                 fixed_seconds):
    out = check_bounded(peak_memory, name, roikit_call, torchvision_call, fixed_bound, fixed_seconds)
    expected_shape = (1, 8 * sum(n * n for n in SPP_LEVELS)) if name.startswith("roi_spp") else (1, 8, 7, 7)
    assert tuple(out.shape) == expected_shape
    assert bool(torch.isfinite(out).all()), f"{name}: non-finite output from a finite map"
    if check is not None:
        check(out)


@pytest.mark.slow
def test_bounded_memory_roi_align_max_sr1000(peak_memory):
    # 1000^2 samples per bin (49 M x 8 channels); time: the same at sampling_ratio=250, 1/16 of the samples
    reference = (lambda: roi_align(X, ORDINARY, 7, 1.0, 250, pool="max"),
                 lambda: torchvision.ops.roi_align(X, ORDINARY, 7, 1.0, 250), 16.0)
    out = check_bounded(peak_memory, "roi_align_max-sr1000", lambda: roi_align(X, ORDINARY, 7, 1.0, 1000, pool="max"),
                        None, FIXED_BOUND, reference=reference)
    assert out.shape == (1, 8, 7, 7) and bool(torch.isfinite(out).all())
    _at_least_the_average(ORDINARY, 1000)(out)


@pytest.mark.slow
def test_bounded_memory_roi_align_max_10000px_adaptive(peak_memory):
    # adaptive: ceil(10000 / 7) = 1429 samples per bin and axis; time: the same box at sampling_ratio=179, 1/64 of
    # the samples
    reference = (lambda: roi_align(X, BIG, 7, 1.0, 179, pool="max"),
                 lambda: torchvision.ops.roi_align(X, BIG, 7, 1.0, 179), (1429 / 179) ** 2)
    out = check_bounded(peak_memory, "roi_align_max-10000px-adaptive",
                        lambda: roi_align(X, BIG, 7, 1.0, -1, pool="max"), None, FIXED_BOUND, reference=reference)
    assert out.shape == (1, 8, 7, 7) and bool(torch.isfinite(out).all())
    _at_least_the_average(BIG, -1)(out)


@pytest.mark.parametrize("reference_seconds", [0.05, 0.3, 1.0, 5.0, 30.0])
@pytest.mark.parametrize("share", [16.0, 64.0])
def test_the_cpu_bound_fails_a_quadratic_blow_up(reference_seconds, share):
    """Work share x the reference's: linear CPU time passes, time growing as the square of the samples (share^2 x
    the reference's) fails, for references from 0.05 s (idle) to 30 s (a loaded machine)."""
    allowed = linear_cpu_bound(reference_seconds, share)
    assert share * reference_seconds <= allowed < share**2 * reference_seconds


def test_the_time_limits_stop_a_runaway_loop():
    start = time.process_time()
    with pytest.raises(TimeoutError, match="over 0.2 CPU s"), time_limit(0.2, cpu=True):
        while True:
            sum(range(1000))
    assert time.process_time() - start < 2.0
    with time_limit(0.1, cpu=True):  # disarmed after the block: nothing fires later
        pass
    _cpu_seconds(lambda: sum(range(3_000_000)))
    with pytest.raises(TimeoutError, match="over 0.1 s: the work is not bounded"), time_limit(0.1):
        while True:  # wall-clock time: passes while sleeping too
            time.sleep(0.01)


def _million_boxes():
    g = torch.Generator().manual_seed(0)
    k = 1_000_000
    xy = torch.rand(k, 2, generator=g) * 40
    wh = torch.rand(k, 2, generator=g) * 10 + 0.5
    return torch.cat([torch.zeros(k, 1), xy, (xy + wh).clamp(max=49.9)], 1)


def _a_million_boxes(op):
    # One channel: torchvision's peak is then its outputs, 188 MiB (roi_align) and 375 MiB (roi_pool: output and
    # argmax), so whatever roikit keeps per box shows. The boxes lie inside the 50 x 50 map, 0.5 to 10.5 px.
    x = torch.randn(1, 1, 50, 50, generator=torch.Generator().manual_seed(1))
    rois = _million_boxes()
    if op == "roi_pool":
        tv_call, rk_call = (lambda: torchvision.ops.roi_pool(x, rois, 7, 1.0)), (lambda: roi_pool(x, rois, 7, 1.0))
    else:
        tv_call, rk_call = (lambda: torchvision.ops.roi_align(x, rois, 7, 1.0, -1)), (lambda: roi_align(x, rois, 7))
    out = check_bounded(measure_peak, f"{op}-1M-boxes", rk_call, tv_call)
    expected = tv_call()
    if op == "roi_pool":
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["roi_pool", "roi_align"])
def test_bounded_memory_a_million_boxes(peak_memory, op):
    """Measured in a fresh process: the heap a long test session leaves behind changes these 200-400 MiB peaks
    (roi_align: 230 MiB alone, 321 MiB after the whole suite, while torchvision's stays at 187-193 MiB)."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"import test_hostile_memory; test_hostile_memory._a_million_boxes({op!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


# -------------------------------------------------------------------------------------- the measurer itself
def test_measurer_sees_500_mb(peak_memory):
    out, extra, _ = peak_memory(lambda: torch.ones(500 * MiB // 4))
    assert 490 * MiB <= extra <= 540 * MiB, extra / MiB
    del out

    def allocate_and_free():
        t = torch.ones(500 * MiB // 4)
        return float(t[0])
    _, extra, _ = peak_memory(allocate_and_free)  # the peak, not what is left at the end
    assert 490 * MiB <= extra <= 540 * MiB, extra / MiB


def test_measurer_sees_nothing(peak_memory):
    _, extra, _ = peak_memory(lambda: None)
    assert extra <= 4 * MiB, extra / MiB
    out, extra, _ = peak_memory(lambda: torch.empty(500 * MiB // 4))  # reserved but never touched
    assert extra <= 4 * MiB, extra / MiB


def test_address_space_guard_stops_a_runaway_allocation(peak_memory):
    with pytest.raises((RuntimeError, MemoryError)):
        peak_memory(lambda: torch.ones(2 << 30, dtype=torch.uint8), address_space=256 * MiB)
    out, _, _ = peak_memory(lambda: torch.ones(1 << 20), address_space=256 * MiB)  # the limit is lifted after
    big, extra, _ = peak_memory(lambda: torch.ones(300 * MiB // 4))
    assert extra >= 290 * MiB
