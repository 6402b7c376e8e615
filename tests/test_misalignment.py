"""Box misalignment measures: boxes whose answers are worked out by hand, and the batched path against the whole map.

Pixel model: cell (u, v) at stride s covers [v s, (v + 1) s) x [u s, (u + 1) s), centre ((v + .5) s, (u + .5) s).
"""
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from _helpers import load_tool

from roikit.analysis import misalignment as mis
from roikit.analysis.misalignment_report import bin_weights
from roikit.analysis.reference import exact_bin_means, stride_map
from roikit.analysis.rules import DEFAULT_RULES, STUDY_RULES, Rule, get_rule, make_rules
from roikit.ops.geometry import bin_edges

ALL = make_rules(list(STUDY_RULES))  # the detector poolers and ps_roi_pool
NAMES = [r.name for r in ALL]


def measure(boxes, image_hw, stride, p=7, **kw):
    boxes = np.asarray(boxes, dtype=np.float64)
    res = mis.measure_boxes(boxes, np.tile(image_hw, (len(boxes), 1)), ALL, stride, p, dtype=torch.float64, **kw)
    return {name: {m: v[r] for m, v in res.items()} for r, name in enumerate(NAMES)}


def mean_distance(ex, ey):
    """Mean over the P x P bins of sqrt(ex[q]^2 + ey[p]^2): per-axis errors -> the 2-D bin-centre error."""
    ex, ey = np.asarray(ex, float), np.asarray(ey, float)
    return float(np.sqrt(ex[None, :] ** 2 + ey[:, None] ** 2).mean())


def test_box_on_the_grid_by_hand():
    # stride 16, box [32, 256) on both axes: cells 2..15 (14 cells), 7 bins of exactly 2 cells = 32 px.
    # Exact bin centres: 32 + 32 p + 16 = 48 + 32 p.
    r = measure([[32, 32, 256, 256]], (640, 640), 16)
    # integer rounding: start 2, 14 cells, bin 2 -> bin p = cells [2 + 2p, 4 + 2p): centre (3 + 2p) 16 = exact.
    assert r["roi_pool_integer"]["centre_px"][0] == pytest.approx(0, abs=1e-9)
    assert r["roi_pool_integer"]["iou"][0] == pytest.approx(1.0)
    # RoIAlign aligned, 2 samples per bin: samples at cells 2 + 2p + i exactly (bilinear weight 1 on one cell).
    assert r["roi_align_aligned"]["centre_px"][0] == pytest.approx(0, abs=1e-9)
    assert r["roi_align_aligned"]["iou"][0] == pytest.approx(1.0)
    # torchvision rounding: round(2) = 2, round(16) = 16, 16 - 2 + 1 = 15 cells (the extra end cell), bin 15/7:
    # bin p = [floor(15p/7), ceil(15(p+1)/7)) + 2 = [2 + 2p, 5 + 2p): 3 cells, centre (4 + 2p) 16 = exact + 8 px
    # on both axes -> 8 sqrt(2); reads cells 2..16 = 240 px: IoU 224^2 / 240^2.
    tv = r["roi_pool_torchvision"]
    assert tv["centre_px"][0] == pytest.approx(8 * math.sqrt(2))
    assert tv["centre_rel"][0] == pytest.approx(8 * math.sqrt(2) / 224)
    assert tv["iou"][0] == pytest.approx(224**2 / 240**2)
    # the unaligned sampler: samples at 2.5 + 2p + i in cells, whose weighted centre in pixels is
    # (2.5 + 2p + i + .5) 16: half a cell (8 px) late on both axes; its taps read cells 2..16 as well.
    un = r["roi_align_unaligned"]
    assert un["centre_px"][0] == pytest.approx(8 * math.sqrt(2))
    assert un["iou"][0] == pytest.approx(224**2 / 240**2)
    # prroi_pool (unaligned: cell i's value sits at point i): the same half-cell shift; it integrates over
    # [2, 16] in cells, whose hats reach cells 2..16 (cell 1's hat ends at 2).
    assert r["prroi_pool"]["centre_px"][0] == pytest.approx(8 * math.sqrt(2))
    assert r["prroi_pool"]["iou"][0] == pytest.approx(224**2 / 240**2)
    # aligned prroi_pool: exact centres; [1.5, 15.5] touches the hats of cells 1..16 = 256 px.
    assert r["prroi_pool_aligned"]["centre_px"][0] == pytest.approx(0, abs=1e-9)
    assert r["prroi_pool_aligned"]["iou"][0] == pytest.approx(224**2 / 256**2)
    for name in NAMES:
        assert r[name]["empty_bins"][0] == 0


