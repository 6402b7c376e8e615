"""Box misalignment: what each pooling rule does to real boxes, measured through the ops themselves.

For a box, a stride ``s`` and a ``P x P`` output, each rule (``roi_pool`` with either rounding, ``roi_align``
aligned or not, ``prroi_pool``, ``ps_roi_pool``) gives every output bin a weight on every feature cell. Three
measures follow:

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
* ``ps_roi_pool`` (selectable, not a default rule: R-FCN's position-sensitive pooling, whose rounding is its own:
  no ``+ 1`` cell) averages whole cells too; its rectangles come from its own rule function,
  :func:`roikit.ops.geometry.ps_roi_pool_edges`, which the op itself calls (the op would need ``P * P`` copies of
  the map, one per bin; the tests check that its gradient reads the same rectangles). It is measured as the
  average-pooling form of ``roi_pool`` is.

Batching: for the first two measures each box is measured on a small window of its feature map, moved by whole
cells (a shift of whole strides in pixels, which every rule's rounding follows exactly for power-of-two strides).
The window keeps the map's real edges where the box comes within 2 cells of them (``roi_pool`` clips its bins
there, ``roi_align`` clamps its samples), so the result is the one the op gives on the image's whole map (the tests
check it). Boxes are sorted by window size and chunked under a memory budget; there is no Python loop per box. The
crop error pools whole stride maps, images of one size batched together.

Conventions: a feature map has ``ceil(H / s) x ceil(W / s)`` cells, a partial last cell averaging the pixels it
covers; pixel ``(x, y)`` is the unit square ``[x, x + 1) x [y, y + 1)``; COCO buckets go by the (clipped) box
area ``w * h``: small < 32^2, medium < 96^2, large.

Rules: :mod:`roikit.analysis.rules`; stride maps and exact bin means: :mod:`roikit.analysis.reference`; the boxes
and images measured (:class:`BoxSet`, :func:`load_coco_boxes`, :func:`load_image`, importable from here too):
:mod:`roikit.analysis.misalignment_boxes`; a run's tables, plots, pictures and ``bin_weights``:
:mod:`roikit.analysis.misalignment_report`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from roikit.ops.geometry import ps_roi_pool_edges

from .misalignment_boxes import BoxSet, load_coco_boxes, load_image
from .reference import exact_bin_means, stride_map
from .rules import Rule

__all__ = [
    "BUCKETS", "METRICS", "MAX_OUTPUT_SIZE", "READ_THRESHOLD", "check_output_size", "check_stride", "BoxSet",
    "load_coco_boxes", "load_image", "measure_boxes", "measure_dataset", "crop_errors", "roi_pool_bins", "summarize",
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


# ------------------------------------------------------------------------------------------------ checks
def check_stride(stride: int) -> int:
    """``stride`` as a positive int (pixels per feature cell); ValueError otherwise."""
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride <= 0:
        raise ValueError(f"stride must be a positive int (pixels per feature cell), got {stride!r}")
    return int(stride)


def check_output_size(output_size: int, name: str = "output_size") -> int:
    """``output_size`` as an int in [1, MAX_OUTPUT_SIZE]; ValueError naming ``name`` otherwise."""
    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)) \
            or not 1 <= output_size <= MAX_OUTPUT_SIZE:
        raise ValueError(f"{name} must be an int from 1 to {MAX_OUTPUT_SIZE} (bins per side; the pictures' "
                         f"weight maps grow as its 4th power), got {output_size!r}")
    return int(output_size)


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
def roi_pool_bins(rule: Rule, rois: Tensor, hm: int, wm: int, output_size: int, scale: float,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The rectangle of cells each bin of ``roi_pool`` reads, from the op's own output on two ramps (for
    ``ps_roi_pool``: from its rule function, :func:`roikit.ops.geometry.ps_roi_pool_edges`, on an ``hm x wm`` map).

    Returns ``hs, he, ws, we`` [B, P, P] (long) and ``nonempty`` [B, P, P]. ``rois`` hold batch index 0.
    """
    if rule.op == "ps_roi_pool":
        return _ps_roi_pool_bins(rois.to(dtype), hm, wm, output_size, scale)
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


def _ps_roi_pool_bins(rois: Tensor, hm: int, wm: int, p: int, scale: float):
    (hs, he), (ws, we) = ps_roi_pool_edges(rois, scale, (p, p), (hm, wm))  # [B, P] each, clipped to the map
    hs, he = hs[:, :, None].expand(-1, -1, p), he[:, :, None].expand(-1, -1, p)  # rows depend on the bin's row
    ws, we = ws[:, None, :].expand(-1, p, -1), we[:, None, :].expand(-1, p, -1)
    nonempty = (he > hs) & (we > ws)
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
        hs, he, ws, we, nonempty = roi_pool_bins(rule, rois0, hm, wm, output_size, scale, dtype)
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
    stride, p = check_stride(stride), check_output_size(output_size)
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
            pooled = _rect_means(maps, idx, roi_pool_bins(rule, rois0, h, w, p, 1.0 / stride, dtype))
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
    stride, p = check_stride(stride), check_output_size(output_size)
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


def measure_dataset(boxset: BoxSet, rules: Sequence[Rule], strides: Sequence[int], output_size: int = 7,
                    images_dir: str | Path | None = None, progress: bool = True,
                    group_pixels: int = 1 << 22) -> dict[int, dict[str, np.ndarray]]:
    """Every measure for every stride: ``{stride: {metric: ndarray[R, K]}}``.

    With ``images_dir``, the crop error too: images are read in batches of one size and about ``group_pixels``
    pixels (their summed-area tables are float64), and every rule pools each batch's whole stride maps.
    """
    from tqdm import tqdm

    strides = [check_stride(s) for s in strides]
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
            images = [load_image(images_dir, boxset.images[i], i) for i in members.tolist()]
            exact = exact_bin_means(images, index, boxset.boxes[sel], p)
            pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [N, 3, H, W] uint8
            for s in strides:
                maps = stride_map(pixels, s)
                results[s]["crop_error"][:, sel] = crop_errors(maps, index, boxset.boxes[sel], rules, s, exact, p)
                bar.update(len(sel))
        return results


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


