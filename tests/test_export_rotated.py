"""ONNX export of roi_align_rotated (standard operators, a Scan over chunks of boxes) and of a RoIPooler with
op="roi_align_rotated" over a two-level pyramid, run in plain onnxruntime.

The oracle is the PyTorch op on the same inputs (tested against mmcv's and detectron2's values and a naive loop in
tests/test_roi_align_rotated.py), plus a hand-worked 90-degree case. Errors stay at float32 rounding of the sample
positions (a position of ~70 cells is known to ~4e-6 cells; times the map's slope).
"""
import math

import numpy as np
import pytest
import torch
from _helpers import ort_session, quiet_onnx_export
from torch.export import Dim

from roikit.layers.poolers import RoIPooler
from roikit.ops import roi_align_rotated

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
rotated = pytest.importorskip("roikit.export._onnx_rotated")

MAX_ERROR = 2e-5  # float32 rounding of rotated sample positions (|values| up to ~4, slopes up to ~5 per cell)
SETTINGS = [(aligned, clockwise) for aligned in (True, False) for clockwise in (False, True)]
OUTPUT, SCALE, SAMPLING = (3, 4), 1 / 8, 2



class Rotated(torch.nn.Module):
    """Every (aligned, clockwise) setting in degrees, and aligned counterclockwise in radians, of one map."""

    def forward(self, x, boxes):
        outs = [roi_align_rotated(x, boxes, OUTPUT, SCALE, SAMPLING, aligned, clockwise)
                for aligned, clockwise in SETTINGS]
        in_radians = torch.cat([boxes[:, :5], boxes[:, 5:] * (math.pi / 180)], dim=1)
        return (*outs, roi_align_rotated(x, in_radians, OUTPUT, SCALE, SAMPLING, angle_unit="radians"))


def _boxes(k, size, seed):
    """(batch, cx, cy, w, h, angle) in pixels at stride 8: centres from 15% before to 15% past the map, sizes up to
    70% of it, angles 0, 90, 180, -45 then anything in [-200, 400); box 0 wholly off the map, box 1 of zero size."""
    g = torch.Generator().manual_seed(seed)
    extent = torch.tensor([size[1], size[0]]) / SCALE
    centre = torch.rand(k, 2, generator=g) * extent * 1.3 - 0.15 * extent
    wh = torch.rand(k, 2, generator=g) * extent * 0.7
    angle = torch.rand(k, 1, generator=g) * 600 - 200
    angle[:4, 0] = torch.tensor([0.0, 90.0, 180.0, -45.0])
    centre[0] = -3 * extent
    wh[1] = 0.0
    batch = torch.randint(0, 2, (k, 1), generator=g).float()
    return torch.cat([batch, centre, wh, angle], dim=1)


@pytest.fixture(scope="module")
def exported():
    """One export (dynamic box count and map size) with chunks of 3 boxes, so a Scan of several padded chunks."""
    x = torch.randn(2, 4, 13, 17, generator=torch.Generator().manual_seed(0))
    per_box = OUTPUT[0] * OUTPUT[1] * SAMPLING * SAMPLING * 4 * (x.shape[1] + 8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rotated, "CHUNK_VALUES", 3 * per_box)
        program = quiet_onnx_export(Rotated(), (x, _boxes(10, (13, 17), 0)),
                                dynamic_shapes={"x": {2: Dim("H"), 3: Dim("W")}, "boxes": {0: Dim("K")}})
    return program, ort_session(program)


def _check(session, x, boxes):
    outs = session.run(None, {"x": x.numpy(), "boxes": boxes.numpy()})
    with torch.no_grad():
        expected = Rotated()(x, boxes)
    assert len(outs) == len(expected)
    for out, want in zip(outs, expected):
        assert out.shape == tuple(want.shape)
        np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=MAX_ERROR)


def test_rotated_in_onnxruntime_matches_pytorch(exported):
    """Angles 0 / 90 / 180 / -45 and random, aligned and not, both directions, degrees and radians; boxes across,
    outside and on the map's edges; 10 boxes (4 chunks, the last padded), another map and count, no boxes."""
    program, session = exported
    assert {o.domain for o in program.model_proto.opset_import} <= {"", "ai.onnx"}  # standard ops only
    assert "Scan" in {node.op_type for node in program.model_proto.graph.node}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 13, 17, generator=g)
    _check(session, x, _boxes(10, (13, 17), 0))
    _check(session, torch.randn(2, 4, 9, 21, generator=g), _boxes(7, (9, 21), 1))
    _check(session, x, _boxes(4, (13, 17), 2)[:0])