def test_665px_box_at_stride_32_by_hand():
    # 665 / 32 = 20.78 cells. Exact bins: 95 px, centres 47.5 + 95 p.
    r = measure([[0, 0, 665, 665]], (1024, 1024), 32)
    exact = 47.5 + 95 * np.arange(7)
    # integer: floor(20.78) = 20 cells, floor(20 / 7) = 2 cells per bin: bins [2p, 2p + 2) cover 14 cells = 448 px.
    w = bin_weights(ALL[NAMES.index("roi_pool_integer")], [[0, 0, 665, 665]], (1024, 1024), 32)[0]
    cols_read = torch.nonzero(w.sum(dim=(0, 1, 2)) > 0).squeeze(1).tolist()
    assert cols_read == list(range(14))
    assert [int((w[0, q].sum(0) > 0).sum()) for q in range(7)] == [2] * 7  # each bin 2 cells wide
    integer = r["roi_pool_integer"]
    e = (2 * np.arange(7) + 1) * 32 - exact  # -15.5, -46.5, ..., -201.5
    assert integer["centre_px"][0] == pytest.approx(mean_distance(e, e))
    assert integer["iou"][0] == pytest.approx(448**2 / 665**2)  # 0.454: the cells lie inside the box
    # torchvision: round(20.78) = 21, 21 - 0 + 1 = 22 cells = 704 px, bin 22 / 7 = 3.14:
    # [0,4) [3,7) [6,10) [9,13) [12,16) [15,19) [18,22): centres 1.5 + 3p cells = 64 + 96 p px.
    w = bin_weights(ALL[NAMES.index("roi_pool_torchvision")], [[0, 0, 665, 665]], (1024, 1024), 32)[0]
    assert int((w.sum(dim=(0, 1, 2)) > 0).sum()) == 22
    tv = r["roi_pool_torchvision"]
    e = 64 + 96 * np.arange(7) - exact  # 16.5 ... 22.5
    assert tv["centre_px"][0] == pytest.approx(mean_distance(e, e))
    assert tv["iou"][0] == pytest.approx(665**2 / 704**2)


def test_box_half_a_cell_off_the_grid_by_hand():
    # stride 16, box [40, 264): 2.5 .. 16.5 cells. Exact centres 56 + 32 p.
    r = measure([[40, 40, 264, 264]], (640, 640), 16)
    # integer: floor(2.5) = 2, floor(14) = 14 cells: the same cells as the box on the grid, 8 px early.
    assert r["roi_pool_integer"]["centre_px"][0] == pytest.approx(8 * math.sqrt(2))
    # cells [32, 256) against [40, 264): intersection 216^2.
    assert r["roi_pool_integer"]["iou"][0] == pytest.approx(216**2 / (2 * 224**2 - 216**2))
    # torchvision: round(2.5) = 3 (half away from zero), round(16.5) = 17, 15 cells: bins [3 + 2p, 6 + 2p),
    # centre (5 + 2p) 16 = exact + 16 px; cells [48, 288).
    tv = r["roi_pool_torchvision"]
    assert tv["centre_px"][0] == pytest.approx(16 * math.sqrt(2))
    assert tv["iou"][0] == pytest.approx(216**2 / (224**2 + 240**2 - 216**2))
    assert r["roi_align_aligned"]["centre_px"][0] == pytest.approx(0, abs=1e-9)
    assert r["roi_align_unaligned"]["centre_px"][0] == pytest.approx(8 * math.sqrt(2))


