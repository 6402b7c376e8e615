"""Run a roikit detector on an image, a folder, a video or a camera, and show what its region pooling sees.

    python demo/demo.py --input photo.jpg                  # no --checkpoint: trains a quick model once, then reuses it
    python demo/demo.py --config configs/base_shapes.yaml --checkpoint runs/base_shapes/checkpoint.pth \\
        --input clip.mp4 --output-dir outputs/demo/clip
    python demo/demo.py --input 0 --show                   # camera 0, in a window
    python demo/demo.py --input photo.jpg --explain-pooling --detection 1

Annotated images keep their file names; a video or camera becomes ``<name>.mp4`` (mp4v, else MJPG ``.avi``). With
``--explain-pooling`` each image also gets ``<name>_explain.png`` (a video ``<name>_explain.mp4``): for one
detection, the feature-grid cells that ``roi_pool`` reads with integer and with torchvision rounding and the sample
points of ``roi_align``, each over the picture as the network sees it, and below them the 7x7 crop each rule makes
of the picture itself (area-averaged to the stride, so a 3-channel "feature map" whose cells one can see). Where
two inputs would share an output name (``a.png`` and ``a.jpg`` both ``a.json``) the stem takes the suffix
(``a_png.json``).

An image of a folder that cannot be read or run is reported and skipped; the exit status is then 1 (2: bad
arguments, nothing done). A JPEG file cut short is run, with a warning.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # OpenCV's own warnings would repeat our one-line errors
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg quiet ("moov atom not found" for a broken file)

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import torch

from roikit.analysis.drawing import (draw_cell_grid, draw_detections, draw_points, draw_rects,
                                     pad_to, put_text_lines, resize_to_fit, tile_images)
from roikit.data import SHAPE_CLASSES
from roikit.engine.config import apply_overrides, load_config, merge_config
from roikit.io import atomic_save_json, atomic_torch_save, atomic_write_bytes, output_dir as make_output_dir
from roikit.layers.poolers import assign_boxes_to_levels
from roikit.modeling.detector import build_detector
from roikit.ops import roi_align
from roikit.ops.geometry import bin_edges, sampling_grid as roi_align_grid

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "base_shapes.yaml"
DEFAULT_QUICK = ROOT / "outputs" / "demo" / "quick.pt"
DEFAULT_OUTPUT = Path("outputs") / "demo" / "results"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
# The quick model: AdamW at 3e-3 for 600 iterations reaches AP50 ~0.5 on the shapes (SGD at the base config's 0.02
# gets ~0.14 in as many); about 4 minutes on one CPU thread. Enough to show the demo, not a real model.
QUICK_ITERS = 600
QUICK_SOLVER = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4}
QUICK_DATA = {"num_train": 1000, "num_val": 50, "image_size": 320, "seed": 0}  # the quick model's shapes set
WINDOW, EXPLAIN_WINDOW = "roikit demo", "roikit demo: pooling"
PROG = "demo.py"


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- the model
def _quick_config(cfg: dict, path: Path, iters: int) -> dict:
    """``cfg`` set up for the quick schedule on a small synthetic set next to the cached checkpoint."""
    n = cfg["model"]["num_classes"]
    if n not in (None, len(SHAPE_CLASSES)):
        raise ValueError(f"no --checkpoint: the quick model trains on the {len(SHAPE_CLASSES)}-class shapes set, but "
                         f"model.num_classes is {n}; give a --checkpoint trained with tools/train.py")
    paths = dict.fromkeys(("train_images", "train_annotations", "val_images", "val_annotations"))
    return merge_config(cfg, {
        "model": {"num_classes": len(SHAPE_CLASSES)},
        "data": {**paths, "shapes": {"root": str(path.parent / "shapes"), **QUICK_DATA}},
        "solver": {**QUICK_SOLVER, "max_iter": iters, "warmup_iters": min(100, max(iters // 6, 1))},
        "train": {"checkpoint_period": 0, "eval_period": 0},
    }, "the quick model's settings")


def _saved_config(path: Path) -> dict | None:
    from roikit.engine import read_checkpoint

    return read_checkpoint(path).get("config")


def quick_checkpoint(cfg: dict, path: Path, iters: int) -> Path:
    """The cached quick model for ``cfg`` at ``path``, trained first (``iters`` iterations) when it is missing or
    was made for another model, data or schedule."""
    quick = _quick_config(cfg, path, iters)
    if path.is_file():
        try:
            saved = _saved_config(path)
        except ValueError:
            saved = None
        if saved is not None and all(saved.get(k) == quick[k] for k in ("model", "data", "solver")):
            say(f"no --checkpoint: using the quick model {path} ({iters} iterations on the synthetic shapes; "
                f"train a real one with tools/train.py)")
            return path
        say(f"no --checkpoint: {path} was made for another config; training it again")
    from roikit.engine.trainer import train

    run_dir = path.parent / f"{path.stem}_train"
    shutil.rmtree(run_dir, ignore_errors=True)  # the last quick training's, whose result is replaced
    say(f"no --checkpoint: training a quick model ({iters} iterations on the synthetic shapes, a few minutes on "
        f"a CPU, {torch.get_num_threads()} thread(s)) in {run_dir}; it is cached as {path} for the next runs")
    train(quick, run_dir, progress=sys.stderr.isatty())
    ckpt = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    atomic_torch_save(path, {k: ckpt[k] for k in ("model", "config", "iteration")})  # no optimizer state
    return path


def class_names_of(cfg: dict, num_classes: int) -> tuple[str, ...]:
    """Names for labels 1..num_classes: the categories of the config's annotation files, the shapes' names when
    it trains on the synthetic set, else numbers."""
    d = cfg["data"]
    for key in ("val_annotations", "train_annotations"):
        if d[key] and Path(d[key]).is_file():
            try:
                cats = json.loads(Path(d[key]).read_text())["categories"]
                names = tuple(str(c["name"]) for c in sorted(cats, key=lambda c: c["id"]))  # CocoDetection's order
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if len(names) == num_classes:
                return names
    if d["train_annotations"] is None and num_classes == len(SHAPE_CLASSES):
        return SHAPE_CLASSES
    return tuple(f"class {i}" for i in range(1, num_classes + 1))


def load_detector(cfg: dict, checkpoint: Path, device: torch.device):
    """(model in eval mode, the config with ``num_classes`` filled in, class names); ValueError on a checkpoint
    that is missing, unreadable or made for another model than ``cfg`` describes."""
    from roikit.engine.trainer import load_checkpoint

    if cfg["model"]["num_classes"] is None:  # from the checkpoint's config (load_checkpoint reads it again)
        n = (_saved_config(checkpoint) or {}).get("model", {}).get("num_classes")
        if not isinstance(n, int):
            raise ValueError(f"checkpoint {checkpoint} has no config; set model.num_classes=N")
        cfg = apply_overrides(cfg, [f"model.num_classes={n}"])
    try:
        model = build_detector(cfg)
    except ValueError as e:
        raise ValueError(f"config: {e}") from e
    load_checkpoint(checkpoint, model=model, cfg=cfg)  # refuses another model config or other tensor shapes
    return model.to(device).eval(), cfg, class_names_of(cfg, cfg["model"]["num_classes"])


def to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """BGR uint8 [H, W, 3] -> RGB float [3, H, W] in [0, 1], as the training set feeds it."""
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div_(255.0)


@torch.inference_mode()
def detect(model, image: np.ndarray, score_threshold: float) -> dict[str, np.ndarray]:
    """Detections of one BGR image with a score >= ``score_threshold``, best first: boxes [K, 4] (x1, y1, x2, y2
    pixels), labels [K] (from 1), scores [K]."""
    device = next(model.parameters()).device
    out = model([to_tensor(image, device)])[0]
    keep = out["scores"] >= score_threshold
    order = torch.argsort(out["scores"][keep], descending=True, stable=True)
    return {k: out[k][keep][order].cpu().numpy() for k in ("boxes", "labels", "scores")}


# ------------------------------------------------------------------------------------------------ explain pooling
@dataclass
class RuleView:
    """What one rule does to one box, in the pixels of the network's input."""

    name: str  # caption's first line
    cells: list[tuple[float, float, float, float]]  # the cells the rule reads (x1, y1, x2, y2 px), one per cell
    bins: list[tuple[float, float, float, float]]  # the rectangle of each bin (px)
    points: np.ndarray  # [S, 2] sample points (x, y px); empty for the quantized rules
    crop: np.ndarray  # [PH, PW, 3] float RGB in [0, 1], the pooled picture
    summary: str  # caption's second line


