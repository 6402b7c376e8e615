"""roi_pool: the "torchvision" rule against torchvision exactly, the "integer" rule against a naive loop and by hand."""
import naive
import pytest
import torch
import torchvision

from roikit.ops import RoIPool, roi_pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.5, 1 / 16])
def test_torchvision_rounding_matches_torchvision_exactly(dtype, scale, make_rois, layouts):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 17, dtype=dtype)
    x[:, :, 4:8] = x[:, :, 4:8].round()  # ties: the first maximum in row-major order must win
    rois = make_rois(k=40, scale=scale, dtype=dtype)
    xt = x.clone().requires_grad_()
    expected = torchvision.ops.roi_pool(xt, rois, (5, 4), scale)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    for name, xl in layouts(x):
        xl = xl.detach().requires_grad_()
        out = roi_pool(xl, rois, (5, 4), scale)
        out.backward(grad)
        torch.testing.assert_close(out, expected, atol=0, rtol=0, msg=f"output, {name}")
        torch.testing.assert_close(xl.grad, xt.grad, atol=0, rtol=0, msg=f"gradient, {name}")


def test_infinite_lowest_and_nan_features_match_torchvision():
    """-inf, -FLT_MAX and NaN never beat torchvision's starting -FLT_MAX: such bins give -FLT_MAX and argmax -1.
    Also boxes inside the map (the fast path with no fix-up) next to boxes that leave it, in the same size group."""
    torch.manual_seed(1)
    lowest = torch.finfo(torch.float32).min
    x = torch.randn(2, 3, 12, 12)
    x[0, 0, :6, :6] = float("-inf")  # whole bins of -inf
    x[0, 1, :6, :6] = lowest
    x[0, 2, :6, :6] = float("nan")
    x[1, :, 2:9, 3:7] = float("nan")
    x[1, 0, 5, 5] = 2.0  # one real value among NaNs
    rois = torch.tensor([[0, 0, 0, 5, 5], [0, 0, 0, 11, 11], [0, -4, -4, 3, 3], [1, 1, 1, 10, 10],
                         [1, 3, 3, 9, 9], [1, 20, 20, 25, 25], [0, 6, 6, 11, 11]], dtype=torch.float32)
    for features in (x, torch.randn(2, 3, 12, 12)):  # with and without such values
        expected, expected_arg = torch.ops.torchvision.roi_pool(features, rois, 1.0, 3, 3)
        out, arg = torch.ops.roikit.roi_pool(features, rois, 1.0, 3, 3, "torchvision")
        torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
        assert torch.equal(arg.long(), expected_arg.long())
        if features is x:  # the case is what it says: bins left at -FLT_MAX, and bins off the map
            assert bool((expected == lowest).any()) and bool((expected_arg == -1).any())


@pytest.mark.parametrize("rounding", ["torchvision", "integer"])
def test_matches_naive_loop(rounding, make_rois):
    torch.manual_seed(1)
    x = torch.randn(2, 2, 11, 9, dtype=torch.float64).round()  # many ties
    rois = make_rois(k=30, size=(11, 9), scale=0.5, dtype=torch.float64)
    expected, expected_arg = naive.roi_pool(x, rois, (3, 4), 0.5, rounding)
    xg = x.clone().requires_grad_()
    out = roi_pool(xg, rois, (3, 4), 0.5, rounding)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_grad = torch.zeros_like(x)
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        for c in range(2):
            for p in range(3):
                for q in range(4):
                    a = int(expected_arg[k, c, p, q])
                    if a >= 0:
                        expected_grad[b, c, a // 9, a % 9] += grad[k, c, p, q]
    torch.testing.assert_close(xg.grad, expected_grad, atol=1e-12, rtol=0)


def test_integer_rounding_665px_box_at_stride_32_by_hand():
    # 665 / 32 = 20.78 -> 20 cells; 20 / 7 = 2.86 -> 2 cells per bin; the bins read cells 0..13 only.
    columns = torch.arange(24, dtype=torch.float32).expand(1, 1, 24, 24)  # value = column index
    rows = columns.transpose(2, 3)
    box = torch.tensor([[0, 0.0, 0.0, 665.0, 665.0]])
    out = roi_pool(columns, box, 7, 1 / 32, rounding="integer")
    # the max of bin j is its last column: 2 j + 1
    assert out[0, 0, 0].tolist() == [1, 3, 5, 7, 9, 11, 13]
    assert roi_pool(rows, box, 7, 1 / 32, rounding="integer")[0, 0, :, 0].tolist() == [1, 3, 5, 7, 9, 11, 13]
    # torchvision's rule: round(20.78) = 21, size 21 - 0 + 1 = 22 cells, bin 3.14: bin j ends at ceil(3.14 (j + 1))
    tv = roi_pool(columns, box, 7, 1 / 32, rounding="torchvision")
    assert tv[0, 0, 0].tolist() == [3, 6, 9, 12, 15, 18, 21]


def test_integer_rounding_small_box_reads_one_cell_per_bin():
    # a 3-cell box: floor(3 / 7) = 0 -> at least 1 cell per bin, so bins 3..6 read past the box
    columns = torch.arange(12, dtype=torch.float32).expand(1, 1, 12, 12)
    out = roi_pool(columns, torch.tensor([[0, 32.0, 32.0, 32.0 + 100, 32.0 + 100]]), 7, 1 / 32, rounding="integer")
    assert out[0, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("rounding", ["torchvision", "integer"])
def test_gradient_goes_to_the_argmax_and_keeps_the_sum(rounding):
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 8.0, 4.0, 24.0, 30.0], [0, 0.0, 0.0, 31.0, 31.0]], dtype=torch.float64)
    out = roi_pool(x, rois, 3, 0.5, rounding)
    grad = torch.rand_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad.sum(), grad.sum())  # no empty bin here
    for c in range(2):  # each bin's gradient sits where its output value sits
        hits = x.grad[0, c] != 0
        assert set(x.detach()[0, c][hits].tolist()) <= set(out.detach()[:, c].flatten().tolist())


@pytest.mark.parametrize("rounding", ["torchvision", "integer"])
def test_gradcheck(rounding, make_rois):
    x = torch.randperm(2 * 2 * 7 * 8, dtype=torch.float64).reshape(2, 2, 7, 8) / 10  # distinct: no ties
    x.requires_grad_()
    rois = make_rois(k=5, size=(7, 8), dtype=torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (2, 3), 0.5, rounding), (x,))


def test_empty_bins_give_zero_and_no_gradient():
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    rois = torch.tensor([[0, 100.0, 100.0, 120.0, 120.0]])  # wholly outside: every bin is empty
    out = roi_pool(x, rois, 2)
    assert not out.any()
    out.sum().backward()
    assert not x.grad.any()


def test_half_and_bfloat16(make_rois):
    x = torch.randn(2, 3, 13, 17)
    rois = make_rois(dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        out = roi_pool(x.to(dtype), rois.to(dtype), 3, 0.5)
        torch.testing.assert_close(out, torchvision.ops.roi_pool(x.to(dtype).float(), rois.to(dtype).float(), 3,
                                                                 0.5).to(dtype), atol=0, rtol=0)


def test_module_repr():
    expected = "RoIPool(output_size=(7, 7), spatial_scale=0.03125, rounding='integer')"
    assert repr(RoIPool(7, 1 / 32, "integer")) == expected