@pytest.mark.parametrize("stride", [4, 8, 32])
def test_samplers_off_the_grid(stride):
    # Bilinear interpolation reproduces linear functions, so away from the map's edges RoIAlign's weighted centre
    # is the mean of its sample positions: aligned exact, unaligned half a cell late on both axes.
    boxes = [[101.3, 77.7, 180.9, 250.2], [150.0, 140.5, 190.25, 181.0]]
    r = measure(boxes, (480, 640), stride)
    assert r["roi_align_aligned"]["centre_px"] == pytest.approx([0, 0], abs=1e-9)
    assert r["roi_align_unaligned"]["centre_px"] == pytest.approx([stride / 2 * math.sqrt(2)] * 2)


def test_unaligned_sampler_stretches_a_box_under_one_cell():
    # aligned=False forces a box to at least 1 x 1 cell: a 13.25 x 10.5 px box at stride 32 is sampled as 32 x 32 px
    # from its corner, so bin p's centre is x1 + (p + .5) 32 / 7 + 16 (half a cell late) instead of
    # x1 + (p + .5) 13.25 / 7.
    r = measure([[150.0, 140.5, 163.25, 151.0]], (480, 640), 32)
    p = np.arange(7) + 0.5
    dx, dy = 16 + p * (32 - 13.25) / 7, 16 + p * (32 - 10.5) / 7
    assert r["roi_align_unaligned"]["centre_px"][0] == pytest.approx(mean_distance(dx, dy))


def test_empty_bins_at_the_far_edge():
    # A 9 px box at the right edge of a 640 px image, stride 32: round(630 / 32) = 20 = the map's width, so every
    # torchvision bin lies past the map: clipped to nothing. Such bins have no centre; the box counts as all-empty.
    r = measure([[630, 100, 639, 140]], (480, 640), 32)
    assert r["roi_pool_torchvision"]["empty_bins"][0] == 1.0
    assert np.isnan(r["roi_pool_torchvision"]["centre_px"][0])
    assert r["roi_pool_torchvision"]["iou"][0] == 0.0


def whole_map_reference(rule, boxes, image_hw, stride, p):
    """The measures from bin_weights on the image's whole map: the explicit per-bin gradient, no windows."""
    w = bin_weights(rule, boxes, image_hw, stride, p)  # [K, P, P, h, w]
    b = torch.as_tensor(boxes, dtype=torch.float64)
    mass = w.sum(dim=(3, 4))
    u = torch.arange(w.shape[3], dtype=torch.float64)
    v = torch.arange(w.shape[4], dtype=torch.float64)
    cy = (w.sum(4) * u).sum(3) / mass
    cx = (w.sum(3) * v).sum(3) / mass
    g = (torch.arange(p, dtype=torch.float64) + 0.5) / p
    dy = (cy + 0.5) * stride - (b[:, 1:2] + g * (b[:, 3:4] - b[:, 1:2]))[:, :, None]
    dx = (cx + 0.5) * stride - (b[:, 0:1] + g * (b[:, 2:3] - b[:, 0:1]))[:, None, :]
    ok = mass > 1e-6
    centre = torch.where(ok, (dx**2 + dy**2).sqrt(), 0).sum((1, 2)) / ok.sum((1, 2))
    total = w.sum(dim=(1, 2))
    read = total > mis.READ_THRESHOLD * total.flatten(1).amax(1)[:, None, None]
    cells_y = torch.arange(w.shape[3], dtype=torch.float64) * stride
    cells_x = torch.arange(w.shape[4], dtype=torch.float64) * stride
    oy = (torch.minimum(cells_y + stride, b[:, 3:4]) - torch.maximum(cells_y, b[:, 1:2])).clamp(min=0)
    ox = (torch.minimum(cells_x + stride, b[:, 2:3]) - torch.maximum(cells_x, b[:, 0:1])).clamp(min=0)
    inter = torch.einsum("kuv,ku,kv->k", read.double(), oy, ox)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return centre.numpy(), (inter / (area + read.sum((1, 2)) * stride**2 - inter)).numpy()


