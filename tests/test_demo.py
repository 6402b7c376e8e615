"""demo/demo.py: headless runs on generated images and a generated video, with a tiny detector of random weights
saved in the trainer's checkpoint format (no training, except the 2-iteration quick model); its errors; its video
output. Real photographs (coco-mini): test_demo_photos.py; the drawing and pooling views: test_drawing.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from _demo_helpers import (
    IMAGE_SIZES,
    TINY,
    VIDEO_FRAMES,
    VIDEO_SIZE,
    colour_fraction,
    load_demo,
    make_demo_files,
    ring,
    write_config,
)

from roikit.analysis.drawing import box_pixels, class_colour
from roikit.analysis.pooling_view import blank_explain
from roikit.data import make_shapes_dataset
from roikit.engine.config import load_config
from roikit.io import atomic_torch_save
from roikit.modeling.detector import build_detector

demo, sources = load_demo()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_demo_files(tmp_path_factory.mktemp("demo"))


def run(setup, *args, checkpoint=True):
    argv = ["--config", str(setup["config"])] + (["--checkpoint", str(setup["checkpoint"])] if checkpoint else [])
    return demo.main(demo.get_args_parser().parse_intermixed_args(argv + [str(a) for a in args]))


def _check_drawn_boxes(drawn: np.ndarray, record: dict) -> None:
    """Every reported box is outlined in its class colour where it was reported, the best one wholly."""
    assert record["scores"] == sorted(record["scores"], reverse=True)
    for k, (box, label) in enumerate(zip(record["boxes"], record["labels"])):
        px = box_pixels(box, drawn.shape)
        colour = class_colour(label)
        on_edge = colour_fraction(ring(drawn, px), colour)
        assert on_edge >= (0.97 if k == 0 else 0.5), (k, box, on_edge)  # later boxes may cover earlier ones
        if px[2] - px[0] > 12 and px[3] - px[1] > 12:  # a ring 5 px further in is not the box's
            assert colour_fraction(ring(drawn, px, -5), colour) < on_edge - 0.3, (k, box)


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
    other = write_config(tmp_path / "other.yaml", {**TINY, "model": {**TINY["model"],
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
