"""The pooling view: what each pooling rule reads for one detection, drawn over the picture the network sees.

For a box on a feature map of stride ``s``, :func:`quantized_view` (``roi_pool``, either rounding) and
:func:`roi_align_view` give the cells a rule reads, its bins, its sample points and the crop it makes of the picture
area-averaged to the stride (a 3-channel "feature map" whose cells one can see). :func:`explain_pooling` draws
them for one detection of a detector: the picture, then per rule the cells it reads, its bins and samples over a
zoom of the picture with the feature grid, and below each rule's crop beside the exact bin means. The rules, their
names and colours come from :mod:`roikit.analysis.rules`; the cells and samples from :mod:`roikit.ops.geometry`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch

from roikit.engine.inference import to_tensor
from roikit.layers.poolers import assign_boxes_to_levels
from roikit.ops import roi_align
from roikit.ops.geometry import bin_edges
from roikit.ops.geometry import sampling_grid as roi_align_grid

from .drawing import (
    draw_cell_grid,
    draw_detections,
    draw_points,
    draw_rects,
    pad_to,
    put_text_lines,
    resize_to_fit,
    tile_images,
)
from .reference import exact_bin_means, stride_map
from .rules import RULES, Rule, get_rule

__all__ = ["RuleView", "network_input", "box_stride", "fpn_stride", "view_key", "quantized_view", "roi_align_view",
           "rule_view", "explain_pooling", "explain_box", "blank_explain"]


@dataclass
class RuleView:
    """What one rule does to one box, in the pixels of the network's input."""

    name: str  # caption's first line
    cells: list[tuple[float, float, float, float]]  # the cells the rule reads (x1, y1, x2, y2 px), one per cell
    bins: list[tuple[float, float, float, float]]  # the rectangle of each bin (px)
    points: np.ndarray  # [S, 2] sample points (x, y px); empty for the quantized rules
    crop: np.ndarray  # [PH, PW, 3] float RGB in [0, 1], the pooled picture
    summary: str  # caption's second line


