"""prroi_pool against a dense numerical integral of the bilinear surface; gradients by gradcheck."""
import naive
import pytest
import torch

from roikit.ops import PrRoIPool, prroi_pool


@pytest.mark.parametrize("aligned", [False, True])
def test_matches_numerical_integral(aligned, make_rois, layouts):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    rois = make_rois(k=8, size=(9, 11), scale=0.5, dtype=torch.float64)
    expected = naive.prroi_pool(x, rois, (3, 2), 0.5, aligned, steps=300)
    for name, xl in layouts(x):
        out = prroi_pool(xl, rois, (3, 2), 0.5, aligned)
        # the midpoint rule is exact on each bilinear piece up to its kinks: O(1 / steps^2) error
        torch.testing.assert_close(out, expected, atol=4e-5, rtol=0, msg=name)


def test_constant_map_by_hand():
    # on a constant map the surface is the constant wherever the box lies between the first and last cell
    x = torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 1.5, 6.5, 7.0]], dtype=torch.float64)
    assert torch.allclose(prroi_pool(x, rois, 4, 1.0), torch.full((1, 2, 4, 4), 3.0, dtype=torch.float64))
    # past the last cell (x = 7) the surface falls linearly to 0 at x = 8: a bin over [7, 8] averages 1.5
    edge = torch.tensor([[0, 7.0, 0.0, 8.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(prroi_pool(x, edge, 1, 1.0), torch.tensor(1.5, dtype=torch.float64))


def test_reversed_and_empty_boxes_give_zero():
    x = torch.randn(1, 1, 5, 5)
    rois = torch.tensor([[0, 4.0, 4.0, 1.0, 1.0], [0, 2.0, 2.0, 2.0, 4.0]])
    assert not prroi_pool(x, rois, 2).any()
    assert prroi_pool(x, torch.zeros(0, 5), 2).shape == (0, 1, 2, 2)


@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck_features_and_box_coordinates(aligned, make_rois):
    torch.manual_seed(1)
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    rois = make_rois(k=5, size=(7, 8), scale=0.5, dtype=torch.float64, seed=2, reversed_boxes=False)
    rois = rois[3:]  # keep boxes with positive size (the gradient is 0 through a clamp at zero size)
    index, coords = rois[:, :1], rois[:, 1:].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, b: prroi_pool(t, torch.cat([index, b], 1), (2, 3), 0.5, aligned),
                                    (x, coords))


def test_box_gradient_of_a_ramp_by_hand():
    # f(y, x) = x on an 8 x 8 map; a 1 x 1 bin over [x1, x2] averages (x1 + x2) / 2, so d/dx1 = d/dx2 = 1/2
    x = torch.arange(8, dtype=torch.float64).expand(1, 1, 8, 8).contiguous()
    coords = torch.tensor([[2.2, 1.0, 5.6, 4.0]], dtype=torch.float64, requires_grad=True)
    out = prroi_pool(x, torch.cat([torch.zeros(1, 1, dtype=torch.float64), coords], 1), 1, 1.0)
    torch.testing.assert_close(out.flatten(), torch.tensor([3.9], dtype=torch.float64))
    out.sum().backward()
    torch.testing.assert_close(coords.grad, torch.tensor([[0.5, 0.0, 0.5, 0.0]], dtype=torch.float64))


def test_gradient_sum_is_kept_inside_the_map():
    x = torch.randn(1, 2, 12, 12, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 9.5, 10.0]], dtype=torch.float64)
    out = prroi_pool(x, rois, 7)
    g = torch.rand_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad.sum(), g.sum())


def test_half_precision_and_module():
    x = torch.randn(1, 3, 9, 9)
    rois = torch.tensor([[0, 1.0, 1.0, 7.0, 6.0]])
    ref = prroi_pool(x.half().float(), rois.half().float(), 3)
    torch.testing.assert_close(prroi_pool(x.half(), rois.half(), 3).float(), ref, atol=2e-3, rtol=2e-3)
    assert repr(PrRoIPool(7, 0.25)) == "PrRoIPool(output_size=(7, 7), spatial_scale=0.25, aligned=False)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_bins_give_the_surface_value(dtype):
    """A bin of 1e-7 cells, or any box at spatial_scale=1e-30, averages the surface over (almost) a point: the
    bilinear value there. On F[i, j] = 4 i + j + 1 (linear) that is 4 y + x + 1 at the box's centre, by hand.
    (The integral's difference HAT(hi) - HAT(lo) cancelled here: 0.204 for 0.418 in float32, 0 at 1e-30.)"""
    x = (torch.arange(16, dtype=dtype).reshape(1, 1, 4, 4) + 1)
    tiny = torch.tensor([[0, 1.3, 2.6, 1.3 + 1e-7, 2.6 + 1e-7]], dtype=dtype)
    out = prroi_pool(x, tiny, 1, 1.0)
    cx, cy = (tiny[0, 1].double() + tiny[0, 3].double()) / 2, (tiny[0, 2].double() + tiny[0, 4].double()) / 2
    torch.testing.assert_close(out.double().flatten(), (4 * cy + cx + 1).reshape(1), rtol=1e-6, atol=0)
    far = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0], [0, 1.3e30, 2.6e30, 1.5e30, 2.7e30]], dtype=dtype)
    out = prroi_pool(x, far, 1, 1e-30)
    cx, cy = (far[1, 1].double() + far[1, 3].double()) / 2e30, (far[1, 2].double() + far[1, 4].double()) / 2e30
    torch.testing.assert_close(out.double().flatten(), torch.stack([torch.tensor(1.0, dtype=torch.float64),
                                                                    4 * cy + cx + 1]), rtol=1e-6, atol=0)
