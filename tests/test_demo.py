"""demo/demo.py, roikit.analysis.pooling_view and roikit.analysis.drawing: headless runs on generated images and a
generated video, with a tiny detector of random weights saved in the trainer's checkpoint format (no training,
except the 2-iteration quick model)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from roikit.analysis.drawing import box_pixels, class_colour, draw_cell_grid, draw_detections, draw_rects, tile_images
from roikit.analysis.pooling_view import blank_explain, quantized_view, roi_align_view
from roikit.data import make_shapes_dataset, render_image
from roikit.engine.config import load_config
from roikit.io import atomic_torch_save
from roikit.modeling.detector import build_detector
from roikit.ops import roi_align, roi_pool

ROOT = Path(__file__).resolve().parents[1]
_DEMO = ROOT / "demo" / "demo.py"


def _load_demo():
    # in-process (no second torch start-up per run); the demo is a script, not a package module. It puts its own
    # folder on sys.path for the modules beside it (sources.py, detector.py)
    spec = importlib.util.spec_from_file_location("roikit_demo", _DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
sources = importlib.import_module("sources")
detector = importlib.import_module("detector")

TINY = {
    "_base_": str(ROOT / "configs" / "base_shapes.yaml"),
    "model": {
        "num_classes": 6,
        "backbone": {"channels": [8, 8, 16, 16]},
        "transform": {"min_size": 160, "max_size": 256},
        "rpn": {"pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
        "box_head": {"fc_dims": [32, 32]},
        "roi_heads": {"detections_per_img": 5},
    },
}
IMAGE_SIZES = [(160, 200), (120, 176), (200, 160)]  # (height, width)
VIDEO_FRAMES, VIDEO_SIZE = 4, (176, 144)  # (width, height)


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _random_checkpoint(config: Path, path: Path, seed: int = 0) -> Path:
    cfg = load_config(config)
    torch.manual_seed(seed)
    model = build_detector(cfg)
    atomic_torch_save(path, {"model": model.state_dict(), "config": cfg, "iteration": 0})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = _write_config(root / "tiny.yaml", TINY)
    checkpoint = _random_checkpoint(config, root / "tiny.pt")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, hw in enumerate(IMAGE_SIZES):
        cv2.imwrite(str(images / f"img{i}.png"), render_image(rng, hw)[0])
    video = root / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, VIDEO_SIZE)
    assert writer.isOpened()
    for _ in range(VIDEO_FRAMES):
        writer.write(render_image(rng, VIDEO_SIZE[::-1])[0])
    writer.release()
    return {"root": root, "config": config, "checkpoint": checkpoint, "images": images, "video": video}


def run(setup, *args, checkpoint=True):
    argv = ["--config", str(setup["config"])] + (["--checkpoint", str(setup["checkpoint"])] if checkpoint else [])
    return demo.main(demo.get_args_parser().parse_intermixed_args(argv + [str(a) for a in args]))


def _ring(image: np.ndarray, px, offset: int = 0) -> np.ndarray:
    """The pixels of the rectangle ``px`` (inclusive x0, y0, x1, y1) grown by ``offset``, clipped: [N, 3]."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = px[0] - offset, px[1] - offset, px[2] + offset, px[3] + offset
    xs, ys = np.arange(max(x0, 0), min(x1, w - 1) + 1), np.arange(max(y0, 0), min(y1, h - 1) + 1)
    parts = [image[y, xs] for y in (y0, y1) if 0 <= y < h] + [image[ys, x] for x in (x0, x1) if 0 <= x < w]
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)


def _colour_fraction(pixels: np.ndarray, colour) -> float:
    return float((pixels == np.asarray(colour, np.uint8)).all(axis=1).mean()) if len(pixels) else 0.0


