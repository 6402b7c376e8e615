"""Position-sensitive RoI pooling against torchvision.ops.ps_roi_align / ps_roi_pool (the oracle), by hand and
by gradcheck; plus the two places where roikit deliberately differs, each shown."""
import pytest
import torch
import torchvision

from roikit.ops import PSRoIAlign, PSRoIPool, ps_roi_align, ps_roi_pool

# torchvision's own test boxes (test_ops.py, RoIOpTester) on a 2 x C x 10 x 10 map, and random ones of every kind
TV_ROIS = [[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]]


def boxes(dtype, degenerate=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(20, 2, generator=g, dtype=torch.float64) * 30 - 6
    wh = torch.rand(20, 2, generator=g, dtype=torch.float64) * 20 + 0.3
    rois = torch.cat([torch.randint(0, 2, (20, 1), generator=g).double(), xy, xy + wh], dim=1)
    if degenerate:
        rois[0, 3:] = rois[0, 1:3] - 2  # reversed
        rois[1, 3:] = rois[1, 1:3]  # zero size
    return torch.cat([torch.tensor(TV_ROIS, dtype=torch.float64), rois]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ps_roi_align_matches_torchvision(dtype, sampling_ratio, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 2 * 3 * 3, 10, 10, dtype=dtype)
    # torchvision divides the empty adaptive grid of a zero-size or reversed box by a count of 0: NaN (see below)
    rois = boxes(dtype, degenerate=sampling_ratio > 0)
    xt = x.clone().requires_grad_()
    expected = torchvision.ops.ps_roi_align(xt, rois, 3, 0.5, sampling_ratio)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    ours_x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x.clone()).requires_grad_()
    out = ps_roi_align(ours_x, rois, 3, 0.5, sampling_ratio)
    out.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(ours_x.grad, xt.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output_size", [2, (3, 2)])
def test_ps_roi_pool_forward_matches_torchvision(dtype, output_size):
    torch.manual_seed(0)
    x = torch.randn(2, 2 * 6, 10, 10, dtype=dtype)
    rois = boxes(dtype)
    expected = torchvision.ops.ps_roi_pool(x, rois, output_size, 0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ps_roi_pool(x, rois, output_size, 0.5), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(PSRoIPool(output_size, 0.5)(x.contiguous(memory_format=torch.channels_last), rois),
                               expected, atol=tol, rtol=tol)


def test_ps_roi_pool_by_hand():
    """arange(64) as 4 channels of 4 x 4, one box (0, 0, 4, 4) into 2 x 2: corners round to cells 0 and 4, extent
    4, bins of 2 cells, clipped at the last index 3 as torchvision's forward does. Channel 0 bin (0, 0): cells 0, 1,
    4, 5 -> 2.5; channel 1 bin (0, 1): rows 0-1, column 2 -> (18 + 22) / 2 = 20; channel 2 bin (1, 0): row 2,
    columns 0-1 -> (40 + 41) / 2 = 40.5; channel 3 bin (1, 1): cell (2, 2) -> 58."""
    x = torch.arange(64, dtype=torch.float64).reshape(1, 4, 4, 4)
    out = ps_roi_pool(x, torch.tensor([[0.0, 0, 0, 4, 4]], dtype=torch.float64), 2)
    assert out.tolist() == [[[[2.5, 20.0], [40.5, 58.0]]]]


def test_ps_roi_pool_gradient_is_its_forward_own():
    """Where no bin reaches the map's last row or column, the gradient equals torchvision's; everywhere, it is
    the gradient of the forward (gradcheck). torchvision's CPU backward clips bins to H instead of H - 1, so for a
    box reaching the border it also feeds cells its forward never read: there the two differ, on purpose."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    inside = torch.tensor([[0, 0.0, 0, 10, 9], [1, 2.2, 3.7, 17.6, 19.1], [0, 5, 5, 5, 5]], dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    ps_roi_pool(xa, inside, 2, 0.5).backward(grad)
    torchvision.ops.ps_roi_pool(xb, inside, 2, 0.5).backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=1e-12)
    border = torch.tensor([[0, 0.0, 0, 23, 23], [1, 3, 3, 30, 30]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ps_roi_pool(t, border, 2, 0.5), (x.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda t: ps_roi_align(t, border, 2, 0.5, 2), (x.clone().requires_grad_(),))


def test_degenerate_box_with_adaptive_sampling_gives_zero():
    """A zero-size or reversed box has an empty adaptive grid: roikit gives 0 where torchvision's CPU kernel
    divides 0 by a count of 0."""
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    rois = torch.tensor([[0, 3.0, 3.0, 3.0, 3.0], [0, 3.0, 3.0, 2.5, 2.5]], dtype=torch.float64)
    assert torch.isnan(torchvision.ops.ps_roi_align(x, rois, 2, 1.0, -1)).all()
    assert not ps_roi_align(x, rois, 2, 1.0, -1).any()


@pytest.mark.parametrize("op", [ps_roi_align, ps_roi_pool])
def test_channels_must_split_into_bins(op):
    with pytest.raises(ValueError, match="needs a multiple of 9"):
        op(torch.randn(1, 10, 5, 5), torch.tensor([[0, 0.0, 0, 4, 4]]), 3)


@pytest.mark.parametrize("op, args", [
    (torch.ops.roikit.ps_roi_align.default, (0.5, 2, 2, 2)),
    (torch.ops.roikit.ps_roi_pool.default, (0.5, 2, 2)),
])
def test_opcheck_and_compile(op, args):
    x = torch.randn(2, 8, 6, 7, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 1, 9, 11], [1, 2, 2, 6, 5]])
    torch.library.opcheck(op, (x, rois, *args))
    f = (lambda t: ps_roi_align(t, rois, 2, 0.5, 2)) if op is torch.ops.roikit.ps_roi_align.default else \
        (lambda t: ps_roi_pool(t, rois, 2, 0.5))
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x), atol=0, rtol=0)


def test_module_repr_and_bad_settings():
    assert "sampling_ratio=2" in repr(PSRoIAlign(7, 1 / 16, 2))
    with pytest.raises(ValueError, match="sampling_ratio must be an int"):
        PSRoIAlign(7, 1 / 16, 2.0)
    with pytest.raises(ValueError, match="spatial_scale"):
        PSRoIPool(7, 0.0)


@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool"])
def test_roipooler_takes_position_sensitive_ops(op):
    """One map and a pyramid: the pooler gives the op's own output on each box's level."""
    from roikit.layers import RoIPooler
    from roikit.ops import pyramid_levels

    torch.manual_seed(0)
    maps = {"0": torch.randn(2, 3 * 4, 32, 32), "1": torch.randn(2, 3 * 4, 16, 16)}
    proposals = [torch.tensor([[1.0, 2, 40, 30], [0, 0, 127, 127]]), torch.tensor([[5.0, 5, 20, 50]])]
    pooler = RoIPooler(["0", "1"], 2, 2, op)
    out = pooler(maps, proposals, [(128, 128)] * 2)
    assert out.shape == (3, *pooler.output_shape(12)) == (3, 3, 2, 2)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(proposals)])
    levels = pyramid_levels(rois, [0.25, 0.125])
    f = ps_roi_align if op == "ps_roi_align" else ps_roi_pool
    extra = {"sampling_ratio": 2} if op == "ps_roi_align" else {}
    for k in range(3):
        name, scale = ("0", 0.25) if levels[k] == 0 else ("1", 0.125)
        torch.testing.assert_close(out[k:k + 1], f(maps[name], rois[k:k + 1], 2, scale, **extra))
