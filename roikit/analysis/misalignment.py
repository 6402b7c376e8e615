"""Box misalignment: what each pooling rule does to real boxes, measured through the ops themselves.

For a box, a stride ``s`` and a ``P x P`` output, each rule (``roi_pool`` with either rounding, ``roi_align``
aligned or not, ``prroi_pool``) gives every output bin a weight on every feature cell. Three measures follow:

1. **Bin-centre error.** The weight map of bin ``b`` is ``w_b = d out_b / d F`` for a one-channel map ``F`` (the
   op's average-pooling form; for ``roi_pool``, the cells of the bin the op reads, uniformly). Its weighted centre
   in image pixels (cell ``(u, v)`` is centred on ``((v + 0.5) s, (u + 0.5) s)``) is compared with the centre of
   bin ``b`` of the exact box cut into ``P x P`` equal bins. Reported per box as the mean over its bins of the
   distance in pixels, and of ``sqrt((dx / w)^2 + (dy / h)^2)`` (each axis as a fraction of the box's width or
   height: a 2 px shift matters more across a 10 px side than along a 200 px one). A bin that reads nothing (all
   of it clipped off the map) has no centre: it is left out, and counted in ``empty_bins``.
2. **Region IoU.** IoU between the box and the union of the cells (squares of side ``s``) that some bin reads.
3. **Crop error** (with images). The image, area-averaged to the stride, is a 3-channel feature map; each rule
   pools it and every bin is compared with the exact mean colour of that bin of the true box at full resolution
   (pixels as constant unit squares, fractional pixels weighted by area, through a summed-area table): mean
   absolute error in grey levels (0..255), over bins and colour channels.

How the ops are read:

* ``roi_align`` and ``prroi_pool`` (average pooling) are linear in ``F``, so the centre of ``w_b`` is
  ``out_b(U) / out_b(1)``: the op applied to the maps of row and column indices ``U``, ``V`` and to ones; three
  channels instead of ``P * P`` one-hot backward passes (``bin_weights`` does those, and the tests check both
  agree). The cells read are where the gradient of ``sum_b out_b`` is positive: one backward pass per chunk, every
  box on its own map so gradients do not mix. A weight under 1e-5 of the box's largest is float noise, not a read.
* ``roi_pool`` (max) is run on two ramps, ``u * W + v + 1`` and its negative: the max of a bin is its last cell and
  the max of the negative its first, so the op's own output gives the rectangle ``[hs, he) x [ws, we)`` of every
  bin (0 marks an empty bin). Its average-pooling form averages that rectangle; the crop error uses that form, so
  it measures where the rule looks, not max against mean.

Batching: for the first two measures each box is measured on a small window of its feature map, moved by whole
cells (a shift of whole strides in pixels, which every rule's rounding follows exactly for power-of-two strides).
The window keeps the map's real edges where the box comes within 2 cells of them (``roi_pool`` clips its bins
there, ``roi_align`` clamps its samples), so the result is the one the op gives on the image's whole map (the tests
check it). Boxes are sorted by window size and chunked under a memory budget; there is no Python loop per box. The
crop error pools whole stride maps, images of one size batched together.

Conventions: a feature map has ``ceil(H / s) x ceil(W / s)`` cells, a partial last cell averaging the pixels it
covers; pixel ``(x, y)`` is the unit square ``[x, x + 1) x [y, y + 1)``; COCO buckets go by the (clipped) box
area ``w * h``: small < 32^2, medium < 96^2, large.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from roikit.ops import prroi_pool, roi_align, roi_pool

__all__ = [
    "Rule", "RULES", "DEFAULT_RULES", "make_rules", "BUCKETS", "METRICS", "MAX_OUTPUT_SIZE", "check_output_size",
    "BoxSet", "load_coco_boxes", "measure_boxes", "measure_dataset", "crop_errors", "bin_weights", "stride_map", "exact_bin_means", "summarize",
    "format_tables", "plot_error_vs_size", "draw_examples", "pick_examples",
]

# Cells of context around a box's window. Every rule reads within [floor(x1 s) - 1, ceil(x2 s) + 2), except that
# integer rounding's bins are at least one cell, so a box under P cells reads P cells from floor(x1 s).
MARGIN = 2
CHUNK_CELLS = 1 << 21  # window cells per chunk (x channels x 4 bytes: ~24 MiB for a 3-channel crop)
CHUNK_BOXES = 4096
READ_THRESHOLD = 1e-5  # a cell weight under this fraction of the box's largest is float noise, not a read
# Bins per side: bin_weights holds P^4 weights a box (64: 16 M, 128 MiB in float64; 128 would be 2 GiB)
MAX_OUTPUT_SIZE = 64

BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))
METRICS = {  # key: (title, unit)
    "centre_px": ("bin-centre error", "px"),
    "centre_rel": ("bin-centre error / box side", "fraction"),
    "iou": ("region IoU (box vs cells read)", "IoU"),
    "crop_error": ("crop error (mean |pooled - exact| colour)", "grey levels"),
}


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    """A named pooling rule: an op and its settings.

    ``op`` is ``"roi_pool"`` (with ``rounding``), ``"roi_align"`` (``aligned``, ``sampling_ratio``, average
    pooling) or ``"prroi_pool"`` (``aligned``).
    """

    name: str
    op: str
    rounding: str = "torchvision"
    aligned: bool = False
    sampling_ratio: int = 2

    @property
    def quantized(self) -> bool:
        return self.op == "roi_pool"

    def pool(self, features: Tensor, rois: Tensor, output_size: int, spatial_scale: float) -> Tensor:
        """The op itself: ``Tensor[K, C, P, P]``."""
        if self.op == "roi_pool":
            return roi_pool(features, rois, output_size, spatial_scale, rounding=self.rounding)
        if self.op == "roi_align":
            return roi_align(features, rois, output_size, spatial_scale, self.sampling_ratio, self.aligned, "avg")
        return prroi_pool(features, rois, output_size, spatial_scale, self.aligned)

    def settings(self) -> dict:
        if self.op == "roi_pool":
            return {"op": self.op, "rounding": self.rounding}
        if self.op == "roi_align":
            return {"op": self.op, "aligned": self.aligned, "sampling_ratio": self.sampling_ratio}
        return {"op": self.op, "aligned": self.aligned}


RULES = {
    "roi_pool_torchvision": dict(op="roi_pool", rounding="torchvision"),
    "roi_pool_integer": dict(op="roi_pool", rounding="integer"),
    "roi_align_aligned": dict(op="roi_align", aligned=True),
    "roi_align_unaligned": dict(op="roi_align", aligned=False),
    "prroi_pool": dict(op="prroi_pool", aligned=False),  # the op's default, as in the original code
    "prroi_pool_aligned": dict(op="prroi_pool", aligned=True),
}
DEFAULT_RULES = ("roi_pool_torchvision", "roi_pool_integer", "roi_align_aligned", "roi_align_unaligned", "prroi_pool")


def make_rules(names: Sequence[str] = DEFAULT_RULES, sampling_ratio: int = 2) -> list[Rule]:
    """Rules by name (see ``RULES``); ``sampling_ratio`` applies to the ``roi_align`` ones (<= 0: adaptive)."""
    if isinstance(names, str) or not names:
        raise ValueError(f"rules must be a non-empty list of names from {', '.join(RULES)}, got {names!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(map(repr, unknown))}; choose from {', '.join(RULES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"rules are listed twice: {list(names)}")
    return [Rule(name, sampling_ratio=sampling_ratio, **RULES[name]) for name in names]


def _check_stride(stride) -> int:
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride <= 0:
        raise ValueError(f"stride must be a positive int (pixels per feature cell), got {stride!r}")
    return int(stride)


def check_output_size(output_size, name: str = "output_size") -> int:
    """``output_size`` as an int in [1, MAX_OUTPUT_SIZE]; ValueError naming ``name`` otherwise."""
    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)) \
            or not 1 <= output_size <= MAX_OUTPUT_SIZE:
        raise ValueError(f"{name} must be an int from 1 to {MAX_OUTPUT_SIZE} (bins per side; the pictures' "
                         f"weight maps grow as its 4th power), got {output_size!r}")
    return int(output_size)


# ------------------------------------------------------------------------------------------------ boxes
@dataclass
class BoxSet:
    """The boxes to measure: ``boxes`` [K, 4] (x1, y1, x2, y2 in pixels, clipped to the image, float64),
    ``image_hw`` [K, 2], ``image_ids`` and ``ann_ids`` [K]; ``images`` maps an image id to
    ``(file_name, height, width)``; ``counts`` says what was skipped or clipped."""

    boxes: np.ndarray
    image_hw: np.ndarray
    image_ids: np.ndarray
    ann_ids: np.ndarray
    images: dict
    counts: dict

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, index: np.ndarray) -> "BoxSet":
        return BoxSet(self.boxes[index], self.image_hw[index], self.image_ids[index], self.ann_ids[index],
                      self.images, dict(self.counts))

    @property
    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_coco_boxes(path: str | Path, max_boxes: int | None = None) -> BoxSet:
    """Read the ground-truth boxes of a COCO instances JSON.

    Every annotation is either measured or counted in ``counts`` under the reason it was left out:

    * ``crowd``: ``iscrowd: 1`` (a box around many objects, not one object's region): skipped;
    * ``zero_area``: ``w <= 0`` or ``h <= 0``: skipped;
    * ``outside``: no area left inside its image: skipped;
    * ``clipped``: partly outside its image: clipped to the image, then measured.

    ``max_boxes`` keeps that many of the remaining boxes, evenly spread over the file (``subsampled`` counts the
    rest). A missing file, bad JSON, or an image or annotation without the fields used here raises ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the annotation file: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise ValueError(f"{path}: not a COCO instances file (needs lists 'images' and 'annotations')")
    images = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not all(_int(img.get(k)) for k in ("id", "width", "height")):
            raise ValueError(f"{path}: image #{i} needs int 'id', 'width' and 'height', got {img!r:.200}")
        if img["width"] <= 0 or img["height"] <= 0:
            raise ValueError(f"{path}: image id {img['id']} has size {img['width']}x{img['height']}")
        images[img["id"]] = (str(img.get("file_name", "")), img["height"], img["width"])
    counts = {"annotations": len(data["annotations"]), "measured": 0, "crowd": 0, "zero_area": 0, "outside": 0,
              "clipped": 0, "subsampled": 0}
    boxes, hw, image_ids, ann_ids = [], [], [], []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{path}: annotation #{i} is not an object")
        aid = ann.get("id", i)
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_number(v) for v in box):
            raise ValueError(f"{path}: annotation id {aid} needs 'bbox' as 4 finite numbers [x, y, w, h], got {box!r}")
        if ann.get("image_id") not in images:
            raise ValueError(f"{path}: annotation id {aid} refers to unknown image id {ann.get('image_id')!r}")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, bool):
            raise ValueError(f"{path}: annotation id {aid} has iscrowd {crowd!r}, expected 0 or 1")
        if crowd:
            counts["crowd"] += 1
            continue
        x, y, w, h = box
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
        ann_ids.append(aid if _int(aid) else i)
    result = BoxSet(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(hw, dtype=np.int64).reshape(-1, 2),
                    np.asarray(image_ids, dtype=np.int64), np.asarray(ann_ids, dtype=np.int64), images, counts)
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


