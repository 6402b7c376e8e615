"""A synthetic COCO-format detection data set: coloured shapes on textured backgrounds, rendered with OpenCV.

Six classes (``SHAPE_CLASSES``) that a small CNN can tell apart. Each image holds 1 to 6 shapes; their sizes are
drawn so the boxes fill COCO's small (area < 32^2), medium (< 96^2) and large buckets about a third each. Later
shapes may partly cover earlier ones, but every shape keeps at least ``MIN_VISIBLE`` of its pixels.

Boxes are exact: shapes are filled without anti-aliasing, each pixel belongs to the background or to exactly one
shape, and the box is the tight box of the shape's visible pixels. A pixel (col i, row j) covers [i, i + 1) x
[j, j + 1), so a shape whose visible pixels span columns x0..x1 gets ``x = x0, w = x1 - x0 + 1`` (COCO
``[x, y, w, h]``). ``area`` is the box area ``w * h``: there are no masks, and COCOeval buckets a detection by its
box area too, so ground truth and detections land in the same bucket.

Shapes are flat colours. Every colour is far from the background's whole range in at least one channel, and shapes
differ from each other, so the visible pixels of a shape can be read back from the image alone (the tests do).

Each image has its own random stream (``SeedSequence([seed, split, index])``): the data set is the same bytes for a
seed, whatever the number of images, and train and val never share an image.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from roikit.io import atomic_save_json
from roikit.utils.checks import check_int

__all__ = ["SHAPE_CLASSES", "render_image", "make_shapes_dataset", "ensure_shapes_dataset"]

SHAPE_CLASSES = ("circle", "rectangle", "triangle", "star", "hexagon", "cross")

# Bump when the rendering changes: ensure_shapes_dataset then regenerates old folders.
GENERATOR_VERSION = 1

MIN_VISIBLE = 0.6  # fraction of a shape's pixels that must stay visible after later shapes are drawn
MAX_SHAPES = 6
# Box side (sqrt of the box area, in pixels) per COCO bucket, drawn log-uniformly. The gaps around 32 and 96 leave
# room for rasterisation and occlusion, which shrink a box a little.
SIDE_RANGES = ((12.0, 29.0), (36.0, 88.0), (104.0, 180.0))
TEXTURE_AMPLITUDE = 30  # background = base colour +- this, per channel
MIN_BACKGROUND_CONTRAST = TEXTURE_AMPLITUDE + 50  # a shape colour is this far from the base colour in some channel
MIN_SHAPE_CONTRAST = 40  # two shape colours differ by this much in some channel
MIN_IMAGE_SIDE = 64
_SPLITS = ("train", "val")
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")


@dataclass
class _Shape:
    class_index: int
    colour: np.ndarray  # uint8 [3], BGR
    full_area: int  # pixels when drawn (before later shapes cover part of it)
    box: list[float]  # tight [x, y, w, h] of the visible pixels
    area: float  # w * h


def _image_hw(image_size: int | Sequence[int], name: str = "image_size") -> tuple[int, int]:
    """(height, width) from an int or a pair of ints (numpy's too), each between 64 and 4096."""
    try:
        h = w = check_int(image_size, name, integral=True)
    except ValueError:
        if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {image_size!r}") from None
        h, w = (check_int(v, f"{name}[{i}]", integral=True) for i, v in enumerate(image_size))
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > 4096:
        raise ValueError(f"{name} must be between {MIN_IMAGE_SIDE} and 4096 pixels per side, got {(h, w)}")
    return h, w


def _unit_polygon(rng: np.random.Generator, class_index: int) -> np.ndarray:
    """Vertices [V, 2] of one shape around the origin, rotated; the scale is fixed later from its box."""
    name = SHAPE_CLASSES[class_index]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if name == "circle":
        t = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "rectangle":
        aspect = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))  # squares and long bars
        hw, hh = 0.5 * math.sqrt(aspect), 0.5 / math.sqrt(aspect)
        pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        angle = rng.uniform(-math.pi / 6, math.pi / 6)  # mostly axis-aligned: keep them rectangles, not diamonds
    elif name == "triangle":
        t = np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.2, 0.2, 3)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "star":
        t = np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif name == "hexagon":
        t = np.arange(6) * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    else:  # cross: a plus sign with arms 0.36 of its span thick
        a, b = 1.0, 0.18
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                        [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background (float32 [H, W, 3]) and its base colour; every pixel is within the base +- amplitude."""
    base = rng.integers(40, 216, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    texture = np.zeros((h, w), np.float32)
    for kind in rng.choice(3, size=rng.integers(1, 3), replace=False):
        theta = rng.uniform(0.0, 2.0 * math.pi)
        along = xx * math.cos(theta) + yy * math.sin(theta)
        if kind == 0:  # soft blotches: coarse noise, upsampled
            cell = int(rng.integers(16, 64))
            coarse = rng.uniform(-1.0, 1.0, (h // cell + 2, w // cell + 2)).astype(np.float32)
            texture += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        elif kind == 1:  # linear gradient
            texture += 2.0 * (along - along.min()) / max(float(along.max() - along.min()), 1.0) - 1.0
        else:  # stripes
            texture += np.sin(along * (2.0 * math.pi / rng.uniform(8.0, 40.0)))
    texture *= 1.0 / max(float(np.abs(texture).max()), 1e-6)
    channel_gain = rng.uniform(0.5, 1.0, 3).astype(np.float32)  # tinted textures, not only grey ones
    image = base + TEXTURE_AMPLITUDE * texture[..., None] * channel_gain
    return image, base


def _shape_colour(rng: np.random.Generator, base: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    while True:  # rejection sampling; well over half the draws pass
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - base).max() < MIN_BACKGROUND_CONTRAST:
            continue
        if any(np.abs(colour - o.astype(np.int64)).max() < MIN_SHAPE_CONTRAST for o in others):
            continue
        return colour.astype(np.uint8)


def _render(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[_Shape]]:
    background, base = _background(rng, h, w)
    num = int(rng.integers(1, MAX_SHAPES + 1))
    sides = []
    for _ in range(num):
        lo, hi = SIDE_RANGES[int(rng.integers(3))]
        sides.append(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    sides.sort(reverse=True)  # big ones first: small shapes then sit on top and rarely hide much

    owner = np.full((h, w), -1, np.int32)  # index of the shape that shows at each pixel, -1 for background
    visible: list[int] = []
    shapes: list[_Shape] = []
    canvas = np.zeros((h, w), np.uint8)
    for side in sides:
        class_index = int(rng.integers(len(SHAPE_CLASSES)))
        pts = _unit_polygon(rng, class_index)
        span = pts.max(0) - pts.min(0)
        # Box of the polygon = side^2, but it must fit inside the image with a 1-pixel margin.
        scale = min(side / math.sqrt(span[0] * span[1]), (w - 3) / span[0], (h - 3) / span[1])
        pts = pts * scale
        lo, hi = pts.min(0), pts.max(0)
        colour = _shape_colour(rng, base, [s.colour for s in shapes])
        for _ in range(10):  # placements to try before the shape is dropped
            # a shape scaled to fill the image leaves a zero-wide range, which rounding can make negative
            offset = np.array([rng.uniform(1.0 - lo[0], max(w - 2.0 - hi[0], 1.0 - lo[0])),
                               rng.uniform(1.0 - lo[1], max(h - 2.0 - hi[1], 1.0 - lo[1]))])
            canvas[:] = 0
            # shift=4: vertices with 1/16-pixel precision, so small shapes keep their outline
            cv2.fillPoly(canvas, [np.round((pts + offset) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
            mask = canvas.astype(bool)
            full_area = int(mask.sum())
            if full_area == 0:
                continue
            covered = np.bincount(owner[mask] + 1, minlength=len(shapes) + 1)[1:]
            if all(v - c >= MIN_VISIBLE * s.full_area for v, c, s in zip(visible, covered, shapes)):
                break
        else:
            continue
        visible = [v - c for v, c in zip(visible, covered)] + [full_area]
        owner[mask] = len(shapes)
        shapes.append(_Shape(class_index, colour, full_area, [], 0.0))

    image = background
    for k, shape in enumerate(shapes):
        mask = owner == k
        image[mask] = shape.colour
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
        shape.box = [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]
        shape.area = shape.box[2] * shape.box[3]
    # No per-pixel noise: it would triple the PNG size (40 KB -> 150 KB an image) for little training value.
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), shapes


def render_image(
    rng: np.random.Generator, image_size: int | Sequence[int] = (320, 320)
) -> tuple[np.ndarray, list[tuple[int, list[float], float]]]:
    """Render one image of 1 to 6 shapes.

    Args:
        rng (numpy.random.Generator): the random stream; the same state gives the same image.
        image_size (int or (height, width)): at least 64 pixels per side.

    Returns:
        image (uint8 ndarray[H, W, 3], BGR) and one ``(class_index, [x, y, w, h], area)`` per shape, in drawing
        order; ``class_index`` indexes ``SHAPE_CLASSES``, the box is the tight box of the visible pixels.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    h, w = _image_hw(image_size)
    image, shapes = _render(rng, h, w)
    return image, [(s.class_index, list(s.box), s.area) for s in shapes]


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS.index(split), index])


