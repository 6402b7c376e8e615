"""The pooling family: backward rules of torch's pooling, stochastic pooling, bilinear pooling.

Every expected value is computed by hand or by a plain loop, never by the code under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from roikit.layers.basic_pool import (
    AdaptivePool2d,
    GlobalPool,
    OverlappingMaxPool2d,
    Pool2d,
    adaptive_pool2d,
    global_pool2d,
    overlapping_max_pool2d,
    pool2d,
)
from roikit.layers.bilinear_pool import (
    BilinearPool,
    CompactBilinearPool,
    bilinear_pool,
    compact_bilinear_pool,
    tensor_sketch_hashes,
)
from roikit.layers.stochastic_pool import StochasticPool2d, stochastic_pool2d


def t(rows, dtype=torch.float64):
    """A [1, 1, H, W] map from nested lists."""
    return torch.tensor(rows, dtype=dtype)[None, None]


def input_grad(fn, x, g):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.backward(g.to(out.dtype).reshape(out.shape))
    return out.detach(), x.grad


G22 = t([[1.0, 2.0], [3.0, 4.0]])  # upstream gradient of a 2x2 output, sum 10


# ---------------------------------------------------------------- max / average pooling: backward rules


def test_avg_pool_divides_each_bins_gradient_by_its_size_and_spreads_it():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    out, grad = input_grad(lambda v: pool2d(v, 2, mode="avg"), x, G22)
    assert torch.equal(out, t([[2.5, 4.5], [10.5, 12.5]]))  # (0+1+4+5)/4, ...
    expected = t([[0.25, 0.25, 0.50, 0.50],
                  [0.25, 0.25, 0.50, 0.50],
                  [0.75, 0.75, 1.00, 1.00],
                  [0.75, 0.75, 1.00, 1.00]])
    assert torch.equal(grad, expected)
    assert grad.sum().item() == G22.sum().item()  # non-overlapping windows keep the sum


def test_max_pool_sends_a_bins_whole_gradient_to_its_argmax():
    x = t([[1, 9, 2, 3],
           [4, 0, 8, 5],
           [7, 6, 1, 2],
           [0, 3, 4, 11]])
    out, grad = input_grad(lambda v: Pool2d(2, mode="max")(v), x, G22)
    assert torch.equal(out, t([[9, 8], [7, 11]]))
    expected = t([[0, 1, 0, 0],   # 9 is the max of the top-left window: g = 1
                  [0, 0, 2, 0],   # 8, top-right: g = 2
                  [3, 0, 0, 0],   # 7, bottom-left: g = 3
                  [0, 0, 0, 4]])  # 11, bottom-right: g = 4
    assert torch.equal(grad, expected)
    assert grad.sum().item() == G22.sum().item()


def test_max_pool_tie_gives_the_gradient_to_a_single_cell():
    x = torch.full((1, 1, 2, 2), 5.0, dtype=torch.float64)
    _, grad = input_grad(lambda v: pool2d(v, 2), x, t([[3.0]]))
    assert (grad != 0).sum().item() == 1 and grad.sum().item() == 3.0


def test_overlapping_avg_pool_shared_cells_get_the_sum_of_their_windows_shares():
    # kernel 3 stride 2 on 5x5: windows rows/cols [0, 3) and [2, 5); row 2 and column 2 are shared
    x = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    _, ones_grad = input_grad(lambda v: pool2d(v, 3, 2, mode="avg"), x, torch.ones(2, 2))
    windows_per_cell = t([[1, 1, 2, 1, 1],
                          [1, 1, 2, 1, 1],
                          [2, 2, 4, 2, 2],
                          [1, 1, 2, 1, 1],
                          [1, 1, 2, 1, 1]])
    assert torch.allclose(ones_grad, windows_per_cell / 9, rtol=0, atol=1e-15)

    _, grad = input_grad(lambda v: pool2d(v, 3, 2, mode="avg"), x, G22)
    expected = t([[1, 1, 1 + 2, 2, 2],  # (sum of g over the windows holding the cell) / 9
                  [1, 1, 1 + 2, 2, 2],
                  [1 + 3, 1 + 3, 1 + 2 + 3 + 4, 2 + 4, 2 + 4],
                  [3, 3, 3 + 4, 4, 4],
                  [3, 3, 3 + 4, 4, 4]]) / 9
    assert torch.allclose(grad, expected, rtol=0, atol=1e-15)
    # every window still hands out exactly g_w over its 9 cells: the sum is kept (90 / 9 = 10)
    assert grad.sum().item() == pytest.approx(10.0, abs=1e-12)


def test_overlapping_max_pool_a_cell_that_wins_several_windows_gets_all_their_gradients():
    x = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    x[0, 0, 2, 2] = 2.0  # the centre is in all four windows and is their max
    out, grad = input_grad(OverlappingMaxPool2d(), x, G22)
    assert torch.equal(out, torch.full((1, 1, 2, 2), 2.0, dtype=torch.float64))
    expected = torch.zeros_like(x)
    expected[0, 0, 2, 2] = 1 + 2 + 3 + 4
    assert torch.equal(grad, expected)  # the sum is kept, but concentrated on one cell


def test_overlapping_pool_cells_outside_every_window_get_no_gradient():
    # 6x6 under kernel 3 stride 2: windows start at 0 and 2, so row 5 and column 5 are never read
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    for mode in ("avg", "max"):
        _, grad = input_grad(lambda v: pool2d(v, 3, 2, mode=mode), x, G22)
        assert torch.equal(grad[0, 0, 5, :], torch.zeros(6, dtype=torch.float64))
        assert torch.equal(grad[0, 0, :, 5], torch.zeros(6, dtype=torch.float64))
        assert grad.sum().item() == pytest.approx(10.0, abs=1e-12)


def test_avg_pool_padding_loses_gradient_only_with_count_include_pad():
    # 3x3 kernel, stride 1, padding 1 on a 3x3 map: 9 windows, each divides by 9 (padding counted) or by its
    # number of real cells (4 at a corner, 6 on an edge, 9 in the centre)
    x = torch.rand(1, 1, 3, 3, dtype=torch.float64)
    g = torch.ones(3, 3)
    _, grad = input_grad(lambda v: pool2d(v, 3, 1, 1, mode="avg", count_include_pad=True), x, g)
    windows_per_cell = t([[4, 6, 4], [6, 9, 6], [4, 6, 4]])
    assert torch.allclose(grad, windows_per_cell / 9, rtol=0, atol=1e-15)
    assert grad.sum().item() == pytest.approx(49 / 9)  # < 9: the padded cells' shares are dropped

    _, grad = input_grad(lambda v: pool2d(v, 3, 1, 1, mode="avg", count_include_pad=False), x, g)
    # cell (0, 0) is in windows with 4, 6, 6, 9 real cells
    assert grad[0, 0, 0, 0].item() == pytest.approx(1 / 4 + 2 / 6 + 1 / 9)
    assert grad.sum().item() == pytest.approx(9.0)


def test_global_avg_pool_divides_by_h_times_w_and_global_max_picks_the_argmax():
    x = torch.rand(1, 2, 3, 5, dtype=torch.float64)
    x[0, 1, 2, 4] = 7.0
    g = torch.tensor([[2.0, 3.0]])
    out, grad = input_grad(GlobalPool("avg"), x, g)
    assert out.shape == (1, 2) and torch.allclose(out, x.mean((2, 3)))
    assert torch.allclose(grad[0, 0], torch.full((3, 5), 2 / 15, dtype=torch.float64))
    assert torch.allclose(grad[0, 1], torch.full((3, 5), 3 / 15, dtype=torch.float64))

    out, grad = input_grad(lambda v: global_pool2d(v, "max", keepdim=True), x, g)
    assert out.shape == (1, 2, 1, 1) and out[0, 1, 0, 0].item() == 7.0
    assert grad[0, 1, 2, 4].item() == 3.0 and (grad[0, 1] != 0).sum().item() == 1
    assert grad[0, 0].sum().item() == 2.0 and (grad[0, 0] != 0).sum().item() == 1


def test_adaptive_avg_pool_bins_overlap_when_the_size_does_not_divide():
    # H = 5 into 3 bins: [floor(iH/3), ceil((i+1)H/3)) = [0, 2), [1, 4), [3, 5)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64).view(1, 1, 5, 1)
    out, grad = input_grad(AdaptivePool2d((3, 1)), x, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(out.flatten(), torch.tensor([1.5, 3.0, 4.5], dtype=torch.float64))
    expected = torch.tensor([1 / 2, 1 / 2 + 2 / 3, 2 / 3, 2 / 3 + 3 / 2, 3 / 2], dtype=torch.float64)
    assert torch.allclose(grad.flatten(), expected)
    assert grad.sum().item() == pytest.approx(6.0)
    assert torch.equal(adaptive_pool2d(x, (3, 1), "max").flatten(), torch.tensor([2.0, 4.0, 5.0], dtype=torch.float64))


def test_overlapping_max_pool_is_alexnets_pooling():
    x = torch.randn(2, 3, 55, 55)
    layer = OverlappingMaxPool2d()
    assert isinstance(layer, nn.MaxPool2d)
    assert layer(x).shape == (2, 3, 27, 27)
    assert torch.equal(layer(x), F.max_pool2d(x, 3, 2))
    assert torch.equal(overlapping_max_pool2d(x), F.max_pool2d(x, 3, 2))
    assert "kernel_size=3, stride=2" in repr(layer)
    with pytest.raises(ValueError, match="stride must be smaller than kernel_size"):
        OverlappingMaxPool2d(2, 2)
    with pytest.raises(ValueError, match="stride must be smaller"):
        overlapping_max_pool2d(x, 3, 3)


def test_basic_pool_bad_input_and_reprs():
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        GlobalPool("mean")
    with pytest.raises(ValueError, match="input must be 4-D"):
        pool2d(x[0], 2)
    with pytest.raises(ValueError, match="kernel_size must be"):
        pool2d(x, 0)
    with pytest.raises(ValueError, match="padding must be at most half"):
        pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="floating-point"):
        global_pool2d(torch.ones(1, 1, 2, 2, dtype=torch.long))
    assert repr(GlobalPool("max")) == "GlobalPool(mode='max')"
    assert repr(Pool2d(3, 2, mode="avg")) == "Pool2d(mode='avg', kernel_size=(3, 3), stride=(2, 2), padding=(0, 0))"
    assert repr(AdaptivePool2d(7)) == "AdaptivePool2d(output_size=(7, 7), mode='avg')"


# ---------------------------------------------------------------- stochastic pooling


def test_stochastic_pool_samples_each_cell_with_probability_proportional_to_its_value():
    n = 20_000
    # 20,000 copies of the window [[0, 1], [2, 3]] side by side: p = 0, 1/6, 2/6, 3/6
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).repeat(1, n).view(1, 1, 2, 2 * n)
    out = stochastic_pool2d(x, 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 1, 1, n)
    counts = torch.stack([(out == v).sum() for v in (0.0, 1.0, 2.0, 3.0)]).double()
    assert counts[0].item() == 0  # a zero activation is never drawn
    p = torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64)
    expected = n * p
    # each count is Binomial(n, p_i): within 5 standard errors sqrt(n p (1 - p)) (about 53 to 71 draws)
    assert ((counts[1:] - expected).abs() <= 5 * (n * p * (1 - p)).sqrt()).all(), counts
    # Pearson chi-square with 2 degrees of freedom: P(chi2 > c) = exp(-c / 2), so c = 2 ln(1e6) for p = 1e-6
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum().item()
    assert chi2 < 2 * math.log(1e6), chi2


def test_stochastic_pool_window_of_zeros_gives_zero():
    x = torch.tensor([[[[0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]]]])
    for seed in range(5):
        out = stochastic_pool2d(x, 2, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out, torch.tensor([[[[0.0, 4.0]]]]))
    assert torch.equal(stochastic_pool2d(x, 2, training=False), torch.tensor([[[[0.0, 4.0]]]]))


def test_stochastic_pool_eval_is_the_probability_weighted_average():
    x = t([[1, 2, 0, 5, 0, 0, 2, 2],
           [3, 4, 0, 0, 0, 0, 2, 2]], dtype=torch.float32)
    expected = torch.tensor([[[[(1 + 4 + 9 + 16) / 10, 5.0, 0.0, 2.0]]]])  # sum a^2 / sum a per window
    assert torch.allclose(stochastic_pool2d(x, 2, training=False), expected)
    layer = StochasticPool2d(2).eval()
    assert torch.allclose(layer(x), expected)
    # the weighted average has a finite gradient everywhere, zero windows included
    xg = x.double().requires_grad_(True)
    stochastic_pool2d(xg, 2, training=False).sum().backward()
    assert torch.isfinite(xg.grad).all()
    # d/da_j (sum a^2 / S) = (2 a_j S - sum a^2) / S^2: for [[1, 2], [3, 4]], S = 10, sum a^2 = 30
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert torch.allclose(xg.grad[0, 0, :, :2], (2 * a * 10 - 30) / 100)
    assert torch.equal(xg.grad[0, 0, :, 4:6], torch.zeros(2, 2, dtype=torch.float64))  # the zero window


def test_stochastic_pool_same_generator_seed_same_output():
    x = torch.rand(2, 3, 16, 16)
    a = stochastic_pool2d(x, 2, generator=torch.Generator().manual_seed(7))
    b = stochastic_pool2d(x, 2, generator=torch.Generator().manual_seed(7))
    c = stochastic_pool2d(x, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    layer = StochasticPool2d(2)
    assert layer.training and torch.equal(layer(x, torch.Generator().manual_seed(7)), a)


def test_stochastic_pool_gradient_is_one_at_the_picked_cell_and_zero_elsewhere():
    # distinct positive values, so the output value tells which cell was drawn
    x = (torch.randperm(2 * 3 * 6 * 8).double() + 1).view(2, 3, 6, 8).requires_grad_(True)
    out = stochastic_pool2d(x, 2, generator=torch.Generator().manual_seed(3))
    out.backward(torch.ones_like(out))
    picked = (x.detach() == F.interpolate(out.detach(), scale_factor=2, mode="nearest")).double()
    assert picked.sum().item() == out.numel()  # one drawn cell per window
    assert torch.equal(x.grad, picked)

    # overlapping windows (kernel 3, stride 2): a cell drawn by two windows gets both gradients
    x2 = torch.rand(1, 1, 5, 5, dtype=torch.float64).requires_grad_(True)
    out2 = stochastic_pool2d(x2, 3, 2, generator=torch.Generator().manual_seed(0))
    out2.backward(torch.ones_like(out2))
    assert x2.grad.sum().item() == 4.0 and set(x2.grad.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_stochastic_pool_bad_input():
    with pytest.raises(ValueError, match=">= 0"):
        stochastic_pool2d(torch.tensor([[[[1.0, -0.5], [2.0, 3.0]]]]), 2)
    with pytest.raises(ValueError, match=">= 0"):
        stochastic_pool2d(torch.tensor([[[[1.0, float("nan")], [2.0, 3.0]]]]), 2, training=False)
    with pytest.raises(ValueError, match="kernel_size"):
        stochastic_pool2d(torch.rand(1, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="stride"):
        stochastic_pool2d(torch.rand(1, 1, 4, 4), 2, stride=0)
    with pytest.raises(ValueError, match="generator"):
        stochastic_pool2d(torch.rand(1, 1, 4, 4), 2, generator=0)
    assert repr(StochasticPool2d(3, 2)) == "StochasticPool2d(kernel_size=(3, 3), stride=(2, 2))"
    assert stochastic_pool2d(torch.rand(0, 3, 4, 4), 2).shape == (0, 3, 2, 2)


# ---------------------------------------------------------------- bilinear pooling


def bilinear_loop(x, y):
    """mean_p x[n, i, p] y[n, j, p] by plain loops, flattened as i * C2 + j."""
    n, c1, h, w = x.shape
    c2 = y.shape[1]
    out = torch.zeros(n, c1 * c2, dtype=torch.float64)
    for b in range(n):
        for i in range(c1):
            for j in range(c2):
                s = 0.0
                for r in range(h):
                    for c in range(w):
                        s += x[b, i, r, c].item() * y[b, j, r, c].item()
                out[b, i * c2 + j] = s / (h * w)
    return out


def test_bilinear_pool_equals_the_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64)
    b = bilinear_loop(x, y)
    assert torch.allclose(bilinear_pool(x, y, signed_sqrt=False, l2_normalize=False), b)
    assert torch.allclose(bilinear_pool(x, signed_sqrt=False, l2_normalize=False), bilinear_loop(x, x))
    root = torch.sign(b) * b.abs().sqrt()
    assert torch.allclose(bilinear_pool(x, y, eps=0.0), root / root.norm(dim=1, keepdim=True))
    assert torch.allclose(BilinearPool(eps=0.0)(x, y), root / root.norm(dim=1, keepdim=True))


def test_bilinear_signed_sqrt_and_l2_norm_properties():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    b = bilinear_pool(x, signed_sqrt=False, l2_normalize=False)
    z = bilinear_pool(x, eps=0.0)
    assert torch.allclose(z.norm(dim=1), torch.ones(3, dtype=torch.float64))  # unit rows
    assert torch.equal(torch.sign(z), torch.sign(b))  # signs kept
    # z^2 is proportional to |b|: the square root flattens large entries (burstiness)
    assert torch.allclose(z ** 2, b.abs() / b.abs().sum(1, keepdim=True))
    # symmetric pooling gives a symmetric matrix with a non-negative diagonal (mean of x_i^2)
    m = b.view(3, 4, 4)
    assert torch.allclose(m, m.transpose(1, 2)) and (torch.diagonal(m, dim1=1, dim2=2) >= 0).all()


def test_compact_bilinear_pool_is_the_tensor_sketch_of_the_full_features():
    # Tensor Sketch = count sketch of B with hash (h1(i) + h2(j)) mod D and sign s1(i) s2(j): check the FFT path
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)
    b = bilinear_loop(x, y).view(2, 3, 4)
    for d in (5, 8):  # odd and even sizes (irfft needs n)
        h1, s1, h2, s2 = tensor_sketch_hashes(3, 4, d, seed=11)
        expected = torch.zeros(2, d, dtype=torch.float64)
        for i in range(3):
            for j in range(4):
                expected[:, (h1[i] + h2[j]) % d] += s1[i].item() * s2[j].item() * b[:, i, j]
        for method in ("fft", "direct", "auto"):
            got = compact_bilinear_pool(x, y, d, seed=11, signed_sqrt=False, l2_normalize=False, method=method)
            assert torch.allclose(got, expected, atol=1e-12), method
    with pytest.raises(ValueError, match="method must be one of"):
        compact_bilinear_pool(x, y, 8, method="svd")


def test_compact_bilinear_methods_agree_with_gradients():
    """The FFT and the direct route compute the same sketch; their gradients agree too (RoI-like sizes)."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 16, 7, 7, generator=g, dtype=torch.float64)
    grads = {}
    for method in ("fft", "direct"):
        leaf = x.clone().requires_grad_()
        # no signed square root: with its eps it jumps at 0, where the direct route's empty bins are exact
        # zeros and the FFT's are 1e-17 either side
        z = compact_bilinear_pool(leaf, output_dim=256, seed=4, signed_sqrt=False, method=method)
        (z * torch.arange(256, dtype=torch.float64)).sum().backward()
        grads[method] = (z.detach(), leaf.grad)
    torch.testing.assert_close(grads["fft"][0], grads["direct"][0])
    torch.testing.assert_close(grads["fft"][1], grads["direct"][1])