def network_input(model: torch.nn.Module, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
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


def box_stride(cfg: dict | None, pooler: torch.nn.Module, box: np.ndarray) -> int:
    """The stride of the map the model pools ``box`` (network pixels) from: the one map of ``small_cnn``, or
    the FPN level the pooler assigns it (``resnet_fpn`` pools maps at strides 4 to 32: levels 2 to 5). ``cfg``
    None: a torchvision detector, whose ``MultiScaleRoIAlign`` learnt its maps' scales in its last forward."""
    if cfg is None:
        if getattr(pooler, "scales", None) is None or getattr(pooler, "map_levels", None) is None:
            raise ValueError("box_stride: the torchvision pooler has not run yet (its scales are set by a forward)")
        level = int(pooler.map_levels([torch.as_tensor(box, dtype=torch.float32)[None]])[0])
        return int(round(1.0 / pooler.scales[level]))
    b = cfg["model"]["backbone"]
    if b["name"] == "small_cnn":
        return int(b["stride"])
    return fpn_stride(box, pooler.canonical_scale, pooler.canonical_level)


def fpn_stride(box: np.ndarray, canonical_scale: int = 224, canonical_level: int = 4) -> int:
    """The stride of the FPN level (2 to 5: strides 4 to 32) that the FPN paper's rule, as torchvision's and
    roikit's poolers apply it, assigns ``box`` (x1, y1, x2, y2 pixels): level ``4 + log2(sqrt(w h) / 224)``."""
    level = assign_boxes_to_levels(torch.as_tensor(box, dtype=torch.float32)[None], 2, 5, canonical_scale,
                                   canonical_level)
    return 2 ** (2 + int(level[0]))


def _cells_px(cells: Iterable[tuple[int, int]], stride: int) -> list[tuple[float, float, float, float]]:
    """Cells (row, col) -> their rectangles (x1, y1, x2, y2) in pixels."""
    return [(c * stride, r * stride, (c + 1) * stride, (r + 1) * stride) for r, c in cells]


def quantized_view(rule: Rule | str, fmap: torch.Tensor, box: np.ndarray, stride: int, pooled: int) -> RuleView:
    """``roi_pool``'s cells from its own rule function (``bin_edges``); the crop is the mean of each bin's cells
    (the op takes their max per channel; the mean shows where the rule looks without the max's brightening).
    ``rule``: a ``roi_pool`` rule of the table, or its name or short name (``"integer"``, ``"torchvision"``)."""
    rounding = (get_rule(rule) if isinstance(rule, str) else rule).rounding
    hm, wm = fmap.shape[-2:]
    rois = torch.tensor([[0.0, *box]], dtype=torch.float32)
    (hs, he), (ws, we) = bin_edges(rois, 1.0 / stride, (pooled, pooled), rounding, (hm, wm))
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
    return RuleView(f'roi_pool rounding="{rounding}"', cells, bins, np.zeros((0, 2)), crop,
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


def view_key(rule: Rule) -> str:
    """The view's name for a rule (its captions, its JSON): the rounding for ``roi_pool``, else the op."""
    return rule.rounding if rule.quantized else rule.op


def rule_view(rule: Rule, fmap: torch.Tensor, box: np.ndarray, stride: int, pooled: int) -> RuleView:
    """What ``rule`` reads of ``box`` on ``fmap`` (a stride map [1, 3, h, w]): :func:`quantized_view` or
    :func:`roi_align_view`."""
    if rule.quantized:
        return quantized_view(rule, fmap, box, stride, pooled)
    if rule.op == "roi_align":
        return roi_align_view(fmap, box, stride, pooled, rule.sampling_ratio, rule.aligned)
    raise ValueError(f"the pooling view shows roi_pool and roi_align rules, not {rule.name!r}")


def explain_pooling(model: torch.nn.Module, cfg: dict | None, image: np.ndarray,
                    detections: dict[str, np.ndarray], index: int, class_names: Sequence[str], *,
                    panel: int = 256) -> tuple[np.ndarray, dict]:
    """The explain view of detection ``index`` of a detector (roikit's, with its ``cfg``; torchvision's, with
    ``cfg`` None, after a forward) and its numbers: :func:`explain_box` on the picture as the network sees it.
    ``class_names[label - 1]`` names a label. The rules: ``roi_pool`` with integer and with torchvision rounding,
    and the model's RoIAlign (the base config's, aligned with 2 x 2 samples, when the model pools otherwise)."""
    pooler = model.roi_heads.box_roi_pool
    seen, (kx, ky) = network_input(model, image)
    box = detections["boxes"][index].astype(np.float64) * np.array([kx, ky, kx, ky])
    op = getattr(pooler, "op", "roi_align")  # torchvision's MultiScaleRoIAlign: roi_align, aligned=False
    options = getattr(pooler, "op_options", {})
    if op == "roi_align":
        sampling_ratio = int(options.get("sampling_ratio", pooler.sampling_ratio))
        aligned = bool(options.get("aligned", False))
    else:  # show the base config's RoIAlign
        sampling_ratio, aligned = 2, True
    own = {"roi_pool": options.get("rounding", "torchvision"), "roi_align": "roi_align"}.get(op)
    label, score = int(detections["labels"][index]), float(detections["scores"][index])
    name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
    return explain_box(seen, box, f"detection {index}: {name} {score:.2f}",
                       f"at the net's {seen.shape[1]}x{seen.shape[0]}", stride=box_stride(cfg, pooler, box),
                       pooled=pooler.output_size[0], sampling_ratio=sampling_ratio, aligned=aligned, own=own,
                       label=label, score=score, class_names=class_names, index=index, panel=panel)


def explain_box(seen: np.ndarray, box: np.ndarray, heading: str, where: str, *, stride: int, pooled: int = 7,
                sampling_ratio: int = 2, aligned: bool = True, own: str | None = None, label: int = 1,
                score: float | None = None, class_names: Sequence[str] = (), index: int = 0,
                panel: int = 256) -> tuple[np.ndarray, dict]:
    """The explain view of one box (a BGR image of fixed size for a given ``panel``) and its numbers.

    ``seen`` is the picture (float RGB [H, W, 3] in [0, 1]), ``box`` (x1, y1, x2, y2) in its pixels, pooled at
    ``stride`` into ``pooled x pooled`` bins. Top row: the picture with the box, then per rule the cells it reads
    (tinted), its bins (outlined), the box (white) and, for ``roi_align``, the sample points, over a zoom of the
    picture with the feature grid. Bottom row: the exact bin means of the box, then each rule's crop of the
    picture's stride map, with its mean error against the exact one in grey levels. ``own`` (a view key) marks
    the model's own rule; ``heading`` and ``where`` start the first caption (``"detection 0: dog 0.93"``, ``"at the
    net's 1067x800"``).
    """
    box = np.asarray(box, dtype=np.float64)
    fmap = stride_map(torch.from_numpy(np.ascontiguousarray(seen.transpose(2, 0, 1))).double()[None], stride)
    sampler = RULES["roi_align_aligned" if aligned else "roi_align_unaligned"]
    rules = [RULES["roi_pool_integer"], RULES["roi_pool_torchvision"], replace(sampler, sampling_ratio=sampling_ratio)]
    keys = [view_key(rule) for rule in rules]
    views = [rule_view(rule, fmap, box, stride, pooled) for rule in rules]
    exact = exact_bin_means([seen], np.zeros(1, np.int64), box[None], pooled)[0].numpy()
    errors = [float(np.abs(v.crop - exact).mean() * 255.0) for v in views]

    frame = _panel_frame(box, views, stride, seen.shape[:2])
    crop = _to_bgr(seen[frame[1]:frame[3], frame[0]:frame[2]])
    fw, fh = frame[2] - frame[0], frame[3] - frame[1]
    zoomed, _ = resize_to_fit(crop, panel, panel, cv2.INTER_NEAREST if panel >= max(fw, fh) else cv2.INTER_AREA)
    zoom = (zoomed.shape[1] / fw, zoomed.shape[0] / fh)
    zoomed = (zoomed * 0.7).astype(np.uint8)  # dimmed, so the overlays stand out

    overview = _to_bgr(seen)
    draw_detections(overview, box[None], [label], None if score is None else [score], class_names)
    draw_rects(overview, [frame], (255, 255, 255), thickness=1)
    overview, _ = resize_to_fit(overview, panel, panel)
    top = [pad_to(overview, panel, panel)]
    top += [_rule_panel(zoomed, frame, zoom, v, box, stride, rule.colour, panel) for v, rule in zip(views, rules)]
    bottom = [_crop_panel(exact, panel)] + [_crop_panel(v.crop, panel) for v in views]
    w, h = box[2] - box[0], box[3] - box[1]
    captions = [f"{heading}\n{w:.0f} x {h:.0f} px {where}, stride {stride}\nwhite frame: the part zoomed in"]
    captions += [f"{v.name}\n{v.summary}\n{'(the rule of this model)' if own == k else ''}"
                 for v, k in zip(views, keys)]
    captions += [f"exact {pooled}x{pooled} bin means\n(full resolution)"]
    captions += [f"{k}: {pooled}x{pooled} crop, {'mean of each bin' if rule.quantized else 'the op'}\n"
                 f"error {e:.1f} grey levels" for k, rule, e in zip(keys, rules, errors)]
    view = tile_images(top + bottom, captions, columns=4)
    info = {"detection": index, "box_net_px": [round(float(v), 2) for v in box], "stride": stride,
            "crop_error": dict(zip(keys, [round(e, 2) for e in errors]))}
    return view, info


def blank_explain(panel: int, message: str) -> np.ndarray:
    """An explain view of the same size as :func:`explain_pooling`'s, for a frame with nothing to explain."""
    tiles = [put_text_lines(pad_to(np.zeros((1, 1, 3), np.uint8), panel, panel), message, (8, 8))]
    tiles += [pad_to(np.zeros((1, 1, 3), np.uint8), panel, panel) for _ in range(7)]
    return tile_images(tiles, ["\n\n"] * 8, columns=4)