def network_input(model, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The picture as the backbone gets it (resized by the model's transform, float RGB [H', W', 3] in [0, 1])
    and the (x, y) factors from the original image's pixels to its pixels."""
    t = model.transform
    with torch.inference_mode():
        images, _ = t([to_tensor(image, next(model.parameters()).device)])
    h, w = images.image_sizes[0]
    mean = torch.tensor(t.image_mean, device=images.tensors.device)[:, None, None]
    std = torch.tensor(t.image_std, device=images.tensors.device)[:, None, None]
    seen = (images.tensors[0, :, :h, :w] * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return seen, (w / image.shape[1], h / image.shape[0])


def box_stride(cfg: dict, pooler, box: np.ndarray) -> int:
    """The stride of the map the model pools ``box`` (network pixels) from: the one map of ``small_cnn``, or
    the FPN level the pooler assigns it (``resnet_fpn`` pools maps at strides 4 to 32: levels 2 to 5)."""
    b = cfg["model"]["backbone"]
    if b["name"] == "small_cnn":
        return int(b["stride"])
    level = assign_boxes_to_levels(torch.as_tensor(box, dtype=torch.float32)[None], 2, 5, pooler.canonical_scale,
                                   pooler.canonical_level)
    return 2 ** (2 + int(level[0]))


def stride_map(picture: np.ndarray, stride: int) -> torch.Tensor:
    """The picture as a 3-channel feature map [1, 3, ceil(H / s), ceil(W / s)] (float64): each cell the mean of
    the pixels it covers (a partial last cell averages the ones it has)."""
    x = torch.from_numpy(np.ascontiguousarray(picture.transpose(2, 0, 1))).double()[None]
    h, w = x.shape[-2:]
    pad = (0, -w % stride, 0, -h % stride)
    ones = torch.nn.functional.pad(torch.ones(1, 1, h, w, dtype=x.dtype), pad)
    total = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, pad), stride)
    return total / torch.nn.functional.avg_pool2d(ones, stride)


def exact_bin_means(picture: np.ndarray, box: np.ndarray, pooled: int) -> np.ndarray:
    """The true mean colour of each of the ``pooled x pooled`` equal bins of ``box``, at full resolution:
    every pixel weighted by the part of it inside the bin. [P, P, 3]."""
    h, w = picture.shape[:2]

    def weights(lo: float, hi: float, n: int) -> np.ndarray:  # [P, n]: overlap of bin p with pixel i
        edges = lo + (hi - lo) * np.arange(pooled + 1) / pooled
        i = np.arange(n)
        return np.clip(np.minimum(edges[1:, None], i + 1) - np.maximum(edges[:-1, None], i), 0, None)

    wy, wx = weights(box[1], box[3], h), weights(box[0], box[2], w)
    total = np.einsum("pi,ijc,qj->pqc", wy, picture.astype(np.float64), wx)
    area = wy.sum(1)[:, None, None] * wx.sum(1)[None, :, None]
    return total / np.maximum(area, 1e-12)


def _cells_px(cells: Iterable[tuple[int, int]], stride: int) -> list[tuple[float, float, float, float]]:
    """Cells (row, col) -> their rectangles (x1, y1, x2, y2) in pixels."""
    return [(c * stride, r * stride, (c + 1) * stride, (r + 1) * stride) for r, c in cells]


def quantized_view(rule: str, fmap: torch.Tensor, box: np.ndarray, stride: int, pooled: int) -> RuleView:
    """``roi_pool``'s cells from its own rule function (``bin_edges``); the crop is the mean of each bin's cells
    (the op takes their max per channel; the mean shows where the rule looks without the max's brightening)."""
    hm, wm = fmap.shape[-2:]
    rois = torch.tensor([[0.0, *box]], dtype=torch.float32)
    (hs, he), (ws, we) = bin_edges(rois, 1.0 / stride, (pooled, pooled), rule, (hm, wm))
    hs, he, ws, we = (t[0].tolist() for t in (hs, he, ws, we))
    crop = np.zeros((pooled, pooled, 3))
    bins = []
    for p in range(pooled):
        for q in range(pooled):
            if he[p] > hs[p] and we[q] > ws[q]:
                crop[p, q] = fmap[0, :, hs[p]:he[p], ws[q]:we[q]].mean(dim=(1, 2)).numpy()
            bins.append((ws[q] * stride, hs[p] * stride, we[q] * stride, he[p] * stride))
    rows = sorted({r for a, b in zip(hs, he) for r in range(a, b)})
    cols = sorted({c for a, b in zip(ws, we) for c in range(a, b)})
    size = (box[2] - box[0]) / stride, (box[3] - box[1]) / stride
    cells = _cells_px(((r, c) for r in rows for c in cols), stride)
    return RuleView(f'roi_pool rounding="{rule}"', cells, bins, np.zeros((0, 2)), crop,
                    f"reads {len(cols)} x {len(rows)} of {size[0]:.2f} x {size[1]:.2f} cells")


def roi_align_view(fmap: torch.Tensor, box: np.ndarray, stride: int, pooled: int, sampling_ratio: int,
                   aligned: bool) -> RuleView:
    """``roi_align`` itself pools the crop; its sample points come from the op's own grid function, and the cells
    it reads are those its gradient reaches."""
    scale = 1.0 / stride
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    crop = roi_align(fmap, rois, pooled, scale, sampling_ratio, aligned)[0].permute(1, 2, 0).numpy()
    (y1, bin_h, gh), (x1, bin_w, gw) = roi_align_grid(rois, scale, (pooled, pooled), sampling_ratio, aligned)

    def axis(start, size, g):  # the op's sample coordinates in cells (cell u's value sits at u) -> pixels
        g = max(int(g[0]), 1)
        p = torch.arange(pooled, dtype=torch.float64)[:, None]
        i = torch.arange(g, dtype=torch.float64)[None, :]
        return ((start[0] + p * size[0] + (i + 0.5) * size[0] / g).reshape(-1) + 0.5) * stride

    ys, xs = axis(y1, bin_h, gh), axis(x1, bin_w, gw)
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2).numpy()
    probe = fmap[:, :1].clone().fill_(1.0).requires_grad_(True)
    roi_align(probe, rois, pooled, scale, sampling_ratio, aligned).sum().backward()
    weight = probe.grad[0, 0]
    read = torch.nonzero(weight > 1e-9 * float(weight.max())).tolist() if weight.max() > 0 else []
    cells = _cells_px(read, stride)
    rows, cols = {r for r, _ in read}, {c for _, c in read}
    edges_x = (x1[0] + torch.arange(pooled + 1) * bin_w[0] + 0.5).numpy() * stride  # bin edges, pixels
    edges_y = (y1[0] + torch.arange(pooled + 1) * bin_h[0] + 0.5).numpy() * stride
    bins = [(edges_x[q], edges_y[p], edges_x[q + 1], edges_y[p + 1]) for p in range(pooled) for q in range(pooled)]
    return RuleView(f"roi_align aligned={aligned}, {int(gh[0])}x{int(gw[0])}/bin", cells, bins, points,
                    crop, f"reads {len(cols)} x {len(rows)} cells (bilinear)")