def _sketch_variance(a, b, d):
    """Variance of <TS(A), TS(B)> with fully random hashes, to leading order in 1/D.

    Pairs of terms survive the sign average when they share both entries (||A||^2 ||B||^2 and <A, B>^2, as for any
    count sketch) or share a row or a column of the outer product, whose hashes collide together (||A^T B||^2,
    tr((A^T B)^2), ||A B^T||^2, tr((A B^T)^2)). Terms sharing a row *and* a column are counted twice, so this
    slightly over-estimates (by about 1/C). Each term is at most ||A||^2 ||B||^2: var <= 6 ||A||^2 ||B||^2 / D.
    """
    m, n = a.T @ b, a @ b.T
    terms = ((a.norm() * b.norm()) ** 2 + (a * b).sum() ** 2 + (m * m).sum() + (m * m.T).sum()
             + (n * n).sum() + (n * n.T).sum())
    return terms.item() / d


def test_compact_bilinear_inner_products_approximate_the_full_ones():
    c, d = 32, 8192  # 1,024 full features sketched into 8,192
    x = torch.randn(6, c, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64).relu()
    full = bilinear_pool(x, signed_sqrt=False, l2_normalize=False)
    compact = compact_bilinear_pool(x, output_dim=d, seed=0, signed_sqrt=False, l2_normalize=False)
    true, est = full @ full.T, compact @ compact.T  # 21 distinct pairs, self products included
    norms = full.norm(dim=1)
    # sd <= sqrt(6 / D) ||A|| ||B|| (2.7 % of ||A|| ||B|| at D = 8192). For non-negative features the error is
    # heavy-tailed (over 300 seeds, 1 % of the draws of one self product lie beyond 3.9 sd, the worst at 6.2 sd),
    # so allow 6 of these worst-case sd; this seed's worst pair uses 71 % of it.
    bound = 6 * math.sqrt(6 / d) * norms[:, None] * norms[None, :]
    assert ((est - true).abs() <= bound).all(), ((est - true).abs() / bound).max()
    # the angles are kept too: cosine similarities of the compact features within 0.1 of the full ones
    cos_full = true / (norms[:, None] * norms[None, :])
    cos_compact = est / (compact.norm(dim=1)[:, None] * compact.norm(dim=1)[None, :])
    assert (cos_full - cos_compact).abs().max() < 0.1