def test_rotated_hand_worked_quarter_turn():
    """A 2 x 2-cell box centred on the middle of the 4 x 4 map ``arange(16)``, 2 x 2 bins, one sample each, turned
    by 90 degrees. Samples at box-frame ``(yy, xx) = (+-0.5, +-0.5)`` about the centre (1.5, 1.5) (aligned): turned
    counterclockwise ``(y, x) = (1.5 - xx, 1.5 + yy)``, so bin (0, 0) reads cell (2, 1) = 9, bin (0, 1) cell (1, 1)
    = 5, bin (1, 0) cell (2, 2) = 10, bin (1, 1) cell (1, 2) = 6; clockwise ``(1.5 + xx, 1.5 - yy)``."""
    class Turn(torch.nn.Module):
        def forward(self, x, boxes):
            return tuple(roi_align_rotated(x, boxes, 2, 1.0, 1, True, clockwise) for clockwise in (False, True))

    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    box = torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0, 90.0]])
    ccw, cw = ort_session(quiet_onnx_export(Turn(), (x, box))).run(None, {"x": x.numpy(), "boxes": box.numpy()})
    np.testing.assert_allclose(ccw[0, 0], [[9.0, 5.0], [10.0, 6.0]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(cw[0, 0], [[6.0, 10.0], [5.0, 9.0]], rtol=0, atol=1e-5)


def test_rotated_off_map_samples_read_nothing(exported):
    """A NaN in cell (0, 0): a box wholly off the map pools 0 (its samples read nothing), a box over the cell NaN,
    as in PyTorch."""
    _, session = exported
    x = torch.randn(2, 4, 13, 17, generator=torch.Generator().manual_seed(3))
    x[:, :, 0, 0] = float("nan")
    boxes = torch.tensor([[0.0, -100, -100, 40, 30, 30], [1, 8, 8, 30, 20, -45], [0, 60, 50, 40, 40, 90]])
    outs = session.run(None, {"x": x.numpy(), "boxes": boxes.numpy()})
    assert np.all(outs[0][0] == 0) and np.isnan(outs[0][1]).any() and not np.isnan(outs[0][2]).any()
    with torch.no_grad():
        for out, want in zip(outs, Rotated()(x, boxes)):
            np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=MAX_ERROR)  # NaN where PyTorch has NaN


def test_rotated_reads_nothing_it_cannot_read(exported):
    """An empty map pools zeros (as PyTorch); a batch index out of range, which eager mode refuses, pools zeros in
    onnxruntime instead of failing in Gather."""
    _, session = exported
    boxes = _boxes(5, (13, 17), 4)
    for size in ((0, 17), (13, 0)):
        x = torch.randn(2, 4, *size)
        _check(session, x, boxes)
    boxes[:, 0] = torch.tensor([0.0, 1, 2, -1, 7])
    x = torch.randn(2, 4, 13, 17, generator=torch.Generator().manual_seed(5))
    outs = session.run(None, {"x": x.numpy(), "boxes": boxes.numpy()})
    with torch.no_grad():
        expected = Rotated()(x, boxes[:2])
    for out, want in zip(outs, expected):
        np.testing.assert_allclose(out[:2], want.numpy(), rtol=0, atol=MAX_ERROR)
        assert np.all(out[2:] == 0)


def test_rotated_adaptive_sampling_is_refused():
    class Adaptive(torch.nn.Module):
        def forward(self, x, boxes):
            return roi_align_rotated(x, boxes, 7, SCALE, 0)

    with pytest.raises(ValueError, match=r"sampling_ratio=0 .* fixed sampling_ratio > 0"):
        quiet_onnx_export(Adaptive(), (torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 20, 20, 30, 10, 45]])))


# ---------------------------------------------------------------- a rotated RoIPooler over a pyramid
class Pyramid(torch.nn.Module):
    """RoIPooler(op="roi_align_rotated") over two levels (strides 8 and 16) of one 256 x 256 image."""

    def __init__(self):
        super().__init__()
        self.pooler = RoIPooler(["p3", "p4"], 7, 2, op="roi_align_rotated")

    def forward(self, p3, p4, boxes):
        return self.pooler({"p3": p3, "p4": p4}, [boxes], [(256, 256)])


def _pyramid_inputs(seed, k=12):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    boxes = torch.cat([torch.rand(k, 2, generator=g) * 300 - 20, torch.rand(k, 2, generator=g) * 250 + 4,
                       torch.rand(k, 1, generator=g) * 360 - 180], dim=1)
    boxes[0, 2:4], boxes[1, 2:4] = 40.0, 200.0  # level 3 (sqrt(w h) < 112) and level 4
    return maps, boxes


def test_rotated_pooler_two_levels_in_onnxruntime():
    """The FPN level rule on sqrt(w h), then roi_align_rotated per level: the same as PyTorch on other boxes
    of the traced count or another (the box count is dynamic)."""
    model = Pyramid().eval()
    maps, boxes = _pyramid_inputs(0)
    session = ort_session(quiet_onnx_export(model, (*maps, boxes),
                                     dynamic_shapes={"p3": None, "p4": None, "boxes": {0: Dim("K")}}))
    for seed, k in ((0, 12), (1, 12), (2, 5), (3, 20)):
        maps, boxes = _pyramid_inputs(seed, k)
        out = session.run(None, {"p3": maps[0].numpy(), "p4": maps[1].numpy(), "boxes": boxes.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, model(*maps, boxes).numpy(), rtol=0, atol=MAX_ERROR)


def test_rotated_pooler_exports_with_a_dynamic_box_count():
    """torch.export with the box count dynamic: the program traced on 12 boxes pools 5 and 20 as eager does."""
    model = Pyramid().eval()
    maps, boxes = _pyramid_inputs(0)
    program = torch.export.export(model, (*maps, boxes), strict=False,
                                  dynamic_shapes={"p3": None, "p4": None, "boxes": {0: Dim("K")}})
    for seed, k in ((1, 5), (2, 20)):
        maps, boxes = _pyramid_inputs(seed, k)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*maps, boxes), model(*maps, boxes), rtol=0, atol=0)
