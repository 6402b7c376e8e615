"""A COCO-format detection data set in torchvision's detection format.

The annotation file is checked once, up front, with errors that name the file and the image or annotation id;
pycocotools then indexes it (``dataset.coco`` is the object COCOeval wants).

Crowd annotations (``iscrowd: 1``) are not training targets: a crowd box covers many objects, so it is kept out of
``boxes``/``labels``. It stays in ``dataset.coco``, where COCOeval uses it to ignore detections that fall on it.
Boxes of zero width or height (COCO 2017's training file holds two, annotation ids 918 and 2206849) are no training
targets either and stay in ``dataset.coco`` too; a negative or non-finite size is an error. Images without
(non-crowd) annotations are kept, with empty targets.

Images are decoded with Pillow, completely (a truncated JPEG is an error naming its file, where OpenCV would fill
the missing part in grey), into 3 channels (grayscale, palette and CMYK files too), in the pixel order the file
stores: an EXIF orientation tag is not applied, as pycocotools' and torchvision's COCO readers do not, since COCO's
boxes are in the stored order.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CocoDetection", "collate_fn", "read_annotation_file"]

BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in other tools' exports)
_EXIF_ORIENTATION = 0x0112


def collate_fn(batch: list[tuple[Any, Any]]) -> tuple[list, list]:
    """DataLoader collate: images of different sizes stay a list, so do the targets."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_annotation_file(data: Any, where: str, boxes_in_image: bool = True) -> None:
    """Raise ValueError for anything pycocotools or the training code would trip on later.

    ``boxes_in_image=False`` lets boxes of negative size or outside their image through (for a reader that counts
    and skips or clips them itself). Fills in a missing ``iscrowd`` (0) and ``area`` (the box area) in place.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{where}: missing or non-list key {key!r}")

    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ValueError(f"{where}: category #{i} needs an int 'id' and a str 'name', got {cat!r}")
        if cat["id"] in cat_ids:
            raise ValueError(f"{where}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])

    sizes = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise ValueError(f"{where}: image #{i} is not an object")
        for key in ("id", "width", "height"):
            if not _is_int(img.get(key)):
                raise ValueError(f"{where}: image #{i} (id {img.get('id')!r}) needs an int {key!r}")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise ValueError(f"{where}: image id {img['id']} needs a str 'file_name'")
        if img["width"] <= 0 or img["height"] <= 0:
            raise ValueError(f"{where}: image id {img['id']} has size {img['width']}x{img['height']}")
        if img["id"] in sizes:
            raise ValueError(f"{where}: duplicate image id {img['id']}")
        sizes[img["id"]] = (img["width"], img["height"])

    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise ValueError(f"{where}: annotation #{i} needs an int 'id'")
        aid = ann["id"]
        if aid in ann_ids:
            raise ValueError(f"{where}: duplicate annotation id {aid}")
        ann_ids.add(aid)
        for key in ("image_id", "category_id"):
            if not _is_int(ann.get(key)):
                raise ValueError(f"{where}: annotation id {aid} needs an int {key!r}")
        if ann["image_id"] not in sizes:
            raise ValueError(f"{where}: annotation id {aid} refers to unknown image id {ann['image_id']} "
                             f"(not in 'images')")
        record = f"annotation id {aid} (image id {ann['image_id']})"
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"{where}: {record} has unknown category id {ann['category_id']} (not in 'categories')")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where}: {record} has iscrowd {ann['iscrowd']!r}, expected 0 or 1")
        if "area" in ann and not _is_number(ann["area"]):
            raise ValueError(f"{where}: {record} has a non-numeric area {ann['area']!r}")
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise ValueError(f"{where}: {record} needs 'bbox' as 4 finite numbers [x, y, w, h], got {box!r}")
        x, y, w, h = box
        width, height = sizes[ann["image_id"]]
        tol = BOX_TOLERANCE
        if boxes_in_image and (w < 0 or h < 0):
            raise ValueError(f"{where}: {record} has a bbox of negative size {box} (w and h must be >= 0)")
        if boxes_in_image and (x < -tol or y < -tol or x + w > width + tol or y + h > height + tol):
            raise ValueError(f"{where}: {record} has bbox {box} outside its image ({width}x{height})")
        # COCOeval reads both keys; fill them in as COCO's own tools would.
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(w * h))


def read_annotation_file(path: str | Path, *, boxes_in_image: bool = True) -> dict[str, Any]:
    """The contents of a COCO instances JSON, checked: ValueError, one line naming the file and the image or
    annotation id, for a missing or unreadable file, malformed JSON, or anything pycocotools or the training code
    would trip on later. ``boxes_in_image=False`` lets boxes of negative size or outside their image through, for a
    reader that counts them and skips or clips them itself."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the annotation file: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from e
    _check_annotation_file(data, str(path), boxes_in_image)
    return data