def _settings(num_train: int, num_val: int, image_size, seed: int) -> dict:
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 0), ("seed", seed, 0)):
        check_int(value, name, minimum=low, integral=True)
    h, w = _image_hw(image_size)
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [h, w],
        "seed": int(seed),
    }


def _paths(root: Path) -> dict[str, str]:
    return {
        "root": str(root),
        "train_images": str(root / "train" / "images"),
        "train_annotations": str(root / "annotations" / "instances_train.json"),
        "val_images": str(root / "val" / "images"),
        "val_annotations": str(root / "annotations" / "instances_val.json"),
    }


def make_shapes_dataset(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int | Sequence[int] = 320,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, str]:
    """Write the data set under ``root`` (always regenerates; see ``ensure_shapes_dataset``).

    Layout: ``root/{train,val}/images/000001.png`` (lossless), ``root/annotations/instances_{train,val}.json``
    (COCO: image and annotation ids from 1, category ids 1..6 in ``SHAPE_CLASSES`` order, ``iscrowd`` 0), and
    ``root/DONE`` with the settings, written last: a folder without it is half-made.

    Returns:
        dict of str paths: ``root``, ``train_images``, ``train_annotations``, ``val_images``, ``val_annotations``.
    """
    from tqdm import tqdm

    settings = _settings(num_train, num_val, image_size, seed)
    h, w = settings["image_size"]
    root = Path(root)
    paths = _paths(root)
    (root / "DONE").unlink(missing_ok=True)  # from here on the folder is incomplete until the end
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    bar = tqdm(total=num_train + num_val, desc=f"shapes -> {root}", unit="img", disable=not progress)
    with bar:
        for split, count in (("train", num_train), ("val", num_val)):
            images_dir = Path(paths[f"{split}_images"])
            images_dir.mkdir(parents=True, exist_ok=True)
            for old in images_dir.iterdir():  # images of an earlier, bigger run; only our own names
                if _IMAGE_NAME.match(old.name) and int(old.name[:6]) > count:
                    old.unlink()
            images, annotations = [], []
            for index in range(count):
                image, shapes = _render(_image_rng(seed, split, index), h, w)
                image_id = index + 1
                file_name = f"{image_id:06d}.png"
                ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
                if not ok:
                    raise ValueError(f"make_shapes_dataset: could not encode {images_dir / file_name}")
                # A plain write is enough: a run killed half-way leaves no DONE, so the folder is regenerated.
                (images_dir / file_name).write_bytes(png.tobytes())
                images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
                for shape in shapes:
                    annotations.append({
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": shape.class_index + 1,
                        "bbox": shape.box,
                        "area": shape.area,
                        "iscrowd": 0,
                    })
                bar.update(1)
            atomic_save_json(paths[f"{split}_annotations"], {
                "info": {"description": f"roikit synthetic shapes, {split}", **settings},
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }, indent=None)
    atomic_save_json(root / "DONE", settings)
    return paths


def ensure_shapes_dataset(root: str | Path, **kwargs: Any) -> dict[str, str]:
    """Return the data set's paths, generating it first when ``root/DONE`` is missing or records other settings.

    Takes the keyword arguments of ``make_shapes_dataset`` (same defaults).
    """
    root = Path(root)
    args = {"num_train": 2000, "num_val": 500, "image_size": 320, "seed": 0, **kwargs}
    progress = args.pop("progress", True)
    unknown = set(args) - {"num_train", "num_val", "image_size", "seed"}
    if unknown:
        raise ValueError(f"ensure_shapes_dataset: unknown argument(s) {sorted(unknown)}")
    wanted = _settings(**args)
    paths = _paths(root)
    try:
        done = json.loads((root / "DONE").read_text())
    except (OSError, ValueError):
        done = None
    complete = done == wanted and all(Path(paths[k]).exists() for k in paths)
    if complete:
        return paths
    return make_shapes_dataset(root, progress=progress, **args)