def _check_drawn_boxes(drawn: np.ndarray, record: dict) -> None:
    """Every reported box is outlined in its class colour where it was reported, the best one wholly."""
    assert record["scores"] == sorted(record["scores"], reverse=True)
    for k, (box, label) in enumerate(zip(record["boxes"], record["labels"])):
        px = box_pixels(box, drawn.shape)
        colour = class_colour(label)
        on_edge = _colour_fraction(_ring(drawn, px), colour)
        assert on_edge >= (0.97 if k == 0 else 0.5), (k, box, on_edge)  # later boxes may cover earlier ones
        if px[2] - px[0] > 12 and px[3] - px[1] > 12:  # a ring 5 px further in is not the box's
            assert _colour_fraction(_ring(drawn, px, -5), colour) < on_edge - 0.3, (k, box)


# ------------------------------------------------------------------------------------------------------ drawing
def test_draw_detections_outlines_each_box_on_its_border_pixels():
    image = np.full((100, 120, 3), 50, np.uint8)
    boxes = [[10.2, 20.0, 60.0, 80.4], [70.0, 30.0, 119.6, 70.0]]  # room for the labels above
    draw_detections(image, boxes, [1, 2], [0.9, 0.8], ["a", "b"], thickness=2)
    for box, label in zip(boxes, [1, 2]):
        px = box_pixels(box, image.shape)
        assert _colour_fraction(_ring(image, px), class_colour(label)) == 1.0
        assert _colour_fraction(_ring(image, px, -1), class_colour(label)) > 0.9  # the second ring, inside
        assert _colour_fraction(_ring(image, px, -3), class_colour(label)) == 0.0
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


# ------------------------------------------------------------------------------------------------------ end to end
def test_folder_of_images(setup, capsys):
    out = setup["root"] / "out_folder"
    assert run(setup, "--input", setup["images"], "--output-dir", out, "--score-threshold", 0.0,
               "--save-detections") == 0
    printed = capsys.readouterr().out
    drawn_any = 0
    for i, (h, w) in enumerate(IMAGE_SIZES):
        drawn = cv2.imread(str(out / f"img{i}.png"))
        assert drawn is not None and drawn.shape == (h, w, 3)
        record = json.loads((out / f"img{i}.json").read_text())
        assert record["size"] == [w, h] and f"img{i}.png: {len(record['scores'])} detection(s)" in printed
        _check_drawn_boxes(drawn, record)
        drawn_any += len(record["scores"])
    assert drawn_any > 0  # random weights at threshold 0 still detect something


def test_score_threshold_drops_detections(setup):
    out = setup["root"] / "out_threshold"
    image = setup["images"] / "img0.png"
    assert run(setup, "--input", image, "--output-dir", out, "--score-threshold", 0.0, "--save-detections") == 0
    scores = json.loads((out / "img0.json").read_text())["scores"]
    assert len(scores) >= 3 and scores[1] > scores[2]
    cut = (scores[1] + scores[2]) / 2
    assert run(setup, "--input", image, "--output-dir", out, "--score-threshold", cut, "--save-detections") == 0
    kept = json.loads((out / "img0.json").read_text())["scores"]
    assert kept == scores[:2]


def test_explain_pooling_picture(setup, capsys):
    out = setup["root"] / "out_explain"
    image = setup["images"] / "img0.png"
    assert run(setup, "--input", image, "--output-dir", out, "--score-threshold", 0.0, "--explain-pooling",
               "--detection", 1, "--save-detections") == 0
    view = cv2.imread(str(out / "img0_explain.png"))
    assert view is not None and view.shape == blank_explain(256, "").shape
    record = json.loads((out / "img0.json").read_text())
    assert record["explain"]["detection"] == 1 and record["explain"]["stride"] == 16
    assert set(record["explain"]["crop_error"]) == {"integer", "torchvision", "roi_align"}
    capsys.readouterr()
    assert run(setup, "--input", image, "--output-dir", out, "--explain-pooling", "--detection", 99) == 0
    assert "no detection 99 to explain" in capsys.readouterr().err