class CocoDetection(torch.utils.data.Dataset):
    """COCO images and boxes for a detector.

    Args:
        images_dir (str or Path): folder the images' ``file_name`` are relative to.
        ann_file (str or Path): COCO instances JSON.
        transforms (callable, optional): ``(image, target) -> (image, target)``, e.g. ``roikit.data.transforms``.
        check_images (bool): decode every image now (slow on big sets) instead of only when it is loaded; that
            every listed file exists is always checked up front.

    ``dataset[i]`` is ``(image, target)``:
        image (Tensor[3, H, W] float32): RGB in [0, 1].
        target (dict): ``boxes`` (Tensor[L, 4] float32, x1, y1, x2, y2 in pixels, each of positive width and
        height), ``labels`` (Tensor[L] int64, 1..num_classes; 0 is left for the background), ``image_id`` (int, the
        COCO id), ``area`` (Tensor[L] float32) and ``iscrowd`` (Tensor[L] int64, all 0: crowd annotations and
        boxes of no size are left out, see the module doc).

    Labels are the COCO category ids, sorted, renumbered from 1: ``cat_id_to_label`` and ``label_to_cat_id`` map
    between them, ``class_names[label - 1]`` names a label. Every problem with the data is a one-line ValueError
    naming the annotation file and the record (annotation id, image id and image file).
    """

    def __init__(
        self,
        images_dir: str | Path,
        ann_file: str | Path,
        transforms: Callable | None = None,
        check_images: bool = False,
    ) -> None:
        from pycocotools.coco import COCO

        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise ValueError(f"annotation file not found: {self.ann_file}")
        if not self.images_dir.is_dir():
            raise ValueError(f"images folder not found: {self.images_dir} (for {self.ann_file})")
        data = read_annotation_file(self.ann_file)

        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
            coco.createIndex()
        self.coco = coco
        self.transforms = transforms
        self.ids = sorted(coco.imgs)

        cats = sorted(coco.cats.values(), key=lambda c: c["id"])
        self.cat_id_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names = tuple(c["name"] for c in cats)

        missing = [image_id for image_id in self.ids if not self.image_path(image_id).is_file()]
        if missing:
            more = f" ({len(missing) - 1} more of its {len(self.ids)} images are missing too)" \
                if len(missing) > 1 else ""
            raise ValueError(f"{self.ann_file}: image file of image id {missing[0]} not found: "
                             f"{self.image_path(missing[0])}{more}")
        if check_images:
            for image_id in self.ids:
                self._load_image(image_id)

    @property
    def num_classes(self) -> int:
        """Object classes, without the background."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        """The image file of the COCO image id ``image_id``."""
        return self.images_dir / self.coco.imgs[image_id]["file_name"]

    def describe(self, image_id: int) -> str:
        """``"<annotation file>: image id <id> (<image file>)"``: the record, for an error message."""
        return f"{self.ann_file}: image id {image_id} ({self.image_path(image_id)})"

    def _load_image(self, image_id: int) -> np.ndarray:
        """The image as a uint8 array [H, W, 3], RGB."""
        from PIL import Image, UnidentifiedImageError

        info, path = self.coco.imgs[image_id], self.image_path(image_id)
        if not path.is_file():
            raise ValueError(f"{self.ann_file}: image file of image id {image_id} not found: {path}")
        try:
            with Image.open(path) as im:
                size, orientation = im.size, im.getexif().get(_EXIF_ORIENTATION, 1)
                if size == (info["width"], info["height"]):
                    im.load()  # decodes it all: a truncated file raises here
                    rgb = np.array(im.convert("RGB"))  # a writable copy, for torch
        except UnidentifiedImageError:
            raise ValueError(f"{self.ann_file}: cannot decode the image file of image id {image_id}: {path}") from None
        except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, struct.error... for a damaged file
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"{self.ann_file}: the image file of image id {image_id} is damaged ({reason}): "
                             f"{path}") from None
        if size != (info["width"], info["height"]):
            hint = ""
            if orientation in (5, 6, 7, 8) and size == (info["height"], info["width"]):
                hint = (f" (its EXIF orientation {orientation} turns it; COCO's boxes are in the stored pixel order, "
                        f"which this reader keeps, as pycocotools and torchvision do)")
            raise ValueError(f"{self.ann_file}: image id {image_id} is {size[0]}x{size[1]} in {path}, but the "
                             f"annotation file says {info['width']}x{info['height']}{hint}")
        return rgb

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        rgb = self._load_image(image_id)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]

        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x1, y1, x2, y2
        keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()  # no size (also in float32)
        anns = [a for a, k in zip(anns, keep) if k]
        target = {
            "boxes": boxes[torch.tensor(keep, dtype=torch.bool)].reshape(-1, 4),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, classes={self.num_classes}, "
            f"ann_file={str(self.ann_file)!r})"
        )