def _panel_frame(box: np.ndarray, views: list[RuleView], stride: int, size_hw: tuple[int, int]):
    """The part of the picture every panel shows: the box, every cell read and a cell's margin."""
    rects = [box] + [c for v in views for c in v.cells]
    x1 = min(r[0] for r in rects) - stride
    y1 = min(r[1] for r in rects) - stride
    x2 = max(r[2] for r in rects) + stride
    y2 = max(r[3] for r in rects) + stride
    h, w = size_hw
    return (max(int(math.floor(x1)), 0), max(int(math.floor(y1)), 0), min(int(math.ceil(x2)), w),
            min(int(math.ceil(y2)), h))


def _to_bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


def _rule_panel(base: np.ndarray, frame, zoom: tuple[float, float], view: RuleView, box: np.ndarray, stride: int,
                colour, panel: int) -> np.ndarray:
    fx, fy = frame[0], frame[1]
    sx, sy = zoom

    def px(r):  # network pixels -> panel pixels
        return ((r[0] - fx) * sx, (r[1] - fy) * sy, (r[2] - fx) * sx, (r[3] - fy) * sy)

    img = base.copy()
    draw_cell_grid(img, stride * sx, origin=(-fx * sx, -fy * sy), colour=(150, 150, 150))
    draw_rects(img, [px(c) for c in view.cells], colour, thickness=0, fill_alpha=0.35)
    draw_rects(img, [px(b) for b in view.bins], colour, thickness=1)
    draw_rects(img, [px(box)], (255, 255, 255), thickness=1)
    if len(view.points):
        pts = np.stack([(view.points[:, 0] - fx) * sx, (view.points[:, 1] - fy) * sy], 1)
        gap = min(np.diff(np.unique(np.round(pts[:, 0], 1))).min(initial=panel),
                  np.diff(np.unique(np.round(pts[:, 1], 1))).min(initial=panel))  # closest samples, panel px
        radius = int(np.clip(gap / 5, 1, 3))
        draw_points(img, pts, (0, 255, 255), radius=radius, outline=(0, 0, 0) if radius >= 2 else None)
    return pad_to(img, panel, panel)


