"""The numba path of ps_roi_align / ps_roi_pool (roikit/ops/pytorch/jit_ps.py) against torchvision and the plain path.

torchvision's CPU kernels are the oracle, bit for bit (the same sums in the same order), on 1 and 2 threads:
ps_roi_align forward and backward, ps_roi_pool forward (half types: torchvision on the float32 map, rounded once).
ps_roi_pool's gradient is its forward's own: a hand-made one (torchvision's formula, the forward's clip) bit for bit,
and torchvision's on every cell outside the bins torchvision's backward clips differently (shown to be exactly that
clip). The plain path (float64 summed-area tables, no kernel code shared) agrees within the stated rounding bound.
The kernels' per-box samples and bin edges (numba, _numba_ps_tables.py) equal roikit.ops.geometry's on hostile boxes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from roikit.ops import geometry, ps_roi_align, ps_roi_pool
from roikit.ops.pytorch import jit, jit_ps, ps_roi

pytestmark = pytest.mark.skipif(not jit_ps._takes(torch.zeros(1)), reason="numba is not installed (the plain path runs)")

POOLED = (3, 2)
C = 3 * POOLED[0] * POOLED[1]  # three output channels


@pytest.fixture(params=[1, 2])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _map(dtype, seed=0, layout="contiguous"):
    x = torch.randn(2, C, 13, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _rois(dtype, k=40, reversed_boxes=True, seed=0):
    """Boxes inside, across and outside a 13 x 17 map at spatial_scale 0.5; some reversed, one of zero size."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 44 - 6
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * 24 + 0.2
    rois = torch.cat([torch.randint(0, 2, (k, 1), generator=g).double(), xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([40.0, 30, 60, 50])  # wholly outside the map
    if reversed_boxes:
        rois[1, 3:] = rois[1, 1:3] - 3
        rois[2, 3:] = rois[2, 1:3]
    return rois.to(dtype)


def _run_both(op, x, rois, grad=None):
    """(output, map gradient) on the numba path and on the plain path."""
    results = []
    for off in (False, True):
        xx = x.clone().requires_grad_()
        if off:
            with jit.disabled():
                out = op(xx, rois)
                out.backward(grad)
        else:
            out = op(xx, rois)
            out.backward(grad)
        results.append((out.detach(), xx.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ps_roi_align_equals_torchvision_bit_for_bit(threads, dtype, sampling_ratio, layout):
    # torchvision divides a degenerate box's empty adaptive grid by 0 (NaN): none drawn there
    rois = _rois(dtype, reversed_boxes=sampling_ratio > 0)
    x = _map(dtype, layout=layout)
    xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = torchvision.ops.ps_roi_align(xt, rois, POOLED, 0.5, sampling_ratio)
    out = ps_roi_align(xr, rois, POOLED, 0.5, sampling_ratio)
    assert torch.equal(out, expected), f"forward: max diff {(out - expected).abs().max():.3g}"
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected.backward(grad)
    out.backward(grad)
    assert torch.equal(xr.grad, xt.grad), f"backward: max diff {(xr.grad - xt.grad).abs().max():.3g}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_ps_roi_align_agrees_with_the_plain_path(threads, dtype, tol):
    """Half types compute in float32 on both paths; adaptive sampling with reversed and zero-size boxes (0 there)."""
    rois = _rois(dtype)
    x = _map(dtype, seed=3)
    grad = torch.randn(len(rois), 3, *POOLED, generator=torch.Generator().manual_seed(2)).to(dtype)
    (out, gx), (ref, gref) = _run_both(lambda t, r: ps_roi_align(t, r, POOLED, 0.5, -1), x, rois, grad)
    assert out.dtype == gx.dtype == dtype
    assert not out[1:3].any()  # the reversed and the zero-size box: no sample
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, gref, atol=tol, rtol=tol)


# ---------------------------------------------------------------- ps_roi_pool
def _tv_pool(x, rois, pooled, scale, grad=None):
    """torchvision's ps_roi_pool (and map gradient) on float32 copies of half types (roikit sums those in float32),
    rounded back to their dtype."""
    wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    xt = wide.detach().clone().requires_grad_(grad is not None)
    out = torchvision.ops.ps_roi_pool(xt, rois.to(wide.dtype), pooled, scale)
    if grad is None:
        return out.to(x.dtype)
    out.backward(grad.to(wide.dtype))
    return out.to(x.dtype), xt.grad.to(x.dtype)


def _edges_by_hand(rois, scale, pooled, shape, last):
    """Every box's bin edges by torchvision's formula (corners rounded half away from zero, extent ``max(end -
    start, 1)``, bin ``p`` from ``floor(p * size)`` to ``ceil((p + 1) * size)``, in the boxes' float32 / float64),
    clipped to ``[0, length - 1]`` (``last=True``: the forward's) or to ``[0, length]`` (torchvision's CPU
    backward): per box, ``(rows, cols)`` as lists of ``(start, end)``."""
    real = np.float64 if rois.dtype == torch.float64 else np.float32

    def axis(a, b, p, length):
        first, stop = (int(np.trunc(v + np.copysign(real(0.5), v))) for v in (real(a) * real(scale),
                                                                              real(b) * real(scale)))
        size = real(max(stop - first, 1)) / real(p)
        top = length - 1 if last else length
        return [(min(max(int(np.floor(real(i) * size)) + first, 0), top),
                 min(max(int(np.ceil(real(i + 1) * size)) + first, 0), top)) for i in range(p)]

    return [(axis(y1, y2, pooled[0], shape[2]), axis(x1, x2, pooled[1], shape[3]))
            for _, x1, y1, x2, y2 in rois.tolist()]


def _rois_and_hostile(dtype):
    """:func:`_rois` and the hostile boxes whose pixel corners fit torchvision's int (not the +-1e30 one)."""
    hostile = _hostile_rois(dtype)
    return torch.cat([_rois(dtype), hostile[hostile[:, 1:].abs().amax(1) < 1e9]])


def _naive_pool_backward(grad, rois, scale, pooled, shape, last):
    """A map gradient by hand, in grad's dtype: box by box, each bin's ``grad / area`` added to its cells (edges as
    :func:`_edges_by_hand`)."""
    out = torch.zeros(shape, dtype=grad.dtype)
    for k, (rows, cols) in enumerate(_edges_by_hand(rois, scale, pooled, shape, last)):
        n = int(rois[k, 0])
        for j in range(grad.shape[1]):
            for ph, (h0, h1) in enumerate(rows):
                for pw, (w0, w1) in enumerate(cols):
                    if h1 > h0 and w1 > w0:
                        c = (j * pooled[0] + ph) * pooled[1] + pw
                        out[n, c, h0:h1, w0:w1] += grad[k, j, ph, pw] / ((h1 - h0) * (w1 - w0))
    return out


def _pool_bound(x, rois, pooled, scale, out_dtype):
    """How far the numba forward (sums in float32, or float64 for float64 boxes) may lie from the plain path (float64
    summed-area tables, rounded once), per bin: a sum of ``a`` cells added one by one is within ``(a - 1) u`` of
    ``sum |cell|`` (u: the unit roundoff, 2^-24 or 2^-53), the division and the final rounding add ``u`` each of the
    mean; the plain path's table entries carry ``4 (H + W + 2) 2^-53`` of a plane's ``sum |cell|`` between them; a
    half type's two roundings may land one unit apart."""
    u = 2.0 ** -53 if rois.dtype == torch.float64 else 2.0 ** -24
    (hs, he), (ws, we) = geometry.ps_roi_pool_edges(rois, scale, pooled, x.shape[2:])
    area = ((he - hs)[:, None, :, None] * (we - ws)[:, None, None, :]).double().clamp(min=1)  # [K, 1, PH, PW]
    with jit.disabled():
        mean_abs = ps_roi.ps_roi_pool_forward(x.double().abs(), rois, scale, *pooled)  # [K, C', PH, PW]
    plane_abs = x.double().abs().sum((2, 3)).max()
    bound = (area + 2) * u * mean_abs * 1.001 + 4 * (sum(x.shape[2:]) + 2) * 2.0 ** -53 * plane_abs / area
    if out_dtype in (torch.bfloat16, torch.float16):
        bound = bound + 2 * torch.finfo(out_dtype).eps * mean_abs
    return bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ps_roi_pool_forward_equals_torchvision_bit_for_bit(threads, dtype, layout):
    """torchvision's sums in its order: its bits in float32 and float64; half maps sum in float32, so torchvision
    on the float32 map, rounded once (torchvision's own float16 kernel sums in float16; it takes no bfloat16)."""
    rois = _rois_and_hostile(torch.float64 if dtype == torch.float64 else torch.float32)
    rois = rois[torch.isfinite(rois.to(dtype)).all(1)]  # (float16 boxes: 3e7 is out of range)
    x = _map(dtype, seed=4, layout=layout)
    out = ps_roi_pool(x, rois.to(dtype), POOLED, 0.5)
    assert out.dtype == dtype
    expected = _tv_pool(x, rois.to(dtype).to(rois.dtype), POOLED, 0.5)
    assert torch.equal(out, expected), f"max diff {(out.double() - expected.double()).abs().max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_ps_roi_pool_forward_agrees_with_the_plain_path_within_the_bound(threads, dtype):
    rois = torch.cat([_rois(torch.float64), _hostile_rois(torch.float64)])
    rois = rois.to(torch.float64 if dtype == torch.float64 else torch.float32)
    x = (_map(torch.float64, seed=14) * 1e3 + 5e3).to(dtype)  # an offset: sums far from 0, rounding shows
    out = ps_roi_pool(x, rois, POOLED, 0.5)
    with jit.disabled():
        ref = ps_roi_pool(x, rois, POOLED, 0.5)
    diff = (out.double() - ref.double()).abs()
    bound = _pool_bound(x, rois, POOLED, 0.5, dtype)
    assert (diff <= bound).all(), f"{(diff - bound).max():.3g} over the bound"
    if dtype == torch.float32:
        assert diff.max() > 0  # not vacuous: float32 sums of cells near 5e3 do round


def test_ps_roi_pool_non_finite_cells():
    """NaN, +inf and -inf cells: torchvision's bits (its float sums carry them), and NaN or infinite exactly where
    the plain path's rules put them (a bin is NaN or infinite only if a cell it averages is)."""
    x = _map(torch.float32, seed=5)
    x[0, 0, 2, 3], x[1, 7, 5, 5], x[1, 7, 6, 6], x[0, 11, 0:4, 0:4] = float("nan"), float("inf"), float("-inf"), \
        float("inf")
    rois = _rois(torch.float32, k=60)
    out = ps_roi_pool(x, rois, POOLED, 0.5)
    torch.testing.assert_close(out, torchvision.ops.ps_roi_pool(x, rois, POOLED, 0.5), atol=0, rtol=0,
                               equal_nan=True)
    with jit.disabled():
        ref = ps_roi_pool(x, rois, POOLED, 0.5)
    assert not torch.isfinite(ref).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ps_roi_pool_backward_is_torchvision_bar_its_border_clip(threads, dtype):
    """The gradient adds each bin's ``grad / area`` to its cells box by box in the map's dtype, as torchvision does,
    on the forward's own cells: the hand-made gradient with the forward's clip, bit for bit. torchvision's CPU
    backward is the same sum with bins clipped to H and W instead of H - 1 and W - 1 (bit for bit, float32), so the
    two gradients are equal on every cell outside the bins whose two clips differ, and differ there."""
    rois = _rois_and_hostile(dtype)
    x = _map(dtype, seed=6)
    grad = torch.randn(len(rois), 3, *POOLED, generator=torch.Generator().manual_seed(7)).to(dtype)
    xr = x.clone().requires_grad_()
    ps_roi_pool(xr, rois, POOLED, 0.5).backward(grad)
    assert torch.equal(xr.grad, _naive_pool_backward(grad, rois, 0.5, POOLED, x.shape, last=True))
    if dtype == torch.float64:  # (torchvision's float64 backward rounds the corners in float32: roundf)
        return
    _, tv_grad = _tv_pool(x, rois, POOLED, 0.5, grad)
    assert torch.equal(tv_grad, _naive_pool_backward(grad, rois, 0.5, POOLED, x.shape, last=False))
    reach = torch.zeros(x.shape, dtype=torch.bool)  # the cells of the bins whose two clips differ
    ours, theirs = (_edges_by_hand(rois, 0.5, POOLED, x.shape, last) for last in (True, False))
    for k, ((rows, cols), (tv_rows, tv_cols)) in enumerate(zip(ours, theirs)):
        for ph in range(POOLED[0]):
            for pw in range(POOLED[1]):
                if (rows[ph], cols[pw]) != (tv_rows[ph], tv_cols[pw]):
                    c = ph * POOLED[1] + pw
                    reach[int(rois[k, 0]), c::POOLED[0] * POOLED[1], tv_rows[ph][0]:tv_rows[ph][1],
                          tv_cols[pw][0]:tv_cols[pw][1]] = True
    assert reach.any() and (xr.grad[reach] != tv_grad[reach]).any()
    assert torch.equal(xr.grad[~reach], tv_grad[~reach])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ps_roi_pool_backward_agrees_with_the_plain_path(threads, dtype):
    """The plain path's difference table (float64, rounded once) within the sum's bound: each cell adds at most one
    share per box, ``K`` additions in all, each within ``u`` of the running ``sum |share|``."""
    rois = _rois(dtype)
    x = _map(dtype, seed=6)
    grad = torch.randn(len(rois), 3, *POOLED, generator=torch.Generator().manual_seed(7)).to(dtype)
    (_, gx), (_, gref) = _run_both(lambda t, r: ps_roi_pool(t, r, POOLED, 0.5), x, rois, grad)
    assert gx.dtype == dtype
    with jit.disabled():
        abs_sum = ps_roi.ps_roi_pool_backward(grad.double().abs(), rois.float(), 0.5, *POOLED, *x.shape)
    u = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    bound = (len(rois) + 2) * u * abs_sum + 1e-12 * abs_sum.max()
    if dtype == torch.bfloat16:
        bound = bound + 2 * torch.finfo(dtype).eps * abs_sum
    assert ((gx.double() - gref.double()).abs() <= bound).all()


def test_threads_give_the_same_bits():
    x, rois = _map(torch.float32, seed=10), _rois(torch.float32, k=50, reversed_boxes=False)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append([_run_both(op, x, rois, torch.ones(50, 3, *POOLED))[0]
                        for op in (lambda t, r: ps_roi_align(t, r, POOLED, 0.5, 2),
                                   lambda t, r: ps_roi_pool(t, r, POOLED, 0.5))])
    for (o1, g1), (o2, g2) in zip(*results):
        assert torch.equal(o1, o2) and torch.equal(g1, g2)


def test_what_the_numba_path_declines_or_skips():
    x, rois = _map(torch.float32), _rois(torch.float32, k=5, reversed_boxes=False)
    # more than jit.MAX_SAMPLES samples per bin and axis: the plain path runs (and agrees with torchvision)
    assert jit_ps.ps_roi_align_forward(x, rois, 0.5, 3, 2, jit.MAX_SAMPLES + 1) is None
    torch.testing.assert_close(ps_roi_align(x, rois, POOLED, 0.5, jit.MAX_SAMPLES + 1),
                               torchvision.ops.ps_roi_align(x, rois, POOLED, 0.5, jit.MAX_SAMPLES + 1))
    with jit.disabled():  # the switch
        assert jit_ps.ps_roi_pool_forward(x, rois, 0.5, 3, 2) is None
    for op in (lambda t, r: ps_roi_align(t, r, POOLED, 0.5, 2), lambda t, r: ps_roi_pool(t, r, POOLED, 0.5)):
        xx = x.clone().requires_grad_()
        out = op(xx, rois[:0])  # no boxes
        out.sum().backward()
        assert out.shape == (0, 3, *POOLED) and not xx.grad.any()


def test_non_contiguous_channel_slice():
    """A channel slice of a bigger map (a non-contiguous view) reads the right channels."""
    big = torch.randn(2, 2 * C, 13, 17, generator=torch.Generator().manual_seed(11))
    x, rois = big[:, 5:5 + C], _rois(torch.float32, reversed_boxes=False)
    assert not x.is_contiguous()
    assert torch.equal(ps_roi_align(x, rois, POOLED, 0.5, 2), torchvision.ops.ps_roi_align(x, rois, POOLED, 0.5, 2))
    assert torch.equal(ps_roi_pool(x, rois, POOLED, 0.5), ps_roi_pool(x.contiguous(), rois, POOLED, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocks_of_channels_give_the_same_results(monkeypatch, dtype):
    """Maps converted (float16) and gradients added (both half types) a few channels at a time (the budget shrunk
    to 5 channels of this map): the same bits as in one block."""
    x, rois = _map(dtype, seed=12), _rois(torch.float32, k=30, reversed_boxes=False)
    grad = torch.randn(30, 3, *POOLED, generator=torch.Generator().manual_seed(13)).to(dtype)
    ops = (lambda t, r: ps_roi_align(t, r, POOLED, 0.5, -1), lambda t, r: ps_roi_pool(t, r, POOLED, 0.5))
    whole = [_run_both(op, x, rois, grad)[0] for op in ops]
    monkeypatch.setattr(jit, "CHUNK_BUDGET", 5 * 2 * 13 * 17)
    monkeypatch.setattr(jit_ps, "CHUNK_BUDGET", 5 * 2 * 13 * 17)
    for (out, gx), op in zip(whole, ops):
        out2, gx2 = _run_both(op, x, rois, grad)[0]
        assert torch.equal(out, out2) and torch.equal(gx, gx2)


# ---------------------------------------------------------------- the numba tables against geometry
def _hostile_rois(dtype):
    """Boxes a table must survive: reversed, zero-size, off the map on every side, huge (finite) and tiny, corners
    on half cells (rounding ties), the last batch index; plus random ones."""
    g = torch.Generator().manual_seed(20)
    rows = [[0, 1.0, 2.0, 30.0, 20.0], [1, 30.0, 20.0, 1.0, 2.0], [0, 5.0, 5.0, 5.0, 5.0], [1, -50, -40, -10, -5],
            [0, 100, 90, 300, 200], [1, -1e30, -3e29, 1e30, 4e29], [0, 1e-30, 0, 2e-30, 1e-30], [1, 2.5, 3.5, 7.5, 9.5],
            [0, -0.5, -1.5, 0.5, 1.5], [1, 33.0, 25.0, 34.0, 26.0], [0, 3e7, 1e7, 3e7 + 2, 1e7 + 3]]
    xy = torch.rand(30, 2, generator=g, dtype=torch.float64) * 60 - 15
    wh = torch.rand(30, 2, generator=g, dtype=torch.float64) * 40 - 5
    rand = torch.cat([torch.randint(0, 2, (30, 1), generator=g).double(), xy, xy + wh], 1)
    return torch.cat([torch.tensor(rows, dtype=torch.float64), rand]).to(dtype)


def _geometry_taps(rois, scale, pooled, ratio, size, most):
    """geometry's sample taps, [K, P, G] per axis (the plain path's arithmetic), and gh * gw."""
    grid = geometry.sampling_grid(rois, scale, pooled, ratio, True)
    axes = []
    for (start, bin_size, count), p, g, length in zip(grid, pooled, most, size):
        pp, ii = torch.arange(p)[None, :, None], torch.arange(g)[None, None, :]
        coord = geometry.sample_coord(start[:, None, None], bin_size[:, None, None], count[:, None, None], pp, ii)
        valid = (ii < count[:, None, None]) & (coord >= -1.0) & (coord <= length)
        axes.append((*geometry.sample_taps(coord, valid, length), valid))
    return axes, grid[0][2] * grid[1][2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.1, 1 / 16, 2.0])
@pytest.mark.parametrize("ratio", [-1, 0, 1, 3])
def test_numba_sample_tables_equal_geometry(dtype, scale, ratio):
    rois, pooled, size = _hostile_rois(dtype), (3, 2), (13, 17)
    _, tables = jit_ps._kernels()
    boxes, s = jit_ps._boxes(rois, scale)
    most_y, most_x = tables.most_samples(boxes, s, *pooled, ratio)
    grid = geometry.sampling_grid(rois, scale, pooled, ratio, True)
    assert (most_y, most_x) == (max(int(grid[0][2].max()), 1), max(int(grid[1][2].max()), 1))
    most = (min(most_y, 8), min(most_x, 8))  # the huge boxes' counts are capped: the first 8 samples compared
    keep = [i for i in range(len(rois)) if max(int(grid[0][2][i]), int(grid[1][2][i])) <= 8]
    rois = rois[keep]
    boxes, s = jit_ps._boxes(rois, scale)
    real = np.float64 if dtype == torch.float64 else np.float32
    y = tuple(np.empty((len(rois), pooled[0], most[0]), t) for t in (np.int32, np.int32, real, real, np.bool_))
    x = tuple(np.empty((len(rois), pooled[1], most[1]), t) for t in (np.int32, np.int32, real, real, np.bool_))
    batch, count = np.empty(len(rois), np.int64), np.empty(len(rois), real)
    tables.align_tables(boxes, 0, s, ratio, *size, batch, *y, *x, count)
    (ey, ex), ecount = _geometry_taps(rois, scale, pooled, ratio, size, most)
    assert np.array_equal(batch, rois[:, 0].long().numpy())
    assert np.array_equal(count, ecount.to(geometry.compute_dtype(rois)).numpy())
    for got, expected in ((y, ey), (x, ex)):
        for name, a, b in zip(("low", "high", "w_low", "w_high", "valid"), got, expected):
            b = b.numpy()
            assert np.array_equal(a, b.astype(a.dtype)), f"{name}: {np.argwhere(a != b)[:5]}"
            assert a.dtype == np.bool_ or np.array_equal(np.signbit(a), np.signbit(b)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.1, 1 / 16, 2.0])
@pytest.mark.parametrize("pooled", [(3, 2), (7, 7), (1, 1)])
def test_numba_bin_edges_equal_geometry(dtype, scale, pooled):
    rois = _hostile_rois(dtype)
    batch, edges = jit_ps._pool_edges(rois, scale, pooled, (2, 6, 13, 17))
    expected = geometry.ps_roi_pool_edges(rois, scale, pooled, (13, 17))
    assert np.array_equal(batch, rois[:, 0].long().numpy())
    for got, want in zip(edges, (*expected[0], *expected[1])):
        assert np.array_equal(got, want.numpy()), np.argwhere(got != want.numpy())[:5]


def test_bfloat16_maps_are_read_without_a_copy_exactly():
    """A bfloat16 map's cells widen exactly to float32: the outputs equal torchvision's on the float32 copy, rounded
    to bfloat16 (both ops), and the plain path's within rounding (ps_roi_pool)."""
    x = _map(torch.float32, seed=21).bfloat16()
    rois = _rois(torch.float32, k=40, reversed_boxes=False)
    out = ps_roi_align(x, rois, POOLED, 0.5, 2)
    assert torch.equal(out, torchvision.ops.ps_roi_align(x.float(), rois, POOLED, 0.5, 2).bfloat16())
    out = ps_roi_pool(x, rois, POOLED, 0.5)
    assert torch.equal(out, torchvision.ops.ps_roi_pool(x.float(), rois, POOLED, 0.5).bfloat16())
    with jit.disabled():
        ref = ps_roi_pool(x, rois, POOLED, 0.5)
    assert ((out.double() - ref.double()).abs() <= _pool_bound(x, rois, POOLED, 0.5, torch.bfloat16)).all()


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(boxes=st.lists(st.tuples(st.integers(0, 1), *[st.floats(-40, 60, width=32)] * 4), min_size=1, max_size=12),
       scale=st.sampled_from([0.5, 1 / 3, 0.25, 1.0]), ratio=st.sampled_from([1, 2, 3]),
       pooled=st.sampled_from([(3, 2), (2, 2), (1, 3)]))
def test_property_equal_torchvision_and_the_plain_path(boxes, scale, ratio, pooled):
    """Any boxes (reversed, off the map, zero-size): ps_roi_align is torchvision's bits forward and backward;
    ps_roi_pool torchvision's forward bits, its gradient the hand-made one (torchvision's but for the border clip),
    and the plain path's forward within the bound."""
    rois = torch.tensor([list(b) for b in boxes], dtype=torch.float32)
    c = 2 * pooled[0] * pooled[1]
    x = torch.randn(2, c, 9, 11, generator=torch.Generator().manual_seed(len(boxes)))
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ps_roi_align(xr, rois, pooled, scale, ratio), torchvision.ops.ps_roi_align(xt, rois, pooled, scale,
                                                                                            ratio)
    assert torch.equal(out, expected)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(xr.grad, xt.grad)
    xr = x.clone().requires_grad_()
    out = ps_roi_pool(xr, rois, pooled, scale)
    assert torch.equal(out, torchvision.ops.ps_roi_pool(x, rois, pooled, scale))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    assert torch.equal(xr.grad, _naive_pool_backward(grad, rois, scale, pooled, x.shape, last=True))
    with jit.disabled():
        ref = ps_roi_pool(x, rois, pooled, scale)
    assert ((out.detach().double() - ref.double()).abs() <= _pool_bound(x, rois, pooled, scale, x.dtype)).all()