def random_boxes(rng, k, h, w):
    x1, y1 = rng.uniform(-5, w, k), rng.uniform(-5, h, k)
    bw, bh = np.exp(rng.uniform(0, np.log(w), k)), np.exp(rng.uniform(0, np.log(h), k))
    b = np.stack([x1, y1, x1 + bw, y1 + bh], 1)
    b[:4, 2] = w  # on the right edge
    b[4:8, 3] = h  # on the bottom edge
    b[8] = [0, 0, w, h]  # the whole image
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    return b[(b[:, 2] - b[:, 0] > 0.5) & (b[:, 3] - b[:, 1] > 0.5)]


@pytest.mark.parametrize("stride,p", [(8, 7), (16, 3)])
def test_windows_and_moments_match_the_whole_map(stride, p):
    # measure_boxes moves every box to a small window and reads centres from the op on coordinate maps; the
    # reference uses the explicit per-bin gradient on each image's whole map. Several image sizes, boxes on the
    # edges, and a tiny chunk budget so that boxes of different windows share chunks.
    rng = np.random.default_rng(stride)
    sets = [(hw, random_boxes(rng, 14, *hw)) for hw in ((100, 75), (64, 130), (37, 41))]
    boxes = np.concatenate([b for _, b in sets])
    image_hw = np.concatenate([np.tile(hw, (len(b), 1)) for hw, b in sets])
    res = mis.measure_boxes(boxes, image_hw, ALL, stride, p, dtype=torch.float64, budget=2500)
    start = 0
    for hw, b in sets:
        part = slice(start, start + len(b))
        start += len(b)
        for r, rule in enumerate(ALL):
            centre, iou = whole_map_reference(rule, b, hw, stride, p)
            np.testing.assert_allclose(res["centre_px"][r, part], centre, atol=1e-9, err_msg=rule.name)
            np.testing.assert_allclose(res["iou"][r, part], iou, atol=1e-12, err_msg=rule.name)


def test_roi_pool_bins_read_from_the_op_are_bin_edges():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 20, 90, 70)
    rois = torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), torch.from_numpy(boxes)], 1)
    for rounding in ("torchvision", "integer"):
        rule = Rule("r", "roi_pool", rounding=rounding)
        w = bin_weights(rule, boxes, (90, 70), 8, 5)  # [K, 5, 5, 12, 9]
        (hs, he), (ws, we) = bin_edges(rois, 1 / 8, (5, 5), rounding, (12, 9))
        rows = torch.arange(12)
        cols = torch.arange(9)
        expect_rows = (rows >= hs[..., None]) & (rows < he[..., None])  # [K, 5, 12]
        expect_cols = (cols >= ws[..., None]) & (cols < we[..., None])
        expected = expect_rows[:, :, None, :, None] & expect_cols[:, None, :, None, :]
        assert torch.equal(w > 0, expected), rounding


def test_ps_roi_pool_by_hand():
    # 665 px box at stride 32: round(20.78) = 21 cells, no +1: bins of exactly 3 cells [3p, 3p + 3), centres
    # (3p + 1.5) 32 = 96p + 48 against 95p + 47.5: p + 0.5 px late on each axis; reads 21 cells = 672 px.
    ps = measure([[0, 0, 665, 665]], (1024, 1024), 32)["ps_roi_pool"]
    e = np.arange(7) + 0.5
    assert ps["centre_px"][0] == pytest.approx(mean_distance(e, e))
    assert ps["iou"][0] == pytest.approx(665**2 / 672**2) and ps["coverage"][0] == pytest.approx(1.0)
    # The far edge: a 120 px image has 4 cells at stride 32; box [40, 120): round(1.25) = 1, round(3.75) = 4,
    # 3 cells, one bin [1, 4), clipped to [1, 3): torchvision's forward never reads the last cell. Its centre is
    # cell 2.0 = 64 px against 80 px; it reads [32, 96) px: IoU 56^2 / (80^2 + 64^2 - 56^2).
    ps = measure([[40, 40, 120, 120]], (120, 120), 32, p=1)["ps_roi_pool"]
    assert ps["centre_px"][0] == pytest.approx(16 * math.sqrt(2))
    assert ps["iou"][0] == pytest.approx(56**2 / (80**2 + 64**2 - 56**2))