def test_video(setup, capsys):
    out = setup["root"] / "out_video"
    assert run(setup, "--input", setup["video"], "--output-dir", out, "--score-threshold", 0.0,
               "--explain-pooling", "--save-detections") == 0
    assert "clip: 4 frame(s)" in capsys.readouterr().out
    for name, size in (("clip.mp4", VIDEO_SIZE), ("clip_explain.mp4", blank_explain(256, "").shape[1::-1])):
        cap = cv2.VideoCapture(str(out / name))
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
        cap.release()
        assert len(frames) == VIDEO_FRAMES and frames[0].shape[1::-1] == tuple(size), name
    assert len(json.loads((out / "clip.json").read_text())["frames"]) == VIDEO_FRAMES
    assert not list(out.glob(".*tmp*"))  # written under a temporary name, then renamed


def test_max_frames(setup, capsys):
    out = setup["root"] / "out_max_frames"
    assert run(setup, "--input", setup["video"], "--output-dir", out, "--max-frames", 2) == 0
    assert "clip: 2 frame(s)" in capsys.readouterr().out


@pytest.mark.parametrize("display", [None, ":97"])  # none set; one set but with no X server behind it
def test_show_without_a_display_says_so_and_writes_files(setup, capsys, monkeypatch, display):
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    if display is None:
        monkeypatch.delenv("DISPLAY", raising=False)
    else:  # Qt would abort the process here: the demo finds out in a child process first
        monkeypatch.setenv("DISPLAY", display)
    out = setup["root"] / "out_show"
    assert run(setup, "--input", setup["images"] / "img1.png", "--output-dir", out, "--show",
               "--score-threshold", 0) == 0  # something detected: no hint
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("); writing files instead")
    if display is None:
        assert err[0] == "demo.py: --show: no display available (DISPLAY is not set); writing files instead"
    else:  # the reason is the GUI backend's own words (Qt here: "could not connect to display :97")
        assert err[0].startswith("demo.py: --show: no display available (")
    assert (out / "img1.png").is_file()


def _error_of(setup, capsys, *args, checkpoint=True) -> str:
    capsys.readouterr()
    assert run(setup, *args, checkpoint=checkpoint) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, nothing else
    return err[0]


def test_errors(setup, capsys, tmp_path):
    out = tmp_path / "out"
    bad_png, bad_video = tmp_path / "broken.png", tmp_path / "broken.mp4"
    bad_png.write_bytes(b"not a png" * 10)
    bad_video.write_bytes(b"not a video" * 10)
    e = _error_of(setup, capsys, "--input", tmp_path / "missing.png", "--output-dir", out)
    assert e == f"demo.py: error: input not found: {tmp_path / 'missing.png'}"
    e = _error_of(setup, capsys, "--input", bad_png, "--output-dir", out)
    assert e.startswith(f"demo.py: error: cannot read image {bad_png}")
    e = _error_of(setup, capsys, "--input", bad_video, "--output-dir", out)
    assert e.startswith(f"demo.py: error: cannot open video {bad_video}")
    e = _error_of(setup, capsys, "--input", "99", "--output-dir", out)
    assert e == "demo.py: error: cannot open camera 99"
    e = _error_of(setup, capsys, "--input", tmp_path / "missing", "--output-dir", out)  # no such folder either
    assert e == f"demo.py: error: input not found: {tmp_path / 'missing'}"
    e = _error_of(setup, capsys, "--input", setup["images"], "--output-dir", setup["images"])
    assert "holds the input images" in e
    e = _error_of(setup, capsys, "--input", setup["images"] / "img0.png", "--output-dir", out,
                  "--score-threshold", 2)
    assert "--score-threshold must be in [0, 1]" in e
    e = _error_of(setup, capsys, "--input", setup["images"] / "img0.png", "--output-dir", bad_png)
    assert e == f"demo.py: error: --output-dir {bad_png} is a file, not a folder"
    assert not out.exists() or not list(out.iterdir())  # nothing written on a refusal