def test_compact_bilinear_estimator_is_unbiased_with_the_predicted_variance():
    c, d, seeds = 16, 512, 48  # 48 independent sketches of the same pair
    x = torch.randn(2, c, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64).relu()
    full = bilinear_pool(x, signed_sqrt=False, l2_normalize=False)
    true = (full[0] @ full[1]).item()
    var = _sketch_variance(full[0].view(c, c), full[1].view(c, c), d)
    assert var <= 6 * (full[0].norm() * full[1].norm()).item() ** 2 / d
    errors = torch.tensor([
        (lambda z: (z[0] @ z[1]).item())(compact_bilinear_pool(x, output_dim=d, seed=s, signed_sqrt=False,
                                                                l2_normalize=False)) - true
        for s in range(seeds)
    ], dtype=torch.float64)
    assert abs(errors.mean().item()) <= 4 * math.sqrt(var / seeds)  # mean within 4 standard errors of 0
    # mean squared error / predicted variance: about 0.8 in expectation (the prediction over-counts); over 40
    # batches of 48 seeds it ranged 0.38 to 1.39
    ratio = errors.pow(2).mean().item() / var
    assert ratio < 2.0, ratio


def test_bilinear_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(2, 3, 2, 2, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    y = (torch.rand(2, 2, 2, 2, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: bilinear_pool(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a: bilinear_pool(a), (x,))
    # compact: sketch entries can sit near 0 where the signed square root is steep, so check it without the root
    assert torch.autograd.gradcheck(
        lambda a, b: compact_bilinear_pool(a, b, output_dim=16, signed_sqrt=False), (x, y))


def test_compact_bilinear_module_stores_its_hashes():
    layer = CompactBilinearPool(4, 3, output_dim=64, seed=5)
    assert set(layer.state_dict()) == {"h1", "s1", "h2", "s2"}
    x, y = torch.rand(2, 4, 3, 3), torch.rand(2, 3, 3, 3)
    assert torch.allclose(layer(x, y), compact_bilinear_pool(x, y, 64, seed=5))
    assert layer(x, y).shape == (2, 64)
    assert repr(layer) == ("CompactBilinearPool(in_channels1=4, in_channels2=3, output_dim=64, seed=5, "
                           "signed_sqrt=True, l2_normalize=True)")
    with pytest.raises(ValueError, match=r"y must be a Tensor\[N, 3, H, W\]"):
        layer(x)  # y = x has 4 channels, the hashes expect 3
    with pytest.raises(ValueError, match=r"x must be a Tensor\[N, 4, H, W\]"):
        layer(y, y)
    with pytest.raises(ValueError, match="output_dim"):
        CompactBilinearPool(4, output_dim=0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_low_precision_matches_float64(device, dtype, atol):
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    xl = x.to(dtype)
    pairs = [
        (stochastic_pool2d(xl, 2, training=False), stochastic_pool2d(x, 2, training=False)),
        (bilinear_pool(xl), bilinear_pool(x)),
        (compact_bilinear_pool(xl, output_dim=64, signed_sqrt=False), compact_bilinear_pool(x, output_dim=64,
                                                                                          signed_sqrt=False)),
    ]
    for low, ref in pairs:
        assert low.dtype == dtype and low.device == x.device
        assert torch.allclose(low.double(), ref, rtol=0, atol=atol), (low.double() - ref).abs().max()
    drawn = stochastic_pool2d(xl, 2, generator=torch.Generator(device=device).manual_seed(0))
    windows = F.unfold(xl.float(), 2, stride=2).view(2, 3, 4, 9)  # every output value is one of its window's
    assert (windows == drawn.float().view(2, 3, 1, 9)).any(2).all()


def test_bilinear_bad_input():
    with pytest.raises(ValueError, match="y must have x's batch size and H, W"):
        bilinear_pool(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 4, 3))
    with pytest.raises(ValueError, match="x must be 4-D"):
        bilinear_pool(torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="hashes must have shapes"):
        compact_bilinear_pool(torch.rand(1, 2, 3, 3), output_dim=8, hashes=tensor_sketch_hashes(3, 3, 8))
    with pytest.raises(ValueError, match=r"lie in \[0, output_dim\)"):
        compact_bilinear_pool(torch.rand(1, 2, 3, 3), output_dim=4, hashes=tensor_sketch_hashes(2, 2, 8))
    assert repr(BilinearPool()) == "BilinearPool(signed_sqrt=True, l2_normalize=True)"


@pytest.mark.parametrize("call, flag", [
    (lambda x: pool2d(x, 2, ceil_mode="False"), "ceil_mode"),
    (lambda x: pool2d(x, 2, mode="avg", count_include_pad=0), "count_include_pad"),
    (lambda x: global_pool2d(x, keepdim="no"), "keepdim"),
    (lambda x: OverlappingMaxPool2d(3, 2, ceil_mode=1), "ceil_mode"),
    (lambda x: bilinear_pool(x, signed_sqrt="False"), "signed_sqrt"),
    (lambda x: BilinearPool(l2_normalize=None), "l2_normalize"),
    (lambda x: stochastic_pool2d(x.abs(), 2, training="False"), "training"),
])
def test_flags_must_be_bools(call, flag):
    """A string like "False" is truthy: every boolean setting must be a bool."""
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        call(torch.randn(1, 2, 4, 4))