def test_ps_roi_pool_rectangles_are_what_torchvision_averages():
    # bin_weights (the study's rectangles, from geometry.ps_roi_pool_edges) against torchvision's forward on a
    # random map copied into P * P channels; boxes on every edge, where the last row and column are never read.
    import torchvision

    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 20, 90, 70)
    w = bin_weights(get_rule("ps_roi_pool"), boxes, (90, 70), 8, 3)  # [K, 3, 3, 12, 9]
    fmap = torch.from_numpy(rng.standard_normal((1, 1, 12, 9)))
    rois = torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), torch.from_numpy(boxes)], 1)
    expected = torchvision.ops.ps_roi_pool(fmap.repeat(1, 9, 1, 1), rois, 3, 1 / 8)[:, 0]
    torch.testing.assert_close(torch.einsum("kpquv,uv->kpq", w, fmap[0, 0]), expected)
    # the crop error pools whole maps with those rectangles: it must be the op's own output
    exact = torch.zeros(len(boxes), 3, 3, 1, dtype=torch.float64)
    errors = mis.crop_errors(fmap, np.zeros(len(boxes), int), boxes, make_rules(["ps_roi_pool"]), 8, exact, 3,
                             dtype=torch.float64)
    np.testing.assert_allclose(errors[0], expected.abs().mean(dim=(1, 2)).numpy(), atol=1e-12)


def test_stride_map_averages_the_pixels_of_each_cell():
    picture = torch.from_numpy(np.random.default_rng(0).random((37, 50, 3))).permute(2, 0, 1)[None]
    fmap = stride_map(picture, 16)
    assert fmap.shape == (1, 3, 3, 4) and fmap.dtype == torch.float64
    assert torch.allclose(fmap[0, :, 1, 2], picture[0, :, 16:32, 32:48].mean((1, 2)))
    assert torch.allclose(fmap[0, :, 2, 3], picture[0, :, 32:37, 48:50].mean((1, 2)))  # a partial cell


def test_exact_bin_means_against_pixel_overlaps():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (23, 17, 3)).astype(np.uint8)
    boxes = np.array([[3.3, 5.7, 16.2, 21.9], [0, 0, 17, 23], [10, 10, 11.5, 10.25]])
    got = exact_bin_means([img], np.zeros(3, int), boxes, 3).numpy()
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        for i in range(3):
            for j in range(3):
                ya, yb = y1 + i * (y2 - y1) / 3, y1 + (i + 1) * (y2 - y1) / 3
                xa, xb = x1 + j * (x2 - x1) / 3, x1 + (j + 1) * (x2 - x1) / 3
                oy = (np.minimum(np.arange(23) + 1, yb) - np.maximum(np.arange(23), ya)).clip(0)
                ox = (np.minimum(np.arange(17) + 1, xb) - np.maximum(np.arange(17), xa)).clip(0)
                expected = np.einsum("y,x,yxc->c", oy, ox, img.astype(float)) / ((yb - ya) * (xb - xa))
                np.testing.assert_allclose(got[k, i, j], expected, atol=1e-9)


def test_crop_error_on_a_ramp_by_hand():
    # Image value = x (0..255). The exact mean of a bin [xa, xb) with whole-pixel edges is (xa + xb - 1) / 2 and a
    # stride-8 cell holds 8 v + 3.5: both are "centre - 0.5", so a rule whose bin averages the ramp with weights
    # centred dx px off the true centre is off by exactly |dx| grey levels.
    # Box [16, 128) at stride 8: cells 2..15, 7 bins of 2 cells; torchvision reads 3 cells a bin (+4 px),
    # the unaligned samplers are half a cell (+4 px) late, integer rounding and aligned RoIAlign are exact, and so
    # is ps_roi_pool (round(2) = 2, round(16) = 16: 14 cells, no +1, bins of 2).
    img = np.repeat(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 256, 0), 3, 2)
    boxes = np.array([[16.0, 16.0, 128.0, 128.0]])
    exact = exact_bin_means([img], np.zeros(1, int), boxes, 7)
    maps = stride_map(torch.from_numpy(img).permute(2, 0, 1)[None], 8)
    assert maps.shape == (1, 3, 32, 32) and maps[0, 0, 0, :3].tolist() == [3.5, 11.5, 19.5]
    errors = mis.crop_errors(maps, np.zeros(1, int), boxes, ALL, 8, exact, 7, dtype=torch.float64)[:, 0]
    expected = {"roi_pool_torchvision": 4, "roi_pool_integer": 0, "roi_align_aligned": 0, "roi_align_unaligned": 4,
                "prroi_pool": 4, "prroi_pool_aligned": 0, "ps_roi_pool": 0}
    assert dict(zip(NAMES, errors)) == pytest.approx(expected, abs=1e-9)


