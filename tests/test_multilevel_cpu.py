"""The CPU pyramid path (``multilevel_roi_align`` through the numba RoIAlign kernels, 8 channels or more) against
torchvision's ``MultiScaleRoIAlign``: the same output and the same gradient of every level, bit for bit in float32,
whether the boxes fall on one level, several, or leave levels empty; a level without boxes gets a zero gradient.
"""
from collections import OrderedDict

import pytest
import torch

from roikit.layers import RoIPooler
from roikit.ops.pytorch import jit

torchvision = pytest.importorskip("torchvision")

IMAGE = (128, 160)  # strides 4, 8, 16, 32: maps 32 x 40, 16 x 20, 8 x 10, 4 x 5
NAMES = ["p2", "p3", "p4", "p5"]


def _pyramid(channels=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return OrderedDict((name, torch.randn(2, channels, IMAGE[0] // s, IMAGE[1] // s, generator=g).to(dtype))
                       for name, s in zip(NAMES, (4, 8, 16, 32)))


def _boxes(sides, seed=0):
    """Boxes of the given sides (px) at random places, alternating between the 2 images, as a list per image."""
    g = torch.Generator().manual_seed(seed)
    sides = torch.tensor(sides, dtype=torch.float32)
    xy = torch.rand(len(sides), 2, generator=g) * 60
    boxes = torch.cat([xy, xy + sides[:, None] * torch.tensor([1.0, 0.8])], dim=1)
    return [boxes[0::2], boxes[1::2]]


def _run(pooler, feats, boxes, grad_seed=5):
    leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in feats.items())
    out = pooler(leaves, boxes, [IMAGE] * 2)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(grad)
    return out.detach(), [leaves[k].grad for k in NAMES]


@pytest.mark.parametrize("sides", [
    [20.0, 30, 40, 50, 60, 25],  # every box on the finest level: its call's result is the output
    [20.0, 120, 230, 600, 60, 250, 300, 700],  # every level
    [240.0, 300, 260],  # the two middle levels: the finest and the coarsest get zero gradients
])
@pytest.mark.parametrize("output", [7, (5, 3)])
def test_numba_pyramid_equals_multiscale_roi_align(sides, output):
    feats = _pyramid()
    boxes = _boxes(sides)
    ours, theirs = RoIPooler(NAMES, output, 2, "roi_align"), torchvision.ops.MultiScaleRoIAlign(NAMES, output, 2)
    assert jit.enabled()
    out, grads = _run(ours, feats, boxes)
    expected, expected_grads = _run(theirs, feats, boxes)
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape and torch.equal(got, want)
    levels = theirs.map_levels(boxes)
    for level, got in enumerate(grads):  # a level without boxes: exactly zero
        if not (levels == level).any():
            assert not got.any()


def test_numba_pyramid_bfloat16_within_rounding_of_float32():
    feats = _pyramid()
    boxes = _boxes([20.0, 120, 230, 500])
    pooler = RoIPooler(NAMES, 7, 2, "roi_align")
    out32, grads32 = _run(pooler, feats, boxes)
    out16, grads16 = _run(pooler, OrderedDict((k, v.bfloat16()) for k, v in feats.items()), boxes)
    assert out16.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads16)
    torch.testing.assert_close(out16.float(), out32, atol=0.05, rtol=0.02)
    for g16, g32 in zip(grads16, grads32):
        torch.testing.assert_close(g16.float(), g32, atol=0.05, rtol=0.02)


def test_fresh_tensor_is_zero_and_writable():
    for dtype in jit.FRESH_DTYPES:
        t = jit.fresh_tensor((3, 1000, 1500), dtype)  # 4.5 M values: numpy asks for huge pages
        assert t.dtype == dtype and t.shape == (3, 1000, 1500) and not t.any()
        t[1, 2, 3] = 2.0
        assert t.sum().item() == 2.0


def test_each_level_picks_its_own_read_path_with_torchvision_bits(monkeypatch):
    # one small box on the finest level (copying its cells beats transposing the level), many large boxes on the
    # coarser ones (they read the level's cells many times over: transposing it wins): both paths in one call
    feats = _pyramid(channels=24)
    sides = [20.0] + [240.0, 300, 520, 700, 600] * 8
    boxes = _boxes(sides, seed=4)
    taken = []

    def spy(cells, input):
        taken.append((input.shape[-2:], original(cells, input)))
        return taken[-1][1]

    original = jit._use_channels_last
    monkeypatch.setattr(jit, "_use_channels_last", spy)
    ours, theirs = RoIPooler(NAMES, 7, 2, "roi_align"), torchvision.ops.MultiScaleRoIAlign(NAMES, 7, 2)
    expected, expected_grads = _run(theirs, feats, boxes)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            taken.clear()
            out, grads = _run(ours, feats, boxes)
            assert torch.equal(out, expected)
            assert all(torch.equal(got, want) for got, want in zip(grads, expected_grads))
            assert (torch.Size([32, 40]), False) in taken  # the finest level: per-box copies
            assert any(path for _, path in taken)  # a coarser level: channels-last blocks
    finally:
        torch.set_num_threads(before)