def _crop_panel(crop: np.ndarray, panel: int) -> np.ndarray:
    k = max(panel // crop.shape[0], 1)
    big = cv2.resize(_to_bgr(crop), (crop.shape[1] * k, crop.shape[0] * k), interpolation=cv2.INTER_NEAREST)
    return pad_to(big, panel, panel)


RULE_COLOURS = {"integer": (60, 60, 255), "torchvision": (255, 160, 40), "roi_align": (80, 230, 80)}


def explain_pooling(model, cfg: dict, image: np.ndarray, detections: dict[str, np.ndarray], index: int,
                    class_names, *, panel: int = 256) -> tuple[np.ndarray, dict]:
    """The explain view of detection ``index`` (a BGR image of fixed size for a given ``panel``) and its numbers.

    Top row: the picture with the detection, then per rule the cells it reads (tinted), its bins (outlined), the
    box (white) and, for ``roi_align``, the sample points, over a zoom of the picture with the feature grid. Bottom
    row: the exact 7x7 bin means of the box, then each rule's 7x7 crop of the picture's stride map, with its mean
    error against the exact one in grey levels.
    """
    pooler = model.roi_heads.box_roi_pool
    pooled = pooler.output_size[0]
    seen, (kx, ky) = network_input(model, image)
    box = detections["boxes"][index].astype(np.float64) * np.array([kx, ky, kx, ky])
    label, score = int(detections["labels"][index]), float(detections["scores"][index])
    stride = box_stride(cfg, pooler, box)
    fmap = stride_map(seen, stride)
    if pooler.op == "roi_align":
        sampling_ratio = int(pooler.op_options.get("sampling_ratio", pooler.sampling_ratio))
        aligned = bool(pooler.op_options.get("aligned", False))
    else:  # show the base config's RoIAlign
        sampling_ratio, aligned = 2, True
    views = [quantized_view("integer", fmap, box, stride, pooled),
             quantized_view("torchvision", fmap, box, stride, pooled),
             roi_align_view(fmap, box, stride, pooled, sampling_ratio, aligned)]
    own = {"roi_pool": pooler.op_options.get("rounding", "torchvision"), "roi_align": "roi_align"}.get(pooler.op)
    exact = exact_bin_means(seen, box, pooled)
    errors = [float(np.abs(v.crop - exact).mean() * 255.0) for v in views]

    frame = _panel_frame(box, views, stride, seen.shape[:2])
    crop = _to_bgr(seen[frame[1]:frame[3], frame[0]:frame[2]])
    fw, fh = frame[2] - frame[0], frame[3] - frame[1]
    zoomed, _ = resize_to_fit(crop, panel, panel, cv2.INTER_NEAREST if panel >= max(fw, fh) else cv2.INTER_AREA)
    zoom = (zoomed.shape[1] / fw, zoomed.shape[0] / fh)
    zoomed = (zoomed * 0.7).astype(np.uint8)  # dimmed, so the overlays stand out

    overview = _to_bgr(seen)
    draw_detections(overview, box[None], [label], [score], class_names)
    draw_rects(overview, [frame], (255, 255, 255), thickness=1)
    overview, _ = resize_to_fit(overview, panel, panel)
    top = [pad_to(overview, panel, panel)]
    keys = ["integer", "torchvision", "roi_align"]
    top += [_rule_panel(zoomed, frame, zoom, v, box, stride, RULE_COLOURS[k], panel) for v, k in zip(views, keys)]
    bottom = [_crop_panel(exact, panel)] + [_crop_panel(v.crop, panel) for v in views]
    name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
    w, h = box[2] - box[0], box[3] - box[1]
    captions = [f"detection {index}: {name} {score:.2f}\n{w:.0f} x {h:.0f} px at the net's "
                f"{seen.shape[1]}x{seen.shape[0]}, stride {stride}\nwhite frame: the part zoomed in"]
    captions += [f"{v.name}\n{v.summary}\n{'(the rule of this model)' if own == k else ''}"
                 for v, k in zip(views, keys)]
    captions += [f"exact {pooled}x{pooled} bin means\n(full resolution)"]
    captions += [f"{k}: {pooled}x{pooled} crop, {'mean of each bin' if k != 'roi_align' else 'the op'}\n"
                 f"error {e:.1f} grey levels" for k, e in zip(keys, errors)]
    view = tile_images(top + bottom, captions, columns=4)
    info = {"detection": index, "box_net_px": [round(float(v), 2) for v in box], "stride": stride,
            "crop_error": dict(zip(keys, [round(e, 2) for e in errors]))}
    return view, info


def blank_explain(panel: int, message: str) -> np.ndarray:
    """An explain view of the same size as :func:`explain_pooling`'s, for a frame with nothing to explain."""
    tiles = [put_text_lines(pad_to(np.zeros((1, 1, 3), np.uint8), panel, panel), message, (8, 8))]
    tiles += [pad_to(np.zeros((1, 1, 3), np.uint8), panel, panel) for _ in range(7)]
    return tile_images(tiles, ["\n\n"] * 8, columns=4)


# -------------------------------------------------------------------------------------------------------- inputs
@dataclass
class Source:
    kind: str  # image | folder | video | camera
    name: str  # output name stem (video, camera)
    paths: list[Path]  # image, folder
    capture: cv2.VideoCapture | None = None
    fps: float = 30.0


def read_image(path: Path, *, warn: bool = True) -> np.ndarray:
    """The BGR image in ``path``; ValueError when it cannot be decoded. A JPEG file that ends before its image
    does decodes with its missing part filled in: ``warn`` says so."""
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path}: not an image file OpenCV can decode, or damaged")
    problem = jpeg_truncation(path) if warn else None
    if problem:
        say(f"warning: {path} is incomplete ({problem}): its missing part is drawn grey")
    return image