def write_coco(path, annotations, images=({"id": 1, "file_name": "a.png", "width": 64, "height": 48},)):
    path.write_text(json.dumps({"images": list(images), "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def ann(i, bbox, **kw):
    return {"id": i, "image_id": 1, "category_id": 1, "bbox": bbox, "iscrowd": 0, **kw}


def test_crowd_zero_area_and_outside_boxes_are_counted(tmp_path):
    path = write_coco(tmp_path / "a.json", [
        ann(1, [4, 4, 20, 20]),
        ann(2, [5, 5, 30, 30], iscrowd=1),  # crowd: skipped
        ann(3, [10, 10, 0, 12]),  # zero width: skipped
        ann(4, [70, 10, 5, 5]),  # right of the 64 px image: skipped
        ann(5, [50, 40, 20, 20]),  # partly outside: clipped to [50, 40, 64, 48]
    ])
    boxes = mis.load_coco_boxes(path)
    assert boxes.counts == {"annotations": 5, "measured": 2, "crowd": 1, "zero_area": 1, "outside": 1, "clipped": 1,
                            "subsampled": 0}
    np.testing.assert_array_equal(boxes.boxes, [[4, 4, 24, 24], [50, 40, 64, 48]])
    np.testing.assert_array_equal(boxes.ann_ids, [1, 5])
    assert mis.load_coco_boxes(path, max_boxes=1).counts["subsampled"] == 1


CATS = [{"id": 1, "name": "thing"}]


@pytest.mark.parametrize("content,message", [  # the data set's own checks (roikit.data.coco.read_annotation_file)
    ("{not json", "malformed JSON"),
    ("[]", "expected a JSON object at the top level"),
    (json.dumps({"images": [], "annotations": []}), "missing or non-list key 'categories'"),
    (json.dumps({"images": [{"id": 1}], "annotations": [], "categories": CATS}), r"image #0 \(id 1\) needs an int"),
    (json.dumps({"images": [], "annotations": [ann(1, [0, 0, 1, 1])], "categories": CATS}), "unknown image id"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 9, "height": 9}],
                 "annotations": [ann(1, [0, 0, 1])], "categories": CATS}), "4 finite numbers"),
])
def test_malformed_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        mis.load_coco_boxes(path)


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown rule"):
        make_rules(["roi_pool"])
    with pytest.raises(ValueError, match="explained by tools/explain.py, not measured"):
        make_rules(["ps_roi_align"])
    with pytest.raises(ValueError, match="stride"):
        mis.measure_boxes(np.zeros((0, 4)), np.zeros((0, 2)), ALL, 0)
    with pytest.raises(ValueError, match="x2 > x1"):
        mis.measure_boxes([[5, 5, 5, 9]], [[10, 10]], ALL, 4)


def run_tool(capsys, *argv):
    tool = load_tool("misalignment")
    code = tool.main(tool.get_args_parser().parse_args(list(argv)))
    return code, capsys.readouterr()


def test_cli_missing_or_malformed_file(tmp_path, capsys):
    code, out = run_tool(capsys, "--annotations", str(tmp_path / "nope.json"), "--output-dir", str(tmp_path))
    assert code == 2 and out.err.strip() == f"misalignment: error: annotation file not found: {tmp_path / 'nope.json'}"
    (tmp_path / "bad.json").write_text("{")
    code, out = run_tool(capsys, "--annotations", str(tmp_path / "bad.json"), "--output-dir", str(tmp_path))
    assert code == 2 and "malformed JSON" in out.err and len(out.err.strip().splitlines()) == 1