# ------------------------------------------------------------------------------------------------ windows
def _plan_axis(lo: np.ndarray, hi: np.ndarray, size: np.ndarray, stride: int, pooled: int):
    """One axis of every box's window.

    Returns ``first`` (the window's first cell when it is free to end anywhere past the box), ``need`` (the cells
    the window must hold), ``at_far_edge`` (the box comes within the margin of the map's far end: the window must
    end exactly there, so it starts at ``length - size``, before cell 0 if need be: cells the box never reads),
    ``exact`` (both edges matter: the window is the whole axis) and ``length`` (the map's cells).
    """
    length = -(-size // stride)  # ceil: cells in the map
    start = np.floor(lo / stride).astype(np.int64)
    first = np.maximum(start - MARGIN, 0)
    end = np.maximum(np.ceil(hi / stride).astype(np.int64) + MARGIN, start + pooled)
    at_far_edge = end >= length
    need = np.where(at_far_edge, length - first, end - first)
    exact = at_far_edge & (first == 0)
    return first, need, at_far_edge, exact, length


def _plan_windows(boxes: np.ndarray, image_hw: np.ndarray, stride: int, pooled: int, budget: int = CHUNK_CELLS,
                  max_boxes: int = CHUNK_BOXES):
    """Group boxes into chunks that share one window size ``(Hm, Wm)``.

    Returns a list of ``(index, Hm, Wm, oy, ox)``: box indices and, per box, the window's first row and column in
    its map (negative when the window starts before the map). A box whose window must be a whole axis of its map
    only joins boxes with that axis of the same length.
    """
    fy, need_y, far_y, exact_y, len_y = _plan_axis(boxes[:, 1], boxes[:, 3], image_hw[:, 0], stride, pooled)
    fx, need_x, far_x, exact_x, len_x = _plan_axis(boxes[:, 0], boxes[:, 2], image_hw[:, 1], stride, pooled)
    key_y, key_x = np.where(exact_y, len_y, 0), np.where(exact_x, len_x, 0)
    order = np.lexsort((need_y * need_x, np.maximum(need_y, need_x), key_x, key_y))
    ny, nx = need_y[order].tolist(), need_x[order].tolist()
    ky, kx = key_y[order].tolist(), key_x[order].tolist()
    plan, start = [], 0
    while start < len(order):
        hm, wm, end = ny[start], nx[start], start + 1
        while end < len(order) and end - start < max_boxes and ky[end] == ky[start] and kx[end] == kx[start]:
            h2, w2 = max(hm, ny[end]), max(wm, nx[end])
            if (end + 1 - start) * h2 * w2 > budget:
                break
            hm, wm, end = h2, w2, end + 1
        idx = order[start:end]
        oy = np.where(far_y[idx], len_y[idx] - hm, fy[idx])
        ox = np.where(far_x[idx], len_x[idx] - wm, fx[idx])
        plan.append((idx, hm, wm, oy, ox))
        start = end
    return plan


# ------------------------------------------------------------------------------------------------ reading a rule
def _quantized_bins(rule: Rule, rois: Tensor, hm: int, wm: int, output_size: int, scale: float, dtype):
    """The rectangle of cells each bin of ``roi_pool`` reads, from the op's own output on two ramps.

    Returns ``hs, he, ws, we`` [B, P, P] (long) and ``nonempty`` [B, P, P]. ``rois`` hold batch index 0.
    """
    if hm * wm >= 1 << 24 and dtype != torch.float64:
        dtype = torch.float64  # the ramp must hold every cell index exactly
    ramp = torch.arange(1, hm * wm + 1, dtype=dtype).reshape(1, 1, hm, wm)
    out = rule.pool(torch.cat([ramp, -ramp], dim=1), rois.to(dtype), output_size, scale)  # [B, 2, P, P]
    last = out[:, 0].round().long() - 1  # the max: the bin's last cell (row-major); -1 when empty (the op gives 0)
    first = (-out[:, 1]).round().long() - 1  # the max of -ramp: its first cell
    nonempty = last >= 0
    hs, ws = first.div(wm, rounding_mode="floor"), first.remainder(wm)
    he, we = last.div(wm, rounding_mode="floor") + 1, last.remainder(wm) + 1
    zero = torch.zeros_like(hs)
    return (torch.where(nonempty, hs, zero), torch.where(nonempty, he, zero), torch.where(nonempty, ws, zero),
            torch.where(nonempty, we, zero), nonempty)


def _rect_mask(hs, he, ws, we, nonempty, hm: int, wm: int) -> Tensor:
    """Cells covered by some bin's rectangle: [B, Hm, Wm] bool.

    Bin (p, q) covers rows R_pq x columns C_pq; a cell (u, v) lies in the union of those rectangles iff one
    non-empty bin holds both u and v. ``roi_pool`` bins share rows along p and columns along q (R_pq = R_p,
    C_pq = C_q), so the union is (union of rows) x (union of columns); the general case is the slower einsum.
    """
    u = torch.arange(hm)[None, None, None, :]
    v = torch.arange(wm)[None, None, None, :]
    rows = (u >= hs[..., None]) & (u < he[..., None]) & nonempty[..., None]  # [B, P, P, Hm]
    cols = (v >= ws[..., None]) & (v < we[..., None]) & nonempty[..., None]  # [B, P, P, Wm]
    grid = ((hs == hs[:, :1]) & (he == he[:, :1]) | ~nonempty).all() and (
        (ws == ws[:, :, :1]) & (we == we[:, :, :1]) | ~nonempty).all()
    if grid:
        return rows.any(dim=(1, 2))[:, :, None] & cols.any(dim=(1, 2))[:, None, :]
    return torch.einsum("bnu,bnv->buv", rows.flatten(1, 2).float(), cols.flatten(1, 2).float()) > 0


def _read_rule(rule: Rule, rois0: Tensor, rois_own: Tensor, hm: int, wm: int, output_size: int, scale: float,
               dtype: torch.dtype):
    """Where every bin of one chunk's boxes looks.

    Returns ``cy, cx`` [B, P, P] (float64 weighted centre in window cell indices), ``nonempty`` [B, P, P],
    and ``mask`` [B, Hm, Wm] (cells read).
    ``rois0`` put every box on image 0, ``rois_own`` box b on image b.
    """
    if rule.quantized:
        hs, he, ws, we, nonempty = _quantized_bins(rule, rois0, hm, wm, output_size, scale, dtype)
        cy = (hs + he - 1).double() / 2  # mean row index of [hs, he)
        cx = (ws + we - 1).double() / 2
        return cy, cx, nonempty, _rect_mask(hs, he, ws, we, nonempty, hm, wm)
    u = torch.arange(hm, dtype=dtype)[:, None].expand(hm, wm)
    v = torch.arange(wm, dtype=dtype)[None, :].expand(hm, wm)
    coords = torch.stack([torch.ones(hm, wm, dtype=dtype), u, v])[None]  # [1, 3, Hm, Wm]
    with torch.no_grad():
        moments = rule.pool(coords, rois0, output_size, scale).double()  # [B, 3, P, P]: sum w, sum w u, sum w v
    mass = moments[:, 0]
    nonempty = mass > 1e-6
    safe = torch.where(nonempty, mass, torch.ones_like(mass))
    cy, cx = moments[:, 1] / safe, moments[:, 2] / safe
    feats = torch.zeros((rois_own.shape[0], 1, hm, wm), dtype=dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(rule.pool(feats, rois_own, output_size, scale).sum(), feats)
    grad = grad[:, 0]  # [B, Hm, Wm]: sum over bins of each bin's weight on each cell
    peak = grad.flatten(1).amax(dim=1).clamp(min=torch.finfo(dtype).tiny)
    mask = grad > READ_THRESHOLD * peak[:, None, None]
    return cy, cx, nonempty, mask


# ------------------------------------------------------------------------------------------------ images
def stride_map(images: Tensor, stride: int) -> Tensor:
    """[N, C, H, W] -> [N, C, ceil(H / s), ceil(W / s)]: each cell the mean of the pixels it covers.

    Integer images are averaged in float32, which holds the sum of a cell's 8-bit pixels exactly for strides up to
    256 px."""
    images = images if images.is_floating_point() else images.float()
    return torch.nn.functional.avg_pool2d(images, stride, stride, ceil_mode=True)


def exact_bin_means(images: Sequence[np.ndarray], image_index: np.ndarray, boxes: np.ndarray,
                    output_size: int) -> Tensor:
    """Exact mean colour of every bin of every box at full resolution: [K, P, P, C] float64.

    Pixels are constant unit squares, so ``I(x, y) = integral of the image over [0, x] x [0, y]`` is bilinear
    inside each pixel and equals the bilinear interpolation of the summed-area table at ``(x, y)``: a bin's
    integral is ``I`` at its four corners, with fractional pixels weighted by the area they cover. Exact up to
    float64 rounding.
    """
    p = check_output_size(output_size)
    tables, bases, sizes, base = [], [], [], 0
    for img in images:
        t = torch.from_numpy(np.ascontiguousarray(img)).double()  # [H, W, C]
        h, w, c = t.shape
        sat = torch.zeros((h + 1, w + 1, c), dtype=torch.float64)
        sat[1:, 1:] = t.cumsum(0).cumsum(1)
        tables.append(sat.reshape(-1, c))
        bases.append(base)
        sizes.append((h, w))
        base += (h + 1) * (w + 1)
    flat = torch.cat(tables)
    idx = torch.as_tensor(image_index, dtype=torch.long)
    hw = torch.as_tensor(sizes, dtype=torch.long)[idx]  # [K, 2]
    b = torch.as_tensor(boxes, dtype=torch.float64)
    t = torch.arange(p + 1, dtype=torch.float64) / p
    ys = b[:, 1:2] + t * (b[:, 3:4] - b[:, 1:2])  # [K, P + 1] bin edges
    xs = b[:, 0:1] + t * (b[:, 2:3] - b[:, 0:1])
    y0 = ys.floor().long().clamp(min=0).minimum(hw[:, :1] - 1)
    x0 = xs.floor().long().clamp(min=0).minimum(hw[:, 1:] - 1)
    fy, fx = (ys - y0)[:, :, None, None], (xs - x0)[:, None, :, None]
    row = hw[:, 1:] + 1  # [K, 1] table row length

    def at(dy, dx):  # [K, P + 1, P + 1, C]
        i = torch.as_tensor(bases)[idx][:, None, None] + (y0 + dy)[:, :, None] * row[:, :, None] + (x0 + dx)[:, None, :]
        return flat[i]

    integral = (at(0, 0) * (1 - fy) * (1 - fx) + at(0, 1) * (1 - fy) * fx + at(1, 0) * fy * (1 - fx)
                + at(1, 1) * fy * fx)
    sums = integral[:, 1:, 1:] - integral[:, :-1, 1:] - integral[:, 1:, :-1] + integral[:, :-1, :-1]
    area = ((b[:, 3] - b[:, 1]) * (b[:, 2] - b[:, 0]) / (p * p))[:, None, None, None]
    return sums / area


def _rect_means(maps: Tensor, image_index: Tensor, rects) -> Tensor:
    """The average-pooling form of ``roi_pool``: the mean of each bin's rectangle of its image's map,
    [K, P, P, C] (0 for an empty bin)."""
    hs, he, ws, we, nonempty = rects
    n, c, h, w = maps.shape
    sat = torch.zeros((n, h + 1, w + 1, c), dtype=torch.float64)
    sat[:, 1:, 1:] = maps.permute(0, 2, 3, 1).double().cumsum(1).cumsum(2)
    i = image_index[:, None, None]
    sums = sat[i, he, we] - sat[i, hs, we] - sat[i, he, ws] + sat[i, hs, ws]  # [K, P, P, C]
    count = ((he - hs) * (we - ws)).clamp(min=1)[..., None]
    return torch.where(nonempty[..., None], sums / count, torch.zeros_like(sums))


def crop_errors(maps: Tensor, image_index: np.ndarray, boxes: np.ndarray, rules: Sequence[Rule], stride: int,
                exact_means: Tensor, output_size: int = 7, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Crop error of every rule on every box: [R, K], mean |pooled - exact| over bins and channels.

    Args:
        maps (Tensor[N, C, h, w]): images of one size, area-averaged to the stride (``stride_map``).
        image_index (ndarray[K]): each box's image in ``maps``.
        boxes (ndarray[K, 4]): x1, y1, x2, y2 in pixels.
        exact_means (Tensor[K, P, P, C]): from ``exact_bin_means``.

    Each rule pools the images' whole maps, as a detector would; ``roi_pool`` in its average-pooling form.
    """
    stride, p = _check_stride(stride), check_output_size(output_size)
    h, w = maps.shape[2:]
    idx = torch.as_tensor(np.asarray(image_index), dtype=torch.long)
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    if exact_means.shape[:3] != (len(b), p, p) or len(idx) != len(b):
        raise ValueError(f"crop_errors: {len(b)} boxes need {len(b)} image indices and exact_means of shape "
                         f"[{len(b)}, {p}, {p}, C], got {len(idx)} and {tuple(exact_means.shape)}")
    out = np.full((len(rules), len(b)), np.nan)
    if len(b) == 0:
        return out
    rois = torch.cat([idx[:, None].double(), b], dim=1)
    for r, rule in enumerate(rules):
        if rule.quantized:
            rois0 = torch.cat([torch.zeros_like(rois[:, :1]), b], dim=1)
            pooled = _rect_means(maps, idx, _quantized_bins(rule, rois0, h, w, p, 1.0 / stride, dtype))
        else:
            with torch.no_grad():
                pooled = rule.pool(maps.to(dtype), rois.to(dtype), p, 1.0 / stride).permute(0, 2, 3, 1).double()
        out[r] = (pooled - exact_means).abs().mean(dim=(1, 2, 3)).numpy()
    return out


# ------------------------------------------------------------------------------------------------ measuring
def measure_boxes(boxes: np.ndarray, image_hw: np.ndarray, rules: Sequence[Rule], stride: int, output_size: int = 7,
                  *, dtype: torch.dtype = torch.float32, budget: int = CHUNK_CELLS,
                  on_chunk: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Measure every rule on every box at one stride.

    Args:
        boxes (ndarray[K, 4]): x1, y1, x2, y2 in pixels, inside their images, with positive width and height.
        image_hw (ndarray[K, 2]): each box's image height and width in pixels.
        rules: from ``make_rules``.
        stride (int): pixels per feature cell (spatial_scale = 1 / stride).
        output_size (int): bins per side.
        dtype: the ops' dtype (float32; float64 for hand checks).

    Returns:
        dict of ndarray [R, K] (float64): ``centre_px``, ``centre_rel``, ``iou``, ``coverage`` (share of the box
        area read), ``empty_bins`` (share of bins that read nothing; they have no centre and are left out of the
        centre error).
    """
    stride, p = _check_stride(stride), check_output_size(output_size)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    image_hw = np.asarray(image_hw, dtype=np.int64).reshape(-1, 2)
    k = len(boxes)
    if len(image_hw) != k:
        raise ValueError(f"image_hw has {len(image_hw)} rows for {k} boxes")
    if k and not ((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()):
        raise ValueError("boxes must have x2 > x1 and y2 > y1 (load_coco_boxes skips empty boxes)")
    names = ["centre_px", "centre_rel", "iou", "coverage", "empty_bins"]
    out = {n: np.full((len(rules), k), np.nan) for n in names}
    scale = 1.0 / stride
    grid = (torch.arange(p, dtype=torch.float64) + 0.5) / p  # bin centres as a fraction of the box
    for idx, hm, wm, oy, ox in _plan_windows(boxes, image_hw, stride, p, budget):
        b = torch.from_numpy(boxes[idx])  # [B, 4] float64
        oy_t, ox_t = torch.from_numpy(oy), torch.from_numpy(ox)
        local = b - torch.stack([ox_t, oy_t, ox_t, oy_t], dim=1).double() * stride  # shift by whole cells
        n = len(idx)
        rois0 = torch.cat([torch.zeros(n, 1, dtype=torch.float64), local], dim=1).to(dtype)
        rois_own = torch.cat([torch.arange(n, dtype=torch.float64)[:, None], local], dim=1).to(dtype)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        true_y = (b[:, 1:2] + grid * h[:, None])[:, :, None]  # [B, P, 1] exact bin centres in pixels
        true_x = (b[:, 0:1] + grid * w[:, None])[:, None, :]  # [B, 1, P]
        # overlap in pixels of each window row / column with the box
        row_px = (oy_t[:, None] + torch.arange(hm)).double() * stride  # [B, Hm] top edge of each cell
        col_px = (ox_t[:, None] + torch.arange(wm)).double() * stride
        over_y = (torch.minimum(row_px + stride, b[:, 3:4]) - torch.maximum(row_px, b[:, 1:2])).clamp(min=0)
        over_x = (torch.minimum(col_px + stride, b[:, 2:3]) - torch.maximum(col_px, b[:, 0:1])).clamp(min=0)
        area = w * h
        for r, rule in enumerate(rules):
            cy, cx, nonempty, mask = _read_rule(rule, rois0, rois_own, hm, wm, p, scale, dtype)
            dy = (cy + oy_t[:, None, None] + 0.5) * stride - true_y  # [B, P, P] pixels
            dx = (cx + ox_t[:, None, None] + 0.5) * stride - true_x
            bins = nonempty.sum(dim=(1, 2)).double()
            dist = torch.where(nonempty, torch.sqrt(dx**2 + dy**2), 0.0).sum(dim=(1, 2)) / bins
            rel = torch.sqrt((dx / w[:, None, None]) ** 2 + (dy / h[:, None, None]) ** 2)
            rel = torch.where(nonempty, rel, 0.0).sum(dim=(1, 2)) / bins  # nan when no bin reads anything
            inter = torch.einsum("buv,bu,bv->b", mask.double(), over_y, over_x)
            cells = mask.flatten(1).sum(dim=1).double() * stride**2
            out["centre_px"][r, idx] = dist.numpy()
            out["centre_rel"][r, idx] = rel.numpy()
            out["iou"][r, idx] = (inter / (area + cells - inter)).numpy()
            out["coverage"][r, idx] = (inter / area).numpy()
            out["empty_bins"][r, idx] = (1 - bins / (p * p)).numpy()
        if on_chunk is not None:
            on_chunk(n)
    return out


def _load_image(images_dir: Path, info: tuple[str, int, int], image_id: int) -> np.ndarray:
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


def measure_dataset(boxset: BoxSet, rules: Sequence[Rule], strides: Sequence[int], output_size: int = 7,
                    images_dir: str | Path | None = None, progress: bool = True,
                    group_pixels: int = 1 << 22) -> dict[int, dict[str, np.ndarray]]:
    """Every measure for every stride: ``{stride: {metric: ndarray[R, K]}}``.

    With ``images_dir``, the crop error too: images are read in batches of one size and about ``group_pixels``
    pixels (their summed-area tables are float64), and every rule pools each batch's whole stride maps.
    """
    from tqdm import tqdm

    strides = [_check_stride(s) for s in strides]
    if not strides:
        raise ValueError("strides must not be empty")
    p = check_output_size(output_size)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ValueError(f"images folder not found: {images_dir}")
    k = len(boxset)
    passes = 1 if images_dir is None else 2
    with tqdm(total=k * len(strides) * passes, desc="misalignment", unit="box", disable=not progress) as bar:
        results = {s: measure_boxes(boxset.boxes, boxset.image_hw, rules, s, p, on_chunk=bar.update)
                   for s in strides}
        if images_dir is None:
            return results
        for s in strides:
            results[s]["crop_error"] = np.full((len(rules), k), np.nan)
        images_dir = Path(images_dir)
        ids = np.unique(boxset.image_ids)
        sizes = np.array([boxset.images[i][1:] for i in ids.tolist()], dtype=np.int64).reshape(-1, 2)
        order = np.lexsort((ids, sizes[:, 1], sizes[:, 0]))
        start = 0
        while start < len(order):  # batches of images of one size
            end, size = start + 1, sizes[order[start]]
            per_image = int(size[0] * size[1])
            while end < len(order) and (sizes[order[end]] == size).all() and (end + 1 - start) * per_image <= max(
                    group_pixels, per_image):
                end += 1
            members = ids[order[start:end]]
            start = end
            sel = np.nonzero(np.isin(boxset.image_ids, members))[0]
            index = np.searchsorted(members, boxset.image_ids[sel])
            images = [_load_image(images_dir, boxset.images[i], i) for i in members.tolist()]
            exact = exact_bin_means(images, index, boxset.boxes[sel], p)
            pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [N, 3, H, W] uint8
            for s in strides:
                maps = stride_map(pixels, s)
                results[s]["crop_error"][:, sel] = crop_errors(maps, index, boxset.boxes[sel], rules, s, exact, p)
                bar.update(len(sel))
        return results


# ------------------------------------------------------------------------------------------------ explicit weights
def bin_weights(rule: Rule, boxes: np.ndarray, image_hw: tuple[int, int], stride: int, output_size: int = 7,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """The weight each bin gives to each cell of the whole map, box by box: [K, P, P, h, w] with
    ``(h, w) = ceil(image_hw / stride)``. For few boxes (pictures, checks): one map of ``P * P`` channels per box.

    ``roi_align`` / ``prroi_pool``: the gradient of the op with respect to the map, bin ``b`` on channel ``b`` (one
    backward pass). ``roi_pool``: its bin's rectangle (from the op, as in ``measure_boxes``), uniformly.
    """
    stride, p = _check_stride(stride), check_output_size(output_size)
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    k = boxes.shape[0]
    h, w = -(-int(image_hw[0]) // stride), -(-int(image_hw[1]) // stride)
    scale = 1.0 / stride
    if rule.quantized:
        rois0 = torch.cat([torch.zeros(k, 1, dtype=torch.float64), boxes], dim=1)
        hs, he, ws, we, nonempty = _quantized_bins(rule, rois0, h, w, p, scale, dtype)
        u = torch.arange(h)[None, None, None, :]
        v = torch.arange(w)[None, None, None, :]
        rows = ((u >= hs[..., None]) & (u < he[..., None])).to(dtype)  # [K, P, P, h]
        cols = ((v >= ws[..., None]) & (v < we[..., None])).to(dtype)
        count = ((he - hs) * (we - ws)).clamp(min=1).to(dtype)
        return rows[..., :, None] * cols[..., None, :] / count[..., None, None] * nonempty[..., None, None]
    feats = torch.zeros((k, p * p, h, w), dtype=dtype, requires_grad=True)
    rois = torch.cat([torch.arange(k, dtype=torch.float64)[:, None], boxes], dim=1).to(dtype)
    out = rule.pool(feats, rois, p, scale)  # [K, P * P, P, P]
    one_hot = torch.eye(p * p, dtype=dtype).reshape(1, p * p, p, p).expand(k, -1, -1, -1)
    (grad,) = torch.autograd.grad(out, feats, one_hot)
    return grad.reshape(k, p, p, h, w)


# ------------------------------------------------------------------------------------------------ summaries
def summarize(results: dict[int, dict[str, np.ndarray]], rules: Sequence[Rule], areas: np.ndarray) -> dict:
    """``{stride: {rule: {bucket: {"boxes": n, metric: mean, ...}}}}`` over COCO's size buckets and ``all``.

    Means skip NaN (a box none of whose bins reads anything has no centre error); ``boxes`` counts every box.
    """
    masks = [(name, (areas >= lo) & (areas < hi)) for name, lo, hi in BUCKETS] + [("all", np.ones_like(areas, bool))]
    summary = {}
    for stride, res in results.items():
        summary[str(stride)] = per_rule = {}
        for r, rule in enumerate(rules):
            per_rule[rule.name] = per_bucket = {}
            for bucket, m in masks:
                entry = {"boxes": int(m.sum())}
                for metric, values in res.items():
                    v = values[r, m]
                    v = v[~np.isnan(v)]
                    entry[metric] = float(v.mean()) if len(v) else None
                per_bucket[bucket] = entry
    return summary


def _fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    if metric in ("centre_rel", "iou", "coverage", "empty_bins"):
        return f"{value:.3f}"
    return f"{value:.2f}"


def format_tables(summary: dict, metrics: Sequence[str] = ("centre_px", "centre_rel", "iou", "crop_error"),
                  strides: Sequence[int] | None = None) -> str:
    """Markdown: for each stride, one table per metric, rules as rows and size buckets as columns."""
    lines = []
    bucket_names = [b[0] for b in BUCKETS] + ["all"]
    for stride, per_rule in summary.items():
        if strides is not None and int(stride) not in strides:
            continue
        first = next(iter(per_rule.values()))
        counts = ", ".join(f"{b} {first[b]['boxes']}" for b in bucket_names)
        lines.append(f"### Stride {stride}\n\nBoxes: {counts}.\n")
        for metric in metrics:
            if first["all"].get(metric, "absent") == "absent":
                continue
            title, unit = METRICS[metric]
            lines.append(f"{title} ({unit}), stride {stride}:\n")
            lines.append("| rule | " + " | ".join(bucket_names) + " |")
            lines.append("|---|" + "---:|" * len(bucket_names))
            for name, per_bucket in per_rule.items():
                cells = [_fmt(per_bucket[b][metric], metric) for b in bucket_names]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ pictures
def plot_error_vs_size(results: dict[int, dict[str, np.ndarray]], rules: Sequence[Rule], areas: np.ndarray,
                       metric: str, path: str | Path, bins: int = 16) -> None:
    """One panel per stride: the mean of ``metric`` against box size (sqrt of area, log scale), a line per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from roikit.io import atomic_open

    side = np.sqrt(areas)
    edges = np.geomspace(max(side.min(), 1.0), side.max() * 1.0001, bins + 1) if len(side) else np.array([1, 2])
    centres = np.sqrt(edges[:-1] * edges[1:])
    which = np.clip(np.searchsorted(edges, side, side="right") - 1, 0, bins - 1)
    strides = list(results)
    fig, axes = plt.subplots(1, len(strides), figsize=(3.3 * len(strides), 3.0), squeeze=False, sharey=True)
    title, unit = METRICS[metric]
    ticks = [t for t in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if edges[0] <= t <= edges[-1]]
    for ax, stride in zip(axes[0], strides):
        values = results[stride][metric]
        for r, rule in enumerate(rules):
            means = np.array([np.nanmean(values[r, which == i]) if np.any((which == i) & ~np.isnan(values[r]))
                              else np.nan for i in range(bins)])
            ax.plot(centres, means, marker=".", label=rule.name)
        for _, lo, _ in BUCKETS[1:]:
            ax.axvline(math.sqrt(lo), color="0.8", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"stride {stride}", fontsize=9)
        ax.set_xlabel("box side sqrt(w h) (px)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(f"{title}\n({unit})", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rules), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


def pick_examples(boxset: BoxSet, count: int = 3) -> np.ndarray:
    """Indices of a few boxes for the pictures: the median-sized box of each size bucket that has one."""
    areas = boxset.areas
    picks = []
    for _, lo, hi in BUCKETS:
        members = np.nonzero((areas >= lo) & (areas < hi))[0]
        if len(members):
            picks.append(members[np.argsort(areas[members], kind="stable")[len(members) // 2]])
    return np.asarray(picks[:count], dtype=np.int64)


def draw_examples(boxset: BoxSet, picks: np.ndarray, rules: Sequence[Rule], stride: int, output_size: int,
                  path: str | Path, images_dir: str | Path | None = None) -> None:
    """A row per box, a panel per rule: the cells the rule reads (blue, darker for more weight, from
    ``bin_weights``), the true box (red), the rule's bin centres (dark dots) joined (orange) to the exact ones
    (red crosses); the image in grey underneath when ``images_dir`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from roikit.io import atomic_open

    p = check_output_size(output_size)
    stride = _check_stride(stride)
    fig, axes = plt.subplots(len(picks), len(rules), figsize=(2.3 * len(rules), 2.4 * len(picks)), squeeze=False)
    grid = (np.arange(p) + 0.5) / p
    for row, i in enumerate(np.asarray(picks).tolist()):
        box = boxset.boxes[i]
        hw = tuple(int(v) for v in boxset.image_hw[i])
        x1, y1, x2, y2 = box
        true_y, true_x = np.meshgrid(y1 + grid * (y2 - y1), x1 + grid * (x2 - x1), indexing="ij")
        grey = None
        if images_dir is not None:
            image = _load_image(Path(images_dir), boxset.images[int(boxset.image_ids[i])], int(boxset.image_ids[i]))
            grey = 0.55 + 0.45 * image.mean(axis=2) / 255.0  # light grey: the blue reads stay visible
        panels, view = [], [x1, x2, y1, y2]
        for rule in rules:
            weights = bin_weights(rule, box[None], hw, stride, p)[0].numpy()  # [P, P, h, w]
            total = weights.sum(axis=(0, 1))
            read = total > READ_THRESHOLD * max(total.max(), 1e-30)
            mass = weights.sum(axis=(2, 3))
            safe = np.where(mass > 0, mass, 1.0)
            cy = np.einsum("pquv,u->pq", weights, np.arange(total.shape[0])) / safe
            cx = np.einsum("pquv,v->pq", weights, np.arange(total.shape[1])) / safe
            rows, cols = np.nonzero(read.any(axis=1))[0], np.nonzero(read.any(axis=0))[0]
            if len(rows):
                view = [min(view[0], cols[0] * stride), max(view[1], (cols[-1] + 1) * stride),
                        min(view[2], rows[0] * stride), max(view[3], (rows[-1] + 1) * stride)]
            panels.append((total, read, mass > 0, (cx + 0.5) * stride, (cy + 0.5) * stride))
        pad = 0.75 * stride
        view = [max(view[0] - pad, 0), min(view[1] + pad, hw[1]), max(view[2] - pad, 0), min(view[3] + pad, hw[0])]
        for col, (rule, (total, read, ok, px, py)) in enumerate(zip(rules, panels)):
            ax = axes[row][col]
            if grey is not None:
                ax.imshow(grey, extent=(0, hw[1], hw[0], 0), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            shade = np.ma.masked_where(~read, 0.35 + 0.65 * total / max(total.max(), 1e-30))
            ax.imshow(shade, extent=(0, total.shape[1] * stride, total.shape[0] * stride, 0), cmap="Blues", vmin=0,
                      vmax=1.0, alpha=0.7, interpolation="nearest")
            for g in range(int(view[0] // stride), int(view[1] // stride) + 2):
                ax.axvline(g * stride, color="0.6", lw=0.3)
            for g in range(int(view[2] // stride), int(view[3] // stride) + 2):
                ax.axhline(g * stride, color="0.6", lw=0.3)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2))
            for a, b, c, d in zip(true_x[ok], true_y[ok], px[ok], py[ok]):
                ax.plot([a, c], [b, d], color="orange", lw=0.7)
            ax.plot(true_x.ravel(), true_y.ravel(), "x", color="red", ms=2.5, mew=0.7)
            ax.plot(px[ok], py[ok], ".", color="black", ms=2.5)
            ax.set_xlim(view[0], view[1])
            ax.set_ylim(view[3], view[2])
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(rule.name, fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{x2 - x1:.0f}x{y2 - y1:.0f} px box", fontsize=8)
    fig.suptitle(f"stride {stride}, {p}x{p} bins: cells read (blue), true box (red), exact bin centres (x), "
                 f"the rule's (dots)", fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=72)
    plt.close(fig)
