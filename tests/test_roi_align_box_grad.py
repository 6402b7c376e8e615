"""roi_align(..., box_grad=True): the gradient with respect to the box corners.

Oracles: gradcheck in float64 (finite differences of the forward itself) on boxes whose samples keep away from every
kink (checked, not assumed); a linear ramp by hand; the feature gradient and output of today's roi_align, bit for
bit; and PrRoIPool's exact box gradient, which the midpoint sums of many samples approach at the rate a bound
worked out below allows.
"""
import math

import pytest
import torch

from roikit.ops import RoIAlign, _library, geometry, prroi_pool, roi_align
from roikit.ops.pytorch import _crops

SCALE = 0.25
H, W = 9, 11
ROIS = torch.tensor([  # in pixels at stride 4 on a 9 x 11 map
    [0, 3.3, 4.1, 30.7, 25.2],
    [1, -6.3, 2.2, 17.9, 40.6],  # partly off the map
    [0, 10.1, 12.3, 11.7, 13.9],  # under one cell: aligned=False holds it at one cell
    [1, 22.9, 31.3, 8.2, 5.5],  # reversed
], dtype=torch.float64)


def features(seed=0, dtype=torch.float64):
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def away_from_kinks(rois, pooled, sampling_ratio, aligned, margin=1e-4):
    """The boxes are smooth points of the op: no sample within ``margin`` cells of a cell line, of the map's border
    (-1, 0, size - 1, size) or of a change of the adaptive count, and no box size within ``margin`` of the one-cell
    floor of aligned=False."""
    (y1, bin_h, gh), (x1, bin_w, gw) = geometry.sampling_grid(rois, SCALE, pooled, sampling_ratio, aligned)
    sizes = ((rois[:, 4] - rois[:, 2]) * SCALE, (rois[:, 3] - rois[:, 1]) * SCALE)  # before the one-cell floor
    for start, bin_size, grid, p, size in ((y1, bin_h, gh, pooled[0], sizes[0]), (x1, bin_w, gw, pooled[1], sizes[1])):
        for k in range(rois.shape[0]):
            i = torch.arange(max(int(grid[k]), 0))
            for q in range(p):
                coord = geometry.sample_coord(start[k], bin_size[k], grid[k], torch.tensor(q), i)
                assert ((coord - coord.round()).abs() > margin).all(), (k, coord)
            if sampling_ratio <= 0:
                assert (bin_size[k] - bin_size[k].round()).abs() > margin
            if not aligned:
                assert (size[k] - 1).abs() > margin


def run(x, coords, rois=ROIS, **kwargs):
    return roi_align(x, torch.cat([rois[:, :1], coords], 1), (3, 2), SCALE, box_grad=True, **kwargs)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 3, -1])
