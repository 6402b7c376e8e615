"""roi_align against torchvision (the oracle for pool="avg") and against a naive loop (pool="max")."""
import naive
import pytest
import torch
import torchvision

from roikit.ops import RoIAlign, roi_align


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchvision(aligned, sampling_ratio, dtype, make_rois, layouts):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 17, dtype=dtype)
    # torchvision's CPU kernel crashes on reversed boxes with aligned=True and adaptive sampling (a negative
    # sample count sizes a vector); that case is checked against the naive loop below instead.
    rois = make_rois(dtype=dtype, reversed_boxes=not (aligned and sampling_ratio <= 0))
    xt = x.clone().requires_grad_()
    expected = torchvision.ops.roi_align(xt, rois, (5, 4), 0.5, sampling_ratio, aligned)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, xl in layouts(x):
        xl = xl.detach().requires_grad_()
        out = roi_align(xl, rois, (5, 4), 0.5, sampling_ratio, aligned)
        out.backward(grad)
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol, msg=f"output, {name}")
        torch.testing.assert_close(xl.grad, xt.grad, atol=tol, rtol=tol, msg=f"gradient, {name}")


def test_reversed_box_aligned_adaptive_is_zero():
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    rois = torch.tensor([[0, 10.0, 10.0, 2.0, 3.0]], dtype=torch.float64)
    expected, _ = naive.roi_align(x, rois, (3, 3), 0.5, 0, True)
    out = roi_align(x, rois, 3, 0.5, 0, True)
    assert torch.equal(out, expected) and not out.any()


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_max_pool_matches_naive_loop(aligned, sampling_ratio, make_rois):
    torch.manual_seed(1)
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    rois = make_rois(k=10, size=(9, 11), dtype=torch.float64)
    expected, taps = naive.roi_align(x, rois, (3, 2), 0.5, sampling_ratio, aligned, pool="max")
    xg = x.clone().requires_grad_()
    out = roi_align(xg, rois, (3, 2), 0.5, sampling_ratio, aligned, pool="max")
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_grad = torch.zeros_like(x)
    for (k, c, p, q), ts in taps.items():
        for b, i, j, wt in ts:
            expected_grad[b, c, i, j] += wt * grad[k, c, p, q]
    torch.testing.assert_close(xg.grad, expected_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(pool, aligned, make_rois):
    torch.manual_seed(2)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = make_rois(k=6, size=(6, 7), dtype=torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (3, 2), 0.5, 2, aligned, pool), (x,))


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_gradient_sum_is_kept_inside_the_map(pool):
    # every sample inside the map: an average spreads each bin's gradient with weights summing to 1, the max
    # sends it to one sample's 4 bilinear taps (also summing to 1)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 4.0, 6.0, 30.0, 28.0], [0, 2.5, 2.5, 36.0, 20.0]], dtype=torch.float64)
    out = roi_align(x, rois, 7, 0.5, 2, True, pool)
    grad = torch.rand_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad.sum(), grad.sum())


def test_half_and_bfloat16_accumulate_in_float32(make_rois):
    torch.manual_seed(4)
    x = torch.randn(2, 4, 13, 17)
    rois = make_rois(dtype=torch.float32)
    ref = roi_align(x, rois, 7, 0.5, 2, True)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        out = roi_align(x.to(dtype), rois.to(dtype), 7, 0.5, 2, True)
        assert out.dtype == dtype
        # the boxes themselves are rounded to the low precision type: compare with float32 on those boxes
        ref = roi_align(x.to(dtype).float(), rois.to(dtype).float(), 7, 0.5, 2, True)
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_list_of_boxes_equals_tensor_and_empty():
    x = torch.randn(2, 3, 10, 10)
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[1.0, 2.0, 9.0, 7.0], [3.0, 3.0, 4.0, 4.0]])]
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [1, 1.0, 2.0, 9.0, 7.0], [1, 3.0, 3.0, 4.0, 4.0]])
    torch.testing.assert_close(roi_align(x, boxes, 3), roi_align(x, rois, 3), atol=0, rtol=0)
    empty = roi_align(x, torch.zeros(0, 5), (3, 4))
    assert empty.shape == (0, 3, 3, 4)
    xg = x.clone().requires_grad_()
    roi_align(xg, [torch.zeros(0, 4), torch.zeros(0, 4)], 3).sum().backward()
    assert xg.grad is not None and not xg.grad.any()


def test_module_repr_and_forward():
    m = RoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    assert repr(m) == "RoIAlign(output_size=(7, 7), spatial_scale=0.0625, sampling_ratio=2, aligned=True, pool='avg')"
    x = torch.randn(1, 2, 20, 20)
    rois = torch.tensor([[0, 10.0, 20.0, 200.0, 150.0]])
    torch.testing.assert_close(m(x, rois), torchvision.ops.roi_align(x, rois, 7, 1 / 16, 2, True))


@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_reversed_aligned_boxes_partly_off_the_map_match_torchvision(sampling_ratio):
    """aligned=True keeps a reversed box's negative size: its samples run backwards across the map edge, and the
    ones on the map must still be found (the sample search was written for rising positions first)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 4, 4, -9, -5], [0, 6, 7, 1, -3], [0, 20, 20, 3, 3]], dtype=torch.float64)
    xt = x.detach().clone().requires_grad_()
    expected = torchvision.ops.roi_align(xt, rois, 3, 1.0, sampling_ratio, True)
    out = roi_align(x, rois, 3, 1.0, sampling_ratio, True)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, xt.grad, atol=1e-12, rtol=1e-12)
    assert expected.abs().sum() > 0  # the case reads the map
