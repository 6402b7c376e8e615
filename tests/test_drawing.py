"""roikit.analysis.drawing and roikit.analysis.pooling_view: boxes, cell grids and tiles land on the pixels they
name; the pooling views read the cells and samples that roi_pool and roi_align read."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _demo_helpers import colour_fraction, ring

from roikit.analysis.drawing import box_pixels, class_colour, draw_cell_grid, draw_detections, draw_rects, tile_images
from roikit.analysis.pooling_view import quantized_view, roi_align_view
from roikit.ops import roi_align, roi_pool


# ------------------------------------------------------------------------------------------------------ drawing
def test_draw_detections_outlines_each_box_on_its_border_pixels():
    image = np.full((100, 120, 3), 50, np.uint8)
    boxes = [[10.2, 20.0, 60.0, 80.4], [70.0, 30.0, 119.6, 70.0]]  # room for the labels above
    draw_detections(image, boxes, [1, 2], [0.9, 0.8], ["a", "b"], thickness=2)
    for box, label in zip(boxes, [1, 2]):
        px = box_pixels(box, image.shape)
        assert colour_fraction(ring(image, px), class_colour(label)) == 1.0
        assert colour_fraction(ring(image, px, -1), class_colour(label)) > 0.9  # the second ring, inside
        assert colour_fraction(ring(image, px, -3), class_colour(label)) == 0.0
    assert box_pixels(boxes[0], image.shape) == (10, 20, 59, 79)
    assert box_pixels(boxes[1], image.shape) == (70, 30, 119, 69)  # x2 119.6 -> pixel 119, the last column
    assert (image[28, 71] == class_colour(2)).all()  # the label's tag sits on top of the box
    assert box_pixels([130, 0, 150, 10], image.shape) is None


def test_draw_cell_grid_and_rects_land_on_cell_edges():
    image = np.zeros((64, 64, 3), np.uint8)
    draw_cell_grid(image, 16, colour=(255, 255, 255))
    cols = np.flatnonzero(image[8, :, 0])  # a row between horizontal lines: only the vertical ones
    assert list(cols) == [0, 16, 32, 48]  # the line at x = 16 px is drawn on pixel 16 (cv2: centre at 16.5)
    image[:] = 0
    draw_rects(image, [(16, 16, 32, 48)], (0, 0, 255), thickness=0, fill_alpha=1.0)
    filled = np.argwhere(image[:, :, 2] == 255)
    assert filled.min(0).tolist() == [16, 16] and filled.max(0).tolist() == [47, 31]


def test_tile_images_places_every_image():
    a, b = np.full((20, 30, 3), 10, np.uint8), np.full((40, 10, 3), (200, 10, 90), np.uint8)
    out = tile_images([a, b, a], ["a", "b\nsecond line", "c"], columns=2, gap=4)
    assert out.shape[1] == 3 * 4 + 2 * 30
    assert (out == (200, 10, 90)).all(axis=2).sum() == 40 * 10
    with pytest.raises(ValueError, match="captions"):
        tile_images([a], ["x", "y"])


# ------------------------------------------------------------------------------------------------- pooling view
@pytest.mark.parametrize("rule", ["integer", "torchvision"])
def test_quantized_view_cells_are_the_ones_roi_pool_reads(rule):
    fmap = torch.rand(1, 3, 20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    box = np.array([37.3, 21.9, 250.2, 181.0])
    view = quantized_view(rule, fmap, box, 16, 7)
    op = roi_pool(fmap.float(), torch.tensor([[0.0, *box]], dtype=torch.float32), 7, 1 / 16, rule)[0]
    for p in range(7):
        for q in range(7):
            x1, y1, x2, y2 = (int(v) // 16 for v in view.bins[p * 7 + q])
            expected = fmap[0, :, y1:y2, x1:x2].amax(dim=(1, 2)) if y2 > y1 and x2 > x1 else torch.zeros(3)
            assert torch.allclose(op[:, p, q].double(), expected, atol=1e-6), (p, q)
            if y2 > y1 and x2 > x1:
                assert np.allclose(view.crop[p, q], fmap[0, :, y1:y2, x1:x2].mean(dim=(1, 2)).numpy())


@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (False, 2), (True, 0)])
def test_roi_align_view_samples_are_where_the_op_reads(aligned, sampling_ratio):
    fmap = torch.rand(1, 3, 20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    box, stride = np.array([37.3, 21.9, 250.2, 181.0]), 16
    view = roi_align_view(fmap, box, stride, 7, sampling_ratio, aligned)
    expected = roi_align(fmap, torch.tensor([[0.0, *box]], dtype=torch.float64), 7, 1 / stride, sampling_ratio,
                         aligned)[0].permute(1, 2, 0).numpy()
    assert np.allclose(view.crop, expected)
    g = sampling_ratio if sampling_ratio > 0 else int(np.ceil((box[2] - box[0]) / stride / 7))
    assert len(view.points) == 49 * g * g if sampling_ratio > 0 else len(view.points) > 0
    # the cells the op's gradient reaches are exactly the bilinear neighbours of the sample points
    c = view.points / stride - 0.5  # cells, cell u's value at u
    near = {(int(y) + dy, int(x) + dx) for x, y in c for dy in (0, 1) for dx in (0, 1)}
    read = {(int(r[1]) // stride, int(r[0]) // stride) for r in view.cells}
    assert read <= near and len(read) >= 0.8 * len(near & {(r, q) for r in range(20) for q in range(24)})
    first_bin = view.bins[0]  # the bins tile the box (aligned) or the box shifted by half a cell
    shift = 0.0 if aligned else stride / 2
    assert np.allclose(first_bin[:2], box[:2] + shift) and np.allclose(view.bins[-1][2:], box[2:] + shift)