def test_gradcheck(pool, aligned, sampling_ratio):
    """The box gradient against finite differences of the forward (the feature gradient is today's: tested below
    and in test_roi_align.py)."""
    away_from_kinks(ROIS, (3, 2), sampling_ratio, aligned)
    x = features()
    coords = ROIS[:, 1:].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: run(x, c, sampling_ratio=sampling_ratio, aligned=aligned, pool=pool),
                                    (coords,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_ramp_by_hand():
    """F[c, i, j] = (c + 1) (2 i + 3 j): inside [0, H - 1] x [0, W - 1] the surface is (c + 1) (2 y + 3 x).

    avg: a bin's mean y is its centre ``s + (ph + 0.5) b`` (the midpoint sum of a line is exact), so with a gradient
    of ones ``d / ds_y = sum_c 2 (c + 1) * PW * sum_ph (1 - (ph + 0.5) / PH) = 6 * 2 * PW * PH / 2`` and the same for
    ``e``; in pixels times the scale. PH = 3, PW = 2: 6 * 2 * 3 = 36 for y, 6 * 3 * 3 = 54 for x, times 0.25.
    max: the last sample of each bin wins (the ramp rises in y and x), ``y = s + (ph + (g - 0.5) / g) b``, so with
    g = 2 its ``d y / d s = 1 - (ph + 0.75) / PH`` and ``d y / d e = (ph + 0.75) / PH``."""
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    x = torch.stack([(c + 1) * (2 * i + 3 * j) for c in range(3)])[None].repeat(2, 1, 1, 1)
    rois = torch.tensor([[0, 4.2, 3.4, 37.0, 29.0]], dtype=torch.float64)  # cells [1.05, 9.25] x [0.85, 7.25]
    coords = rois[:, 1:].clone().requires_grad_()
    run(x, coords, rois, sampling_ratio=2, aligned=False).sum().backward()
    torch.testing.assert_close(coords.grad, torch.tensor([[54.0, 36.0, 54.0, 36.0]], dtype=torch.float64) * SCALE)
    coords.grad = None
    run(x, coords, rois, sampling_ratio=2, aligned=False, pool="max").sum().backward()
    late = [sum(1 - (p + 0.75) / n for p in range(n)) for n in (3, 2)]  # sum over the bins of d y / d s
    expected = [6 * 3 * 3 * late[1], 6 * 2 * 2 * late[0], 6 * 3 * 3 * (2 - late[1]), 6 * 2 * 2 * (3 - late[0])]
    torch.testing.assert_close(coords.grad, torch.tensor([expected], dtype=torch.float64) * SCALE)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_output_and_feature_gradient_are_todays(pool):
    """box_grad changes nothing but the boxes' gradient: the same output and feature gradient, bit for bit; without
    it the boxes get no gradient, as before."""
    x = features(dtype=torch.float32)
    rois = ROIS.float()
    grads = []
    for box_grad in (False, True):
        xx, rr = x.clone().requires_grad_(), rois.clone().requires_grad_()
        out = roi_align(xx, rr, 3, SCALE, 2, True, pool, box_grad=box_grad)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), xx.grad, rr.grad))
    (out0, gx0, gr0), (out1, gx1, gr1) = grads
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1)
    assert gr0 is None and gr1 is not None and not gr1[:, 0].any() and gr1[:, 1:].abs().sum() > 0