def test_cli_bounds_the_output_size_and_refuses_a_file_as_output_folder(tmp_path, capsys):
    path = write_coco(tmp_path / "a.json", [ann(1, [4, 4, 20, 20])])
    code, out = run_tool(capsys, "--annotations", str(path), "--output-dir", str(tmp_path / "o"), "--output-size",
                         "100000")  # would have asked for 960 GB
    assert code == 2 and out.err.strip() == (
        f"misalignment: error: --output-size must be an int from 1 to {mis.MAX_OUTPUT_SIZE} (bins per side; the "
        f"pictures' weight maps grow as its 4th power), got 100000")
    with pytest.raises(ValueError, match="output_size must be an int from 1 to 64"):
        bin_weights(make_rules(["roi_align_aligned"])[0], [[0, 0, 8, 8]], (16, 16), 4, 65)
    code, out = run_tool(capsys, "--annotations", str(path), "--output-dir", str(path))
    assert code == 2 and out.err.strip() == f"misalignment: error: --output-dir {path} is a file, not a folder"


def test_cli_end_to_end_with_images(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "a.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    path = write_coco(tmp_path / "a.json", [
        ann(1, [4, 4, 20, 20]), ann(2, [30.5, 2.25, 33.5, 45.75]), ann(3, [1, 1, 5, 5]), ann(4, [0, 0, 64, 48]),
        ann(5, [5, 5, 30, 30], iscrowd=1), ann(6, [10, 10, 0, 12]), ann(7, [70, 10, 5, 5]), ann(8, [50, 40, 20, 20]),
    ])
    out_dir = tmp_path / "out"
    code, out = run_tool(capsys, "--annotations", str(path), "--images", str(tmp_path), "--strides", "8", "16",
                         "--output-dir", str(out_dir), "--no-progress", "--picture-boxes", "2")
    assert code == 0, out.err
    result = json.loads((out_dir / "results.json").read_text())
    assert result["counts"] == {"annotations": 8, "measured": 5, "crowd": 1, "zero_area": 1, "outside": 1,
                                "clipped": 1, "subsampled": 0}
    all_16 = result["summary"]["16"]["roi_align_aligned"]["all"]
    assert all_16["boxes"] == 5 and 0 <= all_16["iou"] <= 1 and all_16["crop_error"] >= 0
    assert set(result["summary"]["8"]) == set(DEFAULT_RULES)
    table = (out_dir / "tables.md").read_text()
    assert "### Stride 16" in table and "| roi_pool_integer |" in table and "1 crowd, 1 zero-area" in table
    assert "region IoU" in out.out
    for name in ("centre_px_vs_size.png", "crop_error_vs_size.png", "boxes_stride8.png", "boxes_stride16.png"):
        assert (out_dir / name).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ real photographs
COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"
MINI_IMAGES = (261712, 92660, 174231)  # two giraffes (640x476); 17 boxes and a crowd (640x427); a cat (375x500)


def _coco_mini_subset(tmp_path) -> tuple[Path, dict]:
    """coco-mini's val annotations of MINI_IMAGES only (the images stay where they are)."""
    if not (COCO_MINI / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"coco-mini is not here ({COCO_MINI}): the real-photograph tests need it")
    data = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    data["images"] = [i for i in data["images"] if i["id"] in MINI_IMAGES]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in MINI_IMAGES]
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(data))
    return path, data