def test_output_names_never_collide():
    paths = [Path(n) for n in ("d/a.jpg", "d/a.png", "d/x.png", "d/x_explain.png", "d/y.gif")]
    names = sources.output_names(paths)
    assert names[paths[0]] == {"image": "a.jpg", "explain": "a_jpg_explain.png", "json": "a_jpg.json"}
    assert names[paths[1]] == {"image": "a.png", "explain": "a_png_explain.png", "json": "a_png.json"}
    assert names[paths[2]] == {"image": "x.png", "explain": "x_2_explain.png", "json": "x_2.json"}
    assert names[paths[3]] == {"image": "x_explain.png", "explain": "x_explain_explain.png", "json": "x_explain.json"}
    assert names[paths[4]]["image"] == "y.png"
    every = [name for n in names.values() for name in n.values()]
    assert len(every) == len(set(every))


def test_a_folder_with_bad_images_runs_the_good_ones_then_fails(setup, capsys, tmp_path):
    """A corrupt file and an image too thin for the model are reported, one line each, and skipped; every other
    image is done, none overwrites another's results (a.png / a.jpg, x.png / x_explain.png); a JPEG cut short
    is run with a warning; the exit status says that something failed."""
    folder, out = tmp_path / "folder", tmp_path / "out"
    folder.mkdir()
    good = cv2.imread(str(setup["images"] / "img0.png"))
    for name in ("a.png", "a.jpg", "x.png", "x_explain.png", "z.png"):
        cv2.imwrite(str(folder / name), good)
    (folder / "b.png").write_bytes(b"not a png" * 10)
    cv2.imwrite(str(folder / "thin.png"), np.zeros((2, 20000, 3), np.uint8))
    cv2.imwrite(str(folder / "cut.jpg"), good)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert run(setup, "--input", folder, "--output-dir", out, "--score-threshold", 0.0, "--explain-pooling",
               "--save-detections") == 1
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("demo.py: ")]  # libjpeg adds its own
    assert err[0].startswith(f"demo.py: error: cannot read image {folder / 'b.png'}: ") and err[0].endswith("; skipped")
    assert err[1].startswith(f"demo.py: warning: {folder / 'cut.jpg'} is incomplete (image file is truncated")
    assert err[2] == (f"demo.py: error: {folder / 'thin.png'}: an image of 20000x2 px cannot be resized by "
                      f"model.transform (min_size [160], max_size 256): its short side would be under 1 px; sides "
                      f"at most 256:1 are taken; skipped")
    assert err[3] == "demo.py: error: 2 of 8 images could not be read or run (above); the others are done"
    assert len(err) == 4
    for image, stem in (("a.jpg", "a_jpg"), ("a.png", "a_png"), ("x.png", "x_2"), ("x_explain.png", "x_explain"),
                        ("z.png", "z"), ("cut.jpg", "cut")):
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["image"] == image and f"{image}: {len(record['scores'])} detection(s)" in captured.out
        assert cv2.imread(str(out / image)).shape == good.shape  # the annotated image, not an explain view
        assert cv2.imread(str(out / f"{stem}_explain.png")).shape == blank_explain(256, "").shape
    assert not (out / "b.png").exists() and not (out / "thin.png").exists()