def test_float32_matches_float64_and_box_lists():
    x = features()
    coords = ROIS[:, 1:].clone().requires_grad_()
    run(x, coords, sampling_ratio=-1, aligned=True).sum().backward()
    boxes = [ROIS[ROIS[:, 0] == n, 1:].float().clone().requires_grad_() for n in range(2)]
    out = roi_align(x.float(), boxes, (3, 2), SCALE, -1, True, box_grad=True)
    out.sum().backward()
    for n, b in enumerate(boxes):
        torch.testing.assert_close(b.grad.double(), coords.grad[ROIS[:, 0] == n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_memory_chunks_do_not_change_the_result(pool, monkeypatch):
    x = features()
    coords = ROIS[:, 1:].clone().requires_grad_()
    grad = torch.randn(4, 3, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    run(x, coords, sampling_ratio=-1, aligned=True, pool=pool).backward(grad)
    whole = coords.grad.clone()
    monkeypatch.setattr(_crops, "CHUNK_BUDGET", 1)  # a group per box
    monkeypatch.setattr(_crops, "BOX_SLICE", 3)  # two slices
    coords.grad = None
    run(x, coords, sampling_ratio=-1, aligned=True, pool=pool).backward(grad)
    torch.testing.assert_close(coords.grad, whole, atol=1e-12, rtol=1e-12)


def test_non_finite_cell_gives_nan_box_gradient_to_its_boxes_only():
    x = features()
    x[0, 1, 1, 6] = float("nan")  # read by box 0 (rows 0-6, columns 0-7), not box 2 (rows 2-3, columns 2-3)
    coords = ROIS[:, 1:].clone().requires_grad_()
    run(x, coords, sampling_ratio=2, aligned=True).sum().backward()
    assert coords.grad[0].isnan().all() and coords.grad[1:].isfinite().all()


def test_hostile_boxes_stay_bounded():
    """A 1e30 px box and sampling_ratio=1000 read only the samples on the map (a few per bin): quick, finite."""
    x = features()
    rois = torch.tensor([[0, -1e30, -1e30, 1e30, 1e30], [1, -3e4, -50, 1e4, 3e4]], dtype=torch.float64)
    for pool in ("avg", "max"):
        coords = rois[:, 1:].clone().requires_grad_()
        out = roi_align(x, torch.cat([rois[:, :1], coords], 1), 7, SCALE, 1000, False, pool, box_grad=True)
        out.sum().backward()
        assert coords.grad.isfinite().all()
        assert not coords.grad[0].any()  # edges clamped at 2^52 cells: they do not move the samples


def test_registration_module_and_bad_input():
    x = features(dtype=torch.float32).requires_grad_()
    rois = ROIS.float().requires_grad_()
    torch.library.opcheck(_library.roi_align_box_op, (x, rois, SCALE, 3, 2, 2, True, False))
    torch.library.opcheck(_library.roi_align_box_op, (x, rois, SCALE, 3, 2, -1, False, True))
    f = torch.compile(lambda t, r: roi_align(t, r, 3, SCALE, 2, True, box_grad=True), backend="aot_eager",
                      fullgraph=True)
    assert torch.equal(f(x, rois), roi_align(x, rois, 3, SCALE, 2, True))
    m = RoIAlign(3, SCALE, 2, aligned=True, box_grad=True)
    assert repr(m).endswith("pool='avg', box_grad=True)") and "box_grad" not in repr(RoIAlign(3))
    m(x, rois).sum().backward()
    assert rois.grad is not None and rois.grad[:, 1:].abs().sum() > 0
    with pytest.raises(ValueError, match="box_grad"):
        roi_align(x, rois, 3, box_grad="yes")
    with pytest.raises(ValueError, match="box_grad"):
        RoIAlign(3, box_grad=1)
    empty = roi_align(x, rois[:0], 3, SCALE, box_grad=True)
    assert empty.shape == (0, 3, 3, 3)


# ---------------------------------------------------------------- the limit of many samples: PrRoIPool
def midpoint_bound(x, rois, grad, pooled, g):
    """An upper bound of |RoIAlign's box gradient - PrRoIPool's| with g x g samples a bin (avg, boxes on the map).

    Along y, bin ph's mean over its samples differentiates to the midpoint sum of ``h(u) = (1 - t(u)) mean_x
    f_y(y(u), x)`` over the bin (u in [0, 1], g points), PrRoIPool's to its integral. ``f_y`` is constant between
    cell lines, so h is linear there, where the midpoint sum is exact; a line crossing the bin makes h jump by at most
    ``D = max |F[i + 1] - 2 F[i] + F[i - 1]|`` (the change of f_y; the x weights add up to 1, |1 - t| <= 1), which
    costs at most ``D / (2 g)``. So per box and edge: ``scale * sum_{c, bins} |grad| * lines(bin) * D_c / (2 g)``.
    The x average of f_y is itself a midpoint sum of a continuous piecewise-linear function (error O(1 / g^2)): the
    factor 1.5 covers it."""
    (y1, bin_h, _), (x1, bin_w, _) = geometry.sampling_grid(rois, SCALE, pooled, g, True)
    d2y = (x[:, :, 2:] - 2 * x[:, :, 1:-1] + x[:, :, :-2]).abs().amax(dim=(2, 3))  # [N, C]
    d2x = (x[..., 2:] - 2 * x[..., 1:-1] + x[..., :-2]).abs().amax(dim=(2, 3))
    bounds = []
    for k in range(rois.shape[0]):
        n = int(rois[k, 0])
        ph, pw = torch.arange(pooled[0]), torch.arange(pooled[1])
        lines_y = torch.floor(y1[k] + (ph + 1) * bin_h[k]) - torch.floor(y1[k] + ph * bin_h[k])  # [PH]
        lines_x = torch.floor(x1[k] + (pw + 1) * bin_w[k]) - torch.floor(x1[k] + pw * bin_w[k])
        gk = grad[k].abs()  # [C, PH, PW]
        by = (gk * lines_y[None, :, None] * d2y[n][:, None, None]).sum() / (2 * g)
        bx = (gk * lines_x[None, None, :] * d2x[n][:, None, None]).sum() / (2 * g)
        bounds.append(torch.stack([bx, by, bx, by]) * SCALE * 1.5)
    return torch.stack(bounds)


def test_many_samples_approach_prroi_pool():
    """Boxes whose bins lie on [0, H - 1] x [0, W - 1] (there both ops read the same bilinear surface; RoIAlign clamps
    past the last cell, PrRoIPool lets the surface fall to 0): with g x g samples RoIAlign's output is a midpoint sum of
    PrRoIPool's integral and its box gradient the midpoint sum of PrRoIPool's box gradient. The difference stays
    within the bound above, which falls as 1 / g, and at g = 256 it is within 2 % of the gradient's size."""
    x = features(seed=3)
    rois = torch.tensor([[0, 6.3, 5.1, 41.7, 32.2], [1, 10.2, 4.4, 30.1, 30.3], [0, 3.1, 2.9, 41.2, 33.6]],
                        dtype=torch.float64)
    grad = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def box_gradient(op, **kwargs):
        coords = rois[:, 1:].clone().requires_grad_()
        (op(x, torch.cat([rois[:, :1], coords], 1), 3, SCALE, aligned=True, **kwargs) * grad).sum().backward()
        return coords.grad

    exact = box_gradient(prroi_pool)
    errors = {}
    for g in (8, 32, 256):
        err = (box_gradient(roi_align, sampling_ratio=g, box_grad=True) - exact).abs()
        bound = midpoint_bound(x, rois, grad, (3, 3), g)
        assert (err <= bound).all(), (g, err, bound)
        errors[g] = err.max().item()
    assert errors[256] < errors[8] / 8  # the 1 / g rate (32 times the samples)
    assert errors[256] < 0.02 * exact.abs().max().item()
    assert math.isfinite(errors[32])


# ---------------------------------------------------------------- the Triton kernel (run by Triton's interpreter)
@pytest.fixture(scope="module")
def kernel():
    """roikit.ops.triton.roi_align_box_grad built for the interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
    pytest.importorskip("triton")
    import importlib

    names = ["_tiles", "roi_align", "roi_align_box_grad"]
    mods = [importlib.import_module(f"roikit.ops.triton.{name}") for name in names]
    if not all(any(type(v).__name__ == "InterpretedFunction" for v in vars(m).values()) for m in mods[1:]):
        mods = [importlib.reload(m) for m in mods]
    return mods[-1]


def box_grad_reference(x, rois, grad, sampling_ratio, aligned, pool_max, pooled=(3, 2)):
    from roikit.ops.pytorch import roi_align as ref_align
    from roikit.ops.pytorch import roi_align_box_grad as ref

    out, arg = ref_align.roi_align_forward(x, rois, SCALE, *pooled, sampling_ratio, aligned, pool_max)
    return out, arg, ref.roi_align_box_backward(grad, x, rois, out, arg, SCALE, *pooled, sampling_ratio, aligned,
                                                pool_max)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # log2(0) of degenerate boxes, in the interpreter's numpy
@pytest.mark.parametrize("pool_max", [False, True], ids=["avg", "max"])
@pytest.mark.parametrize("aligned,sampling_ratio", [(False, 2), (True, -1), (True, 3)])
def test_kernel_matches_reference(kernel, pool_max, aligned, sampling_ratio):
    x, rois = features(dtype=torch.float32), ROIS.float()
    grad = torch.randn(4, 3, 3, 2, generator=torch.Generator().manual_seed(5))
    out, arg, want = box_grad_reference(x, rois, grad, sampling_ratio, aligned, pool_max)
    got = kernel.roi_align_box_backward(grad, x, rois, out, arg, SCALE, 3, 2, sampling_ratio, aligned, pool_max)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got, kernel.roi_align_box_backward(grad, x, rois, out, arg, SCALE, 3, 2, sampling_ratio,
                                                          aligned, pool_max))  # no atomics: the same bits


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_channels_last_hostile_and_non_finite(kernel, dtype):
    x = features(dtype=torch.float32)
    x[1, 2, 4, 4] = float("inf")
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    hostile = torch.tensor([[0, -1e30, -1e30, 1e30, 1e30], [1, -3e4, -50, 1e4, 3e4]])  # few samples on the map
    grad = torch.randn(4, 3, 3, 2, generator=torch.Generator().manual_seed(6)).to(dtype)
    for rois, pool_max, ratio in ((ROIS.float(), False, 2), (ROIS.float(), True, -1), (hostile, False, 1000),
                                  (hostile, True, 1000)):
        g = grad[:rois.shape[0]]
        out, arg, want = box_grad_reference(x, rois, g, ratio, False, pool_max)
        got = kernel.roi_align_box_backward(g, x, rois, out, arg, SCALE, 3, 2, ratio, False, pool_max)
        assert got.dtype == torch.float32 and torch.equal(got.isnan(), want.isnan())
        assert got.isnan().any() == (rois.shape[0] == 4)  # the inf cell: a NaN box gradient for a box reading it
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=1e-3, rtol=1e-3)
    assert got[0].eq(0).all()  # edges clamped at 2^52 cells do not move the samples


def test_kernel_registered_for_cuda():
    for op in ("roi_align_box", "roi_align_box_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"roikit::{op}", "CUDA"), op