def _cell_means(image: np.ndarray, s: int) -> np.ndarray:
    """[h, w, 3]: each cell the mean of the pixels it covers (a partial last cell, of fewer), by loops."""
    h, w = -(-image.shape[0] // s), -(-image.shape[1] // s)
    return np.array([[image[u * s:(u + 1) * s, v * s:(v + 1) * s].reshape(-1, 3).mean(0) for v in range(w)]
                     for u in range(h)])


def _exact_bins(image: np.ndarray, box, p: int = 7) -> np.ndarray:
    """[P, P, 3]: the mean of each bin of the box, pixels as unit squares weighted by their overlap."""
    x1, y1, x2, y2 = box

    def weights(lo, hi, n):  # [P, n]: overlap of pixel i = [i, i + 1) with each bin
        edges = lo + (hi - lo) * np.arange(p + 1) / p
        i = np.arange(n)
        return np.clip(np.minimum(edges[1:, None], i + 1) - np.maximum(edges[:-1, None], i), 0, None)

    wy, wx = weights(y1, y2, image.shape[0]), weights(x1, x2, image.shape[1])
    sums = np.einsum("pu,uvc,qv->pqc", wy, image.astype(np.float64), wx)
    return sums / (wy.sum(1)[:, None, None] * wx.sum(1)[None, :, None])


def test_cli_on_coco_mini_photographs(tmp_path, capsys):
    """The crop error of aligned RoIAlign on real photos, against torchvision's roi_align on a stride map and exact
    bin means both computed here by plain loops; the counts against the file; the pictures of named boxes."""
    import torchvision

    path, data = _coco_mini_subset(tmp_path)
    out_dir = tmp_path / "out"
    code, out = run_tool(capsys, "--annotations", str(path), "--images", str(COCO_MINI / "val2017"), "--strides", "32",
                         "--rules", "roi_align_aligned", "roi_pool_integer", "--output-dir", str(out_dir),
                         "--no-progress", "--picture-annotations", "596358", "50142", "--threads", "1")
    assert code == 0, out.err
    result = json.loads((out_dir / "results.json").read_text())
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    assert crowd == 1 and result["counts"]["crowd"] == crowd
    assert result["counts"]["measured"] == len(data["annotations"]) - crowd
    images = {i["id"]: i for i in data["images"]}
    errors = []
    for a in data["annotations"]:
        if a["iscrowd"]:
            continue
        info = images[a["image_id"]]
        image = cv2.imread(str(COCO_MINI / "val2017" / info["file_name"]))
        x, y, w, h = a["bbox"]
        box = (max(x, 0), max(y, 0), min(x + w, info["width"]), min(y + h, info["height"]))
        fmap = torch.from_numpy(_cell_means(image, 32)).permute(2, 0, 1)[None]
        pooled = torchvision.ops.roi_align(fmap, torch.tensor([[0.0, *box]], dtype=torch.float64), 7, 1 / 32, 2,
                                           aligned=True)[0].permute(1, 2, 0).numpy()
        errors.append(np.abs(pooled - _exact_bins(image, box)).mean())
    measured = result["summary"]["32"]["roi_align_aligned"]["all"]["crop_error"]
    assert measured == pytest.approx(float(np.mean(errors)), abs=2e-3)
    assert result["summary"]["32"]["roi_pool_integer"]["all"]["crop_error"] > measured  # the rounding costs
    picture = cv2.imread(str(out_dir / "boxes_stride32.png"))
    assert picture is not None and picture.shape[1] > 400
    code, out = run_tool(capsys, "--annotations", str(path), "--no-images", "--strides", "32", "--output-dir",
                         str(out_dir), "--no-progress", "--picture-annotations", "1")
    assert code == 2 and "annotation id 1 is not among the measured boxes" in out.err


def test_every_option_is_described():
    parser = load_tool("misalignment").get_args_parser()
    for action in parser._actions:
        words = (action.help or "").replace("(default: %(default)s)", "").replace("default: %(default)s", "")
        assert len(words.strip()) > 8, f"{action.option_strings}: {action.help!r}"  # more than its default
    assert parser.parse_args([]).threads is None  # torch's own unless given: the tools' one convention


def test_the_study_is_split_by_theme_and_keeps_its_public_names():
    """The boxes and images live in misalignment_boxes; every public name stays importable from misalignment (what
    tools/misalignment.py and these tests use), and the modules stay under the project's ~500 lines."""
    from roikit.analysis import misalignment_boxes, misalignment_report

    for name in ("BoxSet", "load_coco_boxes", "load_image"):
        assert getattr(mis, name) is getattr(misalignment_boxes, name) and name in mis.__all__
    assert all(hasattr(mis, name) for name in mis.__all__)
    for module in (mis, misalignment_boxes, misalignment_report):
        assert len(Path(module.__file__).read_text().splitlines()) <= 500, module.__name__