def test_checkpoint_errors(setup, capsys, tmp_path):
    image, out = setup["images"] / "img0.png", tmp_path / "out"
    other = _write_config(tmp_path / "other.yaml", {**TINY, "model": {**TINY["model"],
                                                                        "backbone": {"channels": [8, 8, 16, 32]}}})
    e = _error_of(setup, capsys, "--input", image, "--output-dir", out, "--checkpoint", setup["checkpoint"],
                  "--config", other, checkpoint=False)
    assert e.startswith(f"demo.py: error: checkpoint {setup['checkpoint']} ")  # the config's key, or the tensors
    assert ("(model.backbone.channels: checkpoint [8, 8, 16, 16], config [8, 8, 16, 32])" in e
            or "tensor(s) of another shape (e.g. backbone.body." in e), e
    # same config, but tensors of other shapes (a checkpoint whose config was edited by hand)
    cfg = load_config(other)
    state = build_detector(cfg).state_dict()
    atomic_torch_save(tmp_path / "mixed.pt", {"model": state, "config": load_config(setup["config"])})
    e = _error_of(setup, capsys, "--input", image, "--output-dir", out, "--checkpoint", tmp_path / "mixed.pt",
                  checkpoint=False)
    assert "does not match the model of the config" in e
    e = _error_of(setup, capsys, "--input", image, "--output-dir", out, "--checkpoint", tmp_path / "none.pt",
                  checkpoint=False)
    assert e == f"demo.py: error: checkpoint not found: {tmp_path / 'none.pt'}"
    (tmp_path / "junk.pt").write_bytes(b"junk")
    e = _error_of(setup, capsys, "--input", image, "--output-dir", out, "--checkpoint", tmp_path / "junk.pt",
                  checkpoint=False)
    assert e.startswith(f"demo.py: error: cannot read checkpoint {tmp_path / 'junk.pt'}")


def test_quick_model_is_trained_once_then_reused(setup, capsys, tmp_path):
    """The quick model trains on the config's shapes set (data.shapes), reusing one that tools/make_shapes.py or
    training made with those settings; then it is cached; the demo says what it is."""
    root = tmp_path / "shapes"
    make_shapes_dataset(root, num_train=4, num_val=2, image_size=320, seed=0, progress=False)
    made = (root / "DONE").stat().st_mtime_ns
    quick = tmp_path / "quick.pt"
    args = ["--input", setup["images"] / "img2.png", "--output-dir", tmp_path / "out", "--quick-checkpoint", quick,
            "--quick-iters", 2, "data.batch_size=2", "train.log_period=1", f"data.shapes.root={root}",
            "data.shapes.num_train=4", "data.shapes.num_val=2"]
    assert run(setup, *args, checkpoint=False) == 0
    captured = capsys.readouterr()
    assert "no --checkpoint: training a quick model (2 iterations" in captured.err
    assert (root / "DONE").stat().st_mtime_ns == made  # the shapes set was reused, not made again
    assert "model: the demo's quick model" in captured.out and "It knows only the 6 shapes" in captured.out
    saved = torch.load(quick, weights_only=True)
    assert saved["iteration"] == 2 and "optimizer" not in saved
    assert saved["config"]["data"]["shapes"]["root"] == str(root)
    assert run(setup, *args, checkpoint=False) == 0
    assert f"no --checkpoint: using the quick model {quick}" in capsys.readouterr().err
    assert (tmp_path / "out" / "img2.png").is_file()


def test_says_what_model_runs_and_hints_when_nothing_is_found(setup, capsys, tmp_path):
    assert run(setup, "--input", setup["images"] / "img0.png", "--output-dir", tmp_path, "--score-threshold", 1.0) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"model: roikit detector from {setup['checkpoint']}: 6 classes: ")
    assert "(synthetic shapes only: it will not know the objects of a photo)" in captured.out
    assert "img0.png: 0 detection(s)" in captured.out
    assert captured.err.strip() == (
        "demo.py: hint: nothing detected in 1 image(s) or frame(s): this model only knows synthetic shapes; for the "
        "objects of a photo use --model torchvision:fasterrcnn_resnet50_fpn --weights FILE, or --annotations FILE "
        "to explain a COCO file's boxes")
    assert demo.get_args_parser().parse_args(["--input", "x"]).device == "auto"  # as tools/train.py
    assert demo.get_args_parser().parse_args(["--input", "x"]).threads is None  # torch's own, as every tool
    for action in demo.get_args_parser()._actions:
        words = (action.help or "").replace("(default: %(default)s)", "")
        assert len(words.strip()) > 8, f"{action.option_strings}: {action.help!r}"


