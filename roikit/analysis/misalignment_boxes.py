"""The boxes and images the misalignment study measures (:mod:`roikit.analysis.misalignment`): a COCO file's
ground-truth boxes as a :class:`BoxSet`, every annotation either measured or counted under the reason it was left
out, and an image read and checked against its annotation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roikit.data.coco import read_annotation_file

__all__ = ["BoxSet", "load_coco_boxes", "load_image"]


@dataclass
class BoxSet:
    """The boxes to measure: ``boxes`` [K, 4] (x1, y1, x2, y2 in pixels, clipped to the image, float64),
    ``image_hw`` [K, 2], ``image_ids``, ``ann_ids`` and ``category_ids`` [K]; ``images`` maps an image id to
    ``(file_name, height, width)``, ``categories`` a category id to its name; ``counts`` says what was skipped or
    clipped."""

    boxes: np.ndarray
    image_hw: np.ndarray
    image_ids: np.ndarray
    ann_ids: np.ndarray
    images: dict
    counts: dict
    category_ids: np.ndarray | None = None
    categories: dict | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, index: np.ndarray) -> BoxSet:
        cats = None if self.category_ids is None else self.category_ids[index]
        return BoxSet(self.boxes[index], self.image_hw[index], self.image_ids[index], self.ann_ids[index],
                      self.images, dict(self.counts), cats, self.categories)

    def describe(self, i: int) -> str:
        """Box ``i`` in words: its category's name (when known) and its size, e.g. ``"dog 161x199 px"``."""
        x1, y1, x2, y2 = self.boxes[i]
        name = "" if self.category_ids is None else (self.categories or {}).get(int(self.category_ids[i]), "")
        return f"{name + ' ' if name else ''}{x2 - x1:.0f}x{y2 - y1:.0f} px"

    @property
    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])


def load_coco_boxes(path: str | Path, max_boxes: int | None = None) -> BoxSet:
    """Read the ground-truth boxes of a COCO instances JSON.

    The file is checked as the detector's data set checks it (``roikit.data.coco.read_annotation_file``: a missing
    file, bad JSON, or an image or annotation without the fields used is a one-line ValueError naming the file and
    the id), except that boxes with no area or outside their image are counted here, not refused. Every annotation
    is either measured or counted in ``counts`` under the reason it was left out:

    * ``crowd``: ``iscrowd: 1`` (a box around many objects, not one object's region): skipped;
    * ``zero_area``: ``w <= 0`` or ``h <= 0``: skipped;
    * ``outside``: no area left inside its image: skipped;
    * ``clipped``: partly outside its image: clipped to the image, then measured.

    ``max_boxes`` keeps that many of the remaining boxes, evenly spread over the file (``subsampled`` counts the
    rest).
    """
    data = read_annotation_file(path, boxes_in_image=False)
    images = {img["id"]: (img["file_name"], img["height"], img["width"]) for img in data["images"]}
    counts = {"annotations": len(data["annotations"]), "measured": 0, "crowd": 0, "zero_area": 0, "outside": 0,
              "clipped": 0, "subsampled": 0}
    boxes, hw, image_ids, ann_ids, cat_ids = [], [], [], [], []
    for ann in data["annotations"]:
        if ann["iscrowd"]:
            counts["crowd"] += 1
            continue
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            counts["zero_area"] += 1
            continue
        _, height, width = images[ann["image_id"]]
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x2 <= x1 or y2 <= y1:
            counts["outside"] += 1
            continue
        counts["clipped"] += int((x1, y1, x2, y2) != (x, y, x + w, y + h))
        boxes.append((x1, y1, x2, y2))
        hw.append((height, width))
        image_ids.append(ann["image_id"])
        ann_ids.append(ann["id"])
        cat_ids.append(ann["category_id"])
    result = BoxSet(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(hw, dtype=np.int64).reshape(-1, 2),
                    np.asarray(image_ids, dtype=np.int64), np.asarray(ann_ids, dtype=np.int64), images, counts,
                    np.asarray(cat_ids, dtype=np.int64), {c["id"]: str(c["name"]) for c in data["categories"]})
    if max_boxes is not None:
        if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes <= 0:
            raise ValueError(f"max_boxes must be a positive int, got {max_boxes!r}")
        if max_boxes < len(result):
            keep = (np.arange(max_boxes) * len(result)) // max_boxes  # evenly spread, deterministic
            counts["subsampled"] = len(result) - max_boxes
            result = result.subset(keep)
            result.counts = counts
    counts["measured"] = len(result)
    return result


def load_image(images_dir: Path, info: tuple[str, int, int], image_id: int) -> np.ndarray:
    """Image ``image_id`` (``info``: its file name, height and width, as :attr:`BoxSet.images` holds them) from
    ``images_dir`` as RGB ``uint8`` [H, W, 3]; ValueError when the file is missing, undecodable or of another
    size than the annotation file says."""
    import cv2

    file_name, height, width = info
    path = images_dir / file_name
    if not file_name or not path.is_file():
        raise ValueError(f"image file of image id {image_id} not found: {path}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot decode the image file of image id {image_id}: {path}")
    if img.shape[:2] != (height, width):
        raise ValueError(f"image id {image_id} is {img.shape[1]}x{img.shape[0]} in {path}, but the annotation file "
                         f"says {width}x{height}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