def jpeg_truncation(path: Path) -> str | None:
    """Why the JPEG file ``path`` is cut short (its data ends before its image does), or None (complete, or not a
    JPEG). OpenCV decodes such a file without an error; Pillow, reading it at 1/8 scale, stops at the gap."""
    from PIL import Image

    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return None
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(im.width // 8, 1), max(im.height // 8, 1)))  # libjpeg's scaled decode
            im.load()
    except OSError as e:  # "image file is truncated (279 bytes not processed)"
        return str(e)
    return None


def output_names(paths: list[Path]) -> dict[Path, dict[str, str]]:
    """The files each input image's results go to, no two the same: ``image`` (the annotated image, under the
    input's own file name), ``explain`` (``<stem>_explain.png``) and ``json`` (``<stem>.json``). Inputs sharing a
    stem (``a.png``, ``a.jpg``) use stems with the suffix (``a_png``, ``a_jpg``); a stem whose names are still
    taken (by ``x.png`` and an input ``x_explain.png``) gets a number (``x_2``)."""
    annotated = {p: p.name if p.suffix.lower() in IMAGE_SUFFIXES else f"{p.stem}.png" for p in paths}
    taken = set(annotated.values())
    stems = Counter(p.stem for p in paths)
    names = {}
    for p in paths:
        base = p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}"
        stem, n = base, 1
        while {f"{stem}_explain.png", f"{stem}.json"} & taken:
            n += 1
            stem = f"{base}_{n}"
        taken |= {f"{stem}_explain.png", f"{stem}.json"}
        names[p] = {"image": annotated[p], "explain": f"{stem}_explain.png", "json": f"{stem}.json"}
    return names