# ------------------------------------------------------------------------------------------------ video output
def test_video_temporary_names_are_unique_and_a_dead_demos_is_removed(tmp_path):
    frame = np.full((32, 48, 3), 100, np.uint8)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".clip.{int(dead.stdout)}-abc.tmp.mp4"  # left by a demo killed mid-video
    alive = tmp_path / f".clip.{os.getppid()}-xyz.tmp.mp4"  # being written by a running one
    stale.write_bytes(b"half a video")
    alive.write_bytes(b"a video in progress")
    a, b = sources.VideoOut(tmp_path, "clip", 10), sources.VideoOut(tmp_path, "clip", 10)
    a.write(frame)
    b.write(frame)
    assert a.tmp != b.tmp and a.tmp.parent == b.tmp.parent == tmp_path  # two demos, one folder: no collision
    assert a.tmp.name.startswith(f".clip.{os.getpid()}-") and a.tmp.is_file() and b.tmp.is_file()
    assert not stale.exists() and alive.exists()
    for _ in range(2):
        b.write(frame)
    assert a.close() == b.close() == tmp_path / "clip.mp4"  # each renamed into place whole, the last one stays
    cap = cv2.VideoCapture(str(tmp_path / "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["clip.mp4", alive.name])


# ------------------------------------------------------------------------------------------------ real photographs
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"
PHOTO = "000000022892.jpg"  # val2017: a cat and a dog, and what surrounds them


def _coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"coco-mini is not here ({COCO_MINI}): the real-photograph tests need it")
    return COCO_MINI


def _check_drawn_jpeg(drawn_file: Path, photo_file: Path, boxes, labels, at_least: float, inside: bool = True) -> None:
    """Each box outlined in its class colour where it is (JPEG: colours come back only near), not in the photo;
    ``inside``: and not 5 px inside it (where no other box of its colour lies)."""
    drawn, photo = cv2.imread(str(drawn_file)), cv2.imread(str(photo_file))
    for box, label in zip(boxes, labels):
        px, colour = box_pixels(box, drawn.shape), np.asarray(class_colour(label))

        def near(pixels):
            return float((np.abs(pixels.astype(int) - colour).max(axis=1) <= 48).mean())

        assert near(_ring(drawn, px)) >= at_least and near(_ring(photo, px)) < 0.05, (box, label)
        assert not inside or near(_ring(drawn, px, -5)) < 0.1, (box, label)


def _main(*args) -> int:
    return demo.main(demo.get_args_parser().parse_intermixed_args([str(a) for a in args]))


def test_annotations_are_the_boxes_drawn_and_explained(capsys, tmp_path):
    coco = _coco_mini()
    ann_file, image = coco / "annotations" / "instances_val2017.json", coco / "val2017" / PHOTO
    assert _main("--input", image, "--annotations", ann_file, "--explain-pooling", "--detection", 1,
                 "--output-dir", tmp_path, "--save-detections") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model: none: the boxes of ")
    data = json.loads(ann_file.read_text())
    info = next(i for i in data["images"] if i["file_name"] == PHOTO)
    anns = [a for a in data["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
    names = {c["id"]: c["name"] for c in data["categories"]}
    record = json.loads((tmp_path / f"{Path(PHOTO).stem}.json").read_text())
    assert record["size"] == [info["width"], info["height"]] and "scores" not in record
    assert sorted(record["annotation_ids"]) == sorted(a["id"] for a in anns) and len(anns) >= 2
    by_id = {a["id"]: a for a in anns}
    for box, label, name, ann_id in zip(record["boxes"], record["labels"], record["names"], record["annotation_ids"]):
        x, y, w, h = by_id[ann_id]["bbox"]
        assert box == pytest.approx([x, y, x + w, y + h], abs=0.006)  # written to 2 decimals
        assert label == by_id[ann_id]["category_id"] and name == names[label]
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in record["boxes"]]
    assert areas == sorted(areas, reverse=True)  # largest first
    explained = by_id[record["annotation_ids"][1]]
    assert record["explain"]["annotation_id"] == explained["id"]
    x, y, w, h = explained["bbox"]
    assert record["explain"]["box_net_px"] == pytest.approx([x, y, x + w, y + h], abs=0.006)  # the image's pixels
    level = math.floor(4 + math.log2(math.sqrt(w * h) / 224))  # the FPN paper's rule, levels 2 to 5
    assert record["explain"]["stride"] == 2 ** min(max(level, 2), 5)
    _check_drawn_jpeg(tmp_path / PHOTO, image, record["boxes"], record["labels"], 0.4)  # others' tags cover some
    view = cv2.imread(str(tmp_path / f"{Path(PHOTO).stem}_explain.png"))
    assert view.shape == blank_explain(256, "").shape


def test_annotations_errors(capsys, tmp_path, setup):
    coco = _coco_mini()
    ann_file = coco / "annotations" / "instances_val2017.json"
    other = tmp_path / "other.jpg"
    cv2.imwrite(str(other), np.zeros((20, 30, 3), np.uint8))
    resized = tmp_path / PHOTO
    cv2.imwrite(str(resized), np.zeros((20, 30, 3), np.uint8))
    for args, status, message in [  # 1: an image that cannot be run; 2: bad arguments, nothing done
        (["--input", other], 1, f"demo.py: error: {other}: other.jpg is not in {ann_file} (images are matched by "
                                f"file name)"),
        (["--input", resized], 1, f"demo.py: error: {resized}: {resized} is 30x20 px, but {ann_file} says {PHOTO} is "),
        (["--input", setup["video"]], 2, "demo.py: error: --annotations takes an image or a folder of images"),
        (["--input", other, "--checkpoint", setup["checkpoint"]], 2,
         "demo.py: error: --annotations draws the file's boxes instead of a model's detections"),
    ]:
        capsys.readouterr()
        assert _main(*args, "--annotations", ann_file, "--output-dir", tmp_path / "out") == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), (err, message)


def test_torchvision_model(capsys, tmp_path):
    """A randomly initialised torchvision MobileNetV3-FPN saved as a weights file: its COCO class names, its own
    pooler's scales for the pooling view (the numbers are meaningless, the path is real)."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    from roikit.modeling.torchvision_models import COCO_CATEGORY_NAMES

    coco = _coco_mini()
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "out"
    assert _main("--input", coco / "val2017" / PHOTO, "--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn",
                 "--weights", tmp_path / "weights.pth", "--min-size", 160, "--max-size", 256, "--score-threshold", 0,
                 "--explain-pooling", "--output-dir", out, "--save-detections", "--threads", 1) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model: torchvision's fasterrcnn_mobilenet_v3_large_fpn with the weights of ")
    record = json.loads((out / f"{Path(PHOTO).stem}.json").read_text())
    assert len(record["scores"]) > 0 and record["scores"] == sorted(record["scores"], reverse=True)
    assert all(name == COCO_CATEGORY_NAMES[label] for name, label in zip(record["names"], record["labels"]))
    # the photo is 500x334: its short side to --min-size, 160; the long side 500 * 160 / 334, rounded down
    box = np.array(record["boxes"][0]) * np.array([239 / 500, 160 / 334] * 2)
    assert record["explain"]["box_net_px"] == pytest.approx(box.tolist(), abs=0.02)
    assert record["explain"]["stride"] in (8, 16, 32, 64)
    _check_drawn_jpeg(out / PHOTO, coco / "val2017" / PHOTO, record["boxes"][:1], record["labels"][:1], 0.8,
                      inside=False)  # a hundred random boxes of one class
    capsys.readouterr()
    assert _main("--input", coco / "val2017" / PHOTO, "--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn",
                 "--output-dir", out) == 2
    assert capsys.readouterr().err.strip() == "demo.py: error: --model torchvision:NAME and --weights FILE go together"
