"""Spatial pyramid pooling: whole maps (SpatialPyramidPooling) and per RoI (roi_spp)."""
import pytest
import torch
import torch.nn.functional as F

from roikit.layers.spp import SpatialPyramidPooling, adaptive_bins, spatial_pyramid_pool, sppnet_bins
from roikit.ops import RoISPP, roi_pool, roi_spp


def test_adaptive_bins_by_hand():
    assert adaptive_bins(10, 7) == [(0, 2), (1, 3), (2, 5), (4, 6), (5, 8), (7, 9), (8, 10)]
    assert adaptive_bins(14, 7) == [(2 * i, 2 * i + 2) for i in range(7)]
    assert adaptive_bins(5, 7) == [(0, 1), (0, 2), (1, 3), (2, 3), (2, 4), (3, 5), (4, 5)]


def test_adaptive_bins_are_torchs_rule():
    # pool a map whose value is the column index: the max of bin i is its last column, the min its first
    for size in (5, 7, 10, 13, 50):
        cols = torch.arange(size, dtype=torch.float32).expand(1, 1, 1, size)
        hi = F.adaptive_max_pool2d(cols, (1, 7))[0, 0, 0].tolist()
        lo = (-F.adaptive_max_pool2d(-cols, (1, 7)))[0, 0, 0].tolist()
        assert [(int(a), int(b) + 1) for a, b in zip(lo, hi)] == adaptive_bins(size, 7)


def test_sppnet_bins_by_hand():
    assert sppnet_bins(13, 3) == [(0, 5), (4, 9), (8, 13)]  # window 5, stride 4 (SPPnet's 13x13 conv5)
    assert sppnet_bins(7, 4) == [(0, 2), (1, 3), (2, 4), (3, 5)]  # cells 5 and 6 never read
    with pytest.raises(ValueError, match="at least 4 cells"):
        sppnet_bins(3, 4)


@pytest.mark.parametrize("size", [(13, 13), (20, 31), (4, 4), (57, 9)])
def test_spp_gives_21_bins_per_channel_for_any_size(size):
    x = torch.randn(2, 16, *size)
    spp = SpatialPyramidPooling()
    out = spp(x)
    assert out.shape == (2, 16 * 21) == (2, *spp.output_shape(16))
    assert torch.equal(out[:, :16], x.amax(dim=(2, 3)))  # level 1: the global max
    assert torch.equal(out[:, 16:16 + 64], F.adaptive_max_pool2d(x, 2).reshape(2, -1))


def test_sppnet_rule_pools_its_windows():
    x = torch.randn(1, 3, 13, 13)
    out = spatial_pyramid_pool(x, levels=(3,), mode="avg", bins="sppnet").reshape(1, 3, 3, 3)
    torch.testing.assert_close(out[0, :, 1, 2], x[0, :, 4:9, 8:13].mean(dim=(1, 2)))
    expected = "SpatialPyramidPooling(levels=(1, 2, 4), mode='max', bins='sppnet')"
    assert repr(SpatialPyramidPooling(bins="sppnet")) == expected


def test_roi_spp_is_roi_pool_at_each_level_concatenated():
    x = torch.randn(2, 4, 20, 24, requires_grad=True)
    rois = torch.tensor([[0, 8.0, 4.0, 60.0, 70.0], [1, 0.0, 0.0, 90.0, 75.0], [1, 30.0, 30.0, 31.0, 32.0]])
    out = roi_spp(x, rois, spatial_scale=0.25, rounding="integer")
    assert out.shape == (3, 4 * 50)
    expected = torch.cat([roi_pool(x, rois, n, 0.25, "integer").reshape(3, -1) for n in (1, 2, 3, 6)], 1)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.sum().backward()
    assert x.grad.sum() == 3 * 4 * 50  # every bin non-empty: each sends 1 to its argmax
    m = RoISPP(levels=(1, 2, 4), spatial_scale=0.25)
    assert m(x, rois).shape == (3, *m.output_shape(4)) == (3, 84)


def test_bad_levels():
    with pytest.raises(ValueError, match="levels"):
        roi_spp(torch.randn(1, 1, 4, 4), torch.zeros(0, 5), levels=(1, 0))