def open_source(text: str) -> Source:
    """``--input``: a camera index, an image, a folder of images or a video file (ValueError when it cannot be
    read)."""
    if text.strip().isdigit():
        index = int(text)
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # each backend logs its own failure
        try:
            cap = cv2.VideoCapture(index)
        finally:
            cv2.utils.logging.setLogLevel(level)
        if not cap.isOpened():
            raise ValueError(f"cannot open camera {index}")
        return Source("camera", f"camera{index}", [], cap, cap.get(cv2.CAP_PROP_FPS) or 30.0)
    path = Path(text)
    if not path.exists():
        raise ValueError(f"input not found: {path}")
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return Source("folder", path.name, images)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        read_image(path, warn=False)  # fail now, before loading a model (and warn once, when it is run)
        return Source("image", path.stem, [path])
    cap = cv2.VideoCapture(str(path))
    ok = cap.isOpened() and cap.grab()
    if not ok:
        cap.release()
        if path.suffix.lower() not in VIDEO_SUFFIXES and cv2.imread(str(path), cv2.IMREAD_COLOR) is not None:
            return Source("image", path.stem, [path])
        raise ValueError(f"cannot open video {path}: not a video file OpenCV can decode, or damaged")
    cap.release()
    cap = cv2.VideoCapture(str(path))  # from the first frame again
    fps = cap.get(cv2.CAP_PROP_FPS)
    return Source("video", path.stem, [], cap, fps if fps and fps > 0 else 30.0)


class VideoOut:
    """A video written to a temporary file and renamed into place when complete: mp4v ``.mp4``, else MJPG
    ``.avi``. Opened at the first frame, which sets its size."""

    def __init__(self, folder: Path, stem: str, fps: float):
        self.folder, self.stem, self.fps = folder, stem, fps
        self.writer: cv2.VideoWriter | None = None
        self.tmp = self.path = None

    def write(self, frame: np.ndarray) -> None:
        if self.writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for fourcc, suffix in (("mp4v", ".mp4"), ("MJPG", ".avi")):
                self.path = self.folder / f"{self.stem}{suffix}"
                self.tmp = self.folder / f".{self.stem}.tmp{suffix}"
                size = (frame.shape[1], frame.shape[0])
                self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*fourcc), self.fps, size)
                if self.writer.isOpened():
                    break
            else:
                raise ValueError(f"cannot write a video in {self.folder} (neither mp4v nor MJPG works)")
        self.writer.write(frame)

    def close(self) -> Path | None:
        if self.writer is None:
            return None
        self.writer.release()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.release()
            Path(self.tmp).unlink(missing_ok=True)


