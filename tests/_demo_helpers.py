"""Helpers of the demo tests (test_demo.py, test_demo_photos.py, test_drawing.py): demo/demo.py as a module, a tiny
detector of random weights in the trainer's checkpoint format, generated images and a video, and pixel checks of
drawn boxes."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from roikit.data import render_image
from roikit.engine.config import load_config
from roikit.io import atomic_torch_save
from roikit.modeling.detector import build_detector

ROOT = Path(__file__).resolve().parents[1]
_DEMO = ROOT / "demo" / "demo.py"

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


@functools.cache
def load_demo():
    """(demo/demo.py, its sources.py) as modules, loaded once. In-process (no second torch start-up per run); the demo
    is a script, not a package module. It puts its own folder on sys.path for the modules beside it (sources.py,
    detector.py)."""
    spec = importlib.util.spec_from_file_location("roikit_demo", _DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module, importlib.import_module("sources")


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def random_checkpoint(config: Path, path: Path, seed: int = 0) -> Path:
    cfg = load_config(config)
    torch.manual_seed(seed)
    model = build_detector(cfg)
    atomic_torch_save(path, {"model": model.state_dict(), "config": cfg, "iteration": 0})
    return path


def make_demo_files(root: Path) -> dict:
    """The tiny config and its random checkpoint, images of IMAGE_SIZES and a video of VIDEO_FRAMES, under ``root``."""
    config = write_config(root / "tiny.yaml", TINY)
    checkpoint = random_checkpoint(config, root / "tiny.pt")
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


def ring(image: np.ndarray, px, offset: int = 0) -> np.ndarray:
    """The pixels of the rectangle ``px`` (inclusive x0, y0, x1, y1) grown by ``offset``, clipped: [N, 3]."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = px[0] - offset, px[1] - offset, px[2] + offset, px[3] + offset
    xs, ys = np.arange(max(x0, 0), min(x1, w - 1) + 1), np.arange(max(y0, 0), min(y1, h - 1) + 1)
    parts = [image[y, xs] for y in (y0, y1) if 0 <= y < h] + [image[ys, x] for x in (x0, x1) if 0 <= x < w]
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)


def colour_fraction(pixels: np.ndarray, colour) -> float:
    return float((pixels == np.asarray(colour, np.uint8)).all(axis=1).mean()) if len(pixels) else 0.0
