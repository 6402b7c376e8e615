"""demo/demo.py, roikit.analysis.pooling_view and roikit.analysis.drawing: headless runs on generated images and a
generated video, with a tiny detector of random weights saved in the trainer's checkpoint format (no training,
except the 2-iteration quick model)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from roikit.analysis.drawing import box_pixels, class_colour, draw_cell_grid, draw_detections, draw_rects, tile_images
from roikit.analysis.pooling_view import blank_explain, quantized_view, roi_align_view
from roikit.data import render_image
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
    assert run(setup, "--input", setup["images"] / "img1.png", "--output-dir", out, "--show") == 0
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
    assert e.startswith(f"demo.py: error: checkpoint {setup['checkpoint']} was trained with another model config "
                        "(model.backbone.channels: checkpoint [8, 8, 16, 16], config [8, 8, 16, 32])")
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


def test_quick_model_is_trained_once_then_reused(setup, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(detector, "QUICK_DATA", {"num_train": 4, "num_val": 2, "image_size": 320, "seed": 0})
    quick = tmp_path / "quick.pt"
    args = ["--input", setup["images"] / "img2.png", "--output-dir", tmp_path / "out", "--quick-checkpoint", quick,
            "--quick-iters", 2, "data.batch_size=2", "train.log_period=1"]
    assert run(setup, *args, checkpoint=False) == 0
    err = capsys.readouterr().err
    assert "no --checkpoint: training a quick model (2 iterations" in err
    saved = torch.load(quick, weights_only=True)
    assert saved["iteration"] == 2 and "optimizer" not in saved
    assert run(setup, *args, checkpoint=False) == 0
    assert f"no --checkpoint: using the quick model {quick}" in capsys.readouterr().err
    assert (tmp_path / "out" / "img2.png").is_file()