def display_problem() -> str | None:
    """Why a window cannot open here (None: it can). Qt aborts the whole process when it finds no display
    instead of raising ``cv2.error``, so the first window is opened in a child process."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) \
            and os.environ.get("QT_QPA_PLATFORM", "") in ("", "xcb", "wayland"):
        return "DISPLAY is not set"
    probe = "import cv2, numpy; cv2.imshow('probe', numpy.zeros((8, 8, 3), numpy.uint8)); cv2.waitKey(1)"
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "opening a window timed out"
    if r.returncode != 0:
        lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
        named = [line for line in lines if "display" in line.lower()] or lines  # Qt's own reason comes first
        return named[0] if named else f"a test window could not open (exit status {r.returncode})"
    return None


# ---------------------------------------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--input", required=True, metavar="PATH|INDEX",
                        help="an image, a folder of images, a video file, or a camera index (0)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint from tools/train.py; none: train a quick model once and reuse it")
    parser.add_argument("--quick-checkpoint", default=str(DEFAULT_QUICK),
                        help="where the quick model is cached (default: %(default)s)")
    parser.add_argument("--quick-iters", type=int, default=QUICK_ITERS,
                        help="iterations of the quick model (default: %(default)s)")
    parser.add_argument("--output-dir", default=None,
                        help=f"annotated images / video go here (default: {DEFAULT_OUTPUT}, none with --show)")
    parser.add_argument("--show", action="store_true", help="show the results in a window (q or Esc quits)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw detections scoring at least this (default: %(default)s)")
    parser.add_argument("--explain-pooling", action="store_true",
                        help="also draw, for one detection, the cells each pooling rule reads and its 7x7 crop")
    parser.add_argument("--detection", type=int, default=0, metavar="INDEX",
                        help="the detection to explain, 0 = the top-scoring one (default: %(default)s)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop a video or camera after this many frames")
    parser.add_argument("--save-detections", action="store_true",
                        help="also write the detections as JSON (<name>.json)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default: %(default)s; the small model is fastest on one, and "
                             "several slow down ten-fold when another process holds a core)")
    parser.add_argument("opts", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. model.rpn.nms_thresh=0.6")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.detection < 0:
        raise ValueError(f"--detection must be >= 0, got {args.detection}")
    if args.detection and not args.explain_pooling:
        raise ValueError("--detection chooses the detection --explain-pooling explains; add --explain-pooling")
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.quick_iters < 1:
        raise ValueError(f"--quick-iters must be >= 1, got {args.quick_iters}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")


class Runner:
    """Detects, draws, writes and shows frames; holds what every frame shares."""

    def __init__(self, args, model, cfg, class_names, output_dir: Path | None, show: bool):
        self.args, self.model, self.cfg, self.class_names = args, model, cfg, class_names
        self.output_dir, self.show = output_dir, show
        self.quit = False
        # the model drops scores under model.roi_heads.score_thresh itself; a lower --score-threshold shows more
        # (set on the module, not in the config, which must stay the checkpoint's)
        model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, args.score_threshold)

    def annotate(self, image: np.ndarray, fps: float | None = None):
        t0 = time.perf_counter()
        dets = detect(self.model, image, self.args.score_threshold)
        t1 = time.perf_counter()
        drawn = draw_detections(image.copy(), dets["boxes"], dets["labels"], dets["scores"], self.class_names)
        if fps is not None:
            put_text_lines(drawn, f"{fps:.1f} fps", (4, drawn.shape[0] - 24))
        t2 = time.perf_counter()
        return dets, drawn, (t1 - t0, t2 - t1)

    def explain(self, image: np.ndarray, dets: dict, where: str, *, quiet: bool = False):
        k = self.args.detection
        if k >= len(dets["scores"]):
            message = (f"{where}: no detection {k} to explain ({len(dets['scores'])} with a score >= "
                       f"{self.args.score_threshold})")
            if not quiet:
                say(message)
            return blank_explain(256, f"no detection {k}\nto explain"), None
        return explain_pooling(self.model, self.cfg, image, dets, k, self.class_names)

    def display(self, drawn: np.ndarray, view: np.ndarray | None, wait: int) -> None:
        if not self.show:
            return
        cv2.imshow(WINDOW, drawn)
        if view is not None:
            cv2.imshow(EXPLAIN_WINDOW, view)
        key = cv2.waitKey(wait) & 0xFF
        if key in (ord("q"), 27):
            self.quit = True

    def record(self, dets: dict) -> dict:
        return {"boxes": np.round(dets["boxes"], 2).tolist(), "labels": dets["labels"].tolist(),
                "names": [self.class_names[i - 1] if 1 <= i <= len(self.class_names) else str(i)
                          for i in dets["labels"].tolist()],
                "scores": dets["scores"].tolist()}

    def run_images(self, paths: list[Path]) -> int:
        """Each image in turn; one that cannot be read or run is reported and skipped. Returns how many were."""
        names, failed = output_names(paths), 0
        for path in paths:
            try:
                self.run_image(path, names[path])
            except ValueError as e:
                failed += 1
                say(f"error: {e}" + ("; skipped" if len(paths) > 1 else ""))
            if self.quit:
                break
        if failed and len(paths) > 1:
            say(f"error: {failed} of {len(paths)} images could not be read or run (above); the others are done")
        return failed

    def run_image(self, path: Path, names: dict[str, str]) -> None:
        image = read_image(path)
        try:
            dets, drawn, (t_model, t_draw) = self.annotate(image)
            view, info = self.explain(image, dets, path.name) if self.args.explain_pooling else (None, None)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        written = []
        if self.output_dir is not None:
            written.append(_write_image(self.output_dir / names["image"], drawn))
            if view is not None and info is not None:
                written.append(_write_image(self.output_dir / names["explain"], view))
            if self.args.save_detections:
                record = {"image": path.name, "size": [image.shape[1], image.shape[0]], **self.record(dets)}
                if info is not None:
                    record["explain"] = info
                atomic_save_json(self.output_dir / names["json"], record)
                written.append(self.output_dir / names["json"])
        print(f"{path.name}: {len(dets['scores'])} detection(s), {1000 * t_model:.0f} ms model + "
              f"{1000 * t_draw:.0f} ms drawing" + (f" -> {', '.join(map(str, written))}" if written else ""),
              flush=True)
        if info is not None:
            box = " ".join(f"{v:.1f}" for v in info["box_net_px"])
            print(f"  pooling of detection {info['detection']} (box {box} at the network's input, stride "
                  f"{info['stride']}); its arithmetic: python tools/explain.py --box {box} --stride "
                  f"{info['stride']}", flush=True)
        self.display(drawn, view, 0)

    def run_video(self, source: Source) -> None:
        out = VideoOut(self.output_dir, source.name, source.fps) if self.output_dir is not None else None
        out_explain = VideoOut(self.output_dir, f"{source.name}_explain", source.fps) \
            if self.output_dir is not None and self.args.explain_pooling else None
        records, frames, fps, busy = [], 0, None, 0.0
        t_model_sum = t_draw_sum = 0.0
        try:
            while not self.quit and (self.args.max_frames is None or frames < self.args.max_frames):
                t0 = time.perf_counter()  # a frame's time: decode, detect, draw, encode, show
                ok, image = source.capture.read()
                if not ok:
                    break
                dets, drawn, (t_model, t_draw) = self.annotate(image, fps)
                view = None
                if self.args.explain_pooling:
                    view, _ = self.explain(image, dets, f"frame {frames}", quiet=True)
                t_model_sum, t_draw_sum = t_model_sum + t_model, t_draw_sum + t_draw
                if out is not None:
                    out.write(drawn)
                if out_explain is not None:
                    out_explain.write(view)
                if self.args.save_detections:
                    records.append({"frame": frames, **self.record(dets)})
                frames += 1
                self.display(drawn, view, 1)
                spent = time.perf_counter() - t0
                busy += spent
                fps = 1.0 / spent if fps is None else 0.9 * fps + 0.1 / spent  # drawn on the next frame
        except KeyboardInterrupt:
            say("interrupted; closing the video")
        except BaseException:
            for video in (out, out_explain):
                if video is not None:
                    video.discard()
            raise
        finally:
            source.capture.release()
        if frames == 0:
            raise ValueError(f"no frame could be read from {self.args.input}")
        written = [p for p in (out.close() if out else None, out_explain.close() if out_explain else None) if p]
        if self.args.save_detections and self.output_dir is not None:
            atomic_save_json(self.output_dir / f"{source.name}.json", {"input": self.args.input, "frames": records})
            written.append(self.output_dir / f"{source.name}.json")
        print(f"{source.name}: {frames} frame(s), {frames / busy:.1f} fps in all ({1000 * t_model_sum / frames:.0f} "
              f"ms model + {1000 * t_draw_sum / frames:.0f} ms drawing a frame, the rest reading and writing)"
              + (f" -> {', '.join(map(str, written))}" if written else ""), flush=True)


def _write_image(path: Path, image: np.ndarray) -> Path:
    params = [cv2.IMWRITE_PNG_COMPRESSION, 6] if path.suffix.lower() == ".png" else []  # 1/3 the size of 1's
    ok, data = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise ValueError(f"cannot encode {path}")
    atomic_write_bytes(path, data.tobytes())
    return path


def _check_output_dir(output_dir: Path, source: Source, input_text: str) -> None:
    """Refuse an output folder where a result would replace an input."""
    out = output_dir.resolve()
    if source.paths and out in {p.parent.resolve() for p in source.paths}:
        raise ValueError(f"--output-dir {output_dir} holds the input images, which the results would replace")
    if source.kind == "video" and Path(input_text).resolve() in {out / f"{source.name}{s}" for s in (".mp4", ".avi")}:
        raise ValueError(f"--output-dir {output_dir}: the annotated video would replace the input {input_text}")


def main(args: argparse.Namespace) -> int:
    show, threads, source = False, torch.get_num_threads(), None
    try:
        _check_args(args)
        source = open_source(args.input)  # bad input fails before a model is loaded or trained
        if args.show:
            problem = display_problem()
            if problem:
                say(f"--show: no display available ({problem}); writing files instead")
            show = problem is None
        output_dir = Path(args.output_dir) if args.output_dir else (None if show else DEFAULT_OUTPUT)
        if output_dir is not None:
            _check_output_dir(output_dir, source, args.input)
            output_dir = make_output_dir(output_dir, "--output-dir")
        cfg = load_config(args.config, args.opts)
        torch.set_num_threads(args.threads)
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        else:
            checkpoint = quick_checkpoint(cfg, Path(args.quick_checkpoint), args.quick_iters)
            cfg = _quick_config(cfg, checkpoint, args.quick_iters)
        model, cfg, class_names = load_detector(cfg, checkpoint, torch.device(args.device))
        runner = Runner(args, model, cfg, class_names, output_dir, show)
        if source.kind in ("image", "folder"):
            if runner.run_images(source.paths):
                return 1
        else:
            runner.run_video(source)
    except (ValueError, FloatingPointError, OSError) as e:  # OSError: an output that cannot be written
        say(f"error: {e}")
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)
        if source is not None and source.capture is not None:
            source.capture.release()
        if show:
            cv2.destroyAllWindows()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
