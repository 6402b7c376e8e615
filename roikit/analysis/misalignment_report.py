"""The misalignment study's report: markdown tables of the summary, error-against-size plots, and pictures of a few
boxes with the cells each rule reads (from ``bin_weights``, every bin's weight on every cell of the map).

The measures themselves are :mod:`roikit.analysis.misalignment`; the rules' names and plot colours come from
:mod:`roikit.analysis.rules`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .misalignment import BUCKETS, METRICS, READ_THRESHOLD, check_output_size, check_stride, roi_pool_bins
from .misalignment_boxes import BoxSet, load_image
from .rules import Rule

__all__ = ["bin_weights", "format_tables", "plot_error_vs_size", "pick_examples", "draw_examples"]

# rule -> (marker, line style, marker size, filled): rules that measure alike (roi_align_unaligned and prroi_pool
# are both half a cell late) stay visible on top of each other: hollow and bigger over filled, dashed over solid
_PLOT_STYLE = {
    "roi_pool_torchvision": ("o", "-", 4, True),
    "roi_pool_integer": ("s", "-", 3.5, True),
    "roi_align_aligned": ("^", "-", 4.5, True),
    "roi_align_unaligned": ("v", "--", 4.5, True),
    "prroi_pool": ("D", ":", 6.5, False),
    "prroi_pool_aligned": ("o", "-.", 7.5, False),
}


def bin_weights(rule: Rule, boxes: np.ndarray, image_hw: tuple[int, int], stride: int, output_size: int = 7,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """The weight each bin gives to each cell of the whole map, box by box: [K, P, P, h, w] with
    ``(h, w) = ceil(image_hw / stride)``. For few boxes (pictures, checks): one map of ``P * P`` channels per box.

    ``roi_align`` / ``prroi_pool``: the gradient of the op with respect to the map, bin ``b`` on channel ``b`` (one
    backward pass). ``roi_pool``: its bin's rectangle (from the op, as ``measure_boxes`` reads it), uniformly.
    """
    stride, p = check_stride(stride), check_output_size(output_size)
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    k = boxes.shape[0]
    h, w = -(-int(image_hw[0]) // stride), -(-int(image_hw[1]) // stride)
    scale = 1.0 / stride
    if rule.quantized:
        rois0 = torch.cat([torch.zeros(k, 1, dtype=torch.float64), boxes], dim=1)
        hs, he, ws, we, nonempty = roi_pool_bins(rule, rois0, h, w, p, scale, dtype)
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


def plot_error_vs_size(results: dict[int, dict[str, np.ndarray]], rules: Sequence[Rule], areas: np.ndarray,
                       metric: str, path: str | Path, bins: int = 16) -> None:
    """One panel per stride: the mean of ``metric`` against box size (sqrt of area, log scale), a line per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

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
            marker, line, size, filled = _PLOT_STYLE.get(rule.name, ("o", "-", 4, True))
            ax.plot(centres, means, marker=marker, ls=line, ms=size, lw=1.1, label=rule.name, color=rule.plot_colour,
                    mfc=None if filled else "none", mew=1.0, alpha=0.9)
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
    _save_png(fig, path, 100)
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


def _square_view(view: list[float], hw: tuple[int, int], pad: float) -> list[float]:
    """``view`` (x1, x2, y1, y2) grown by ``pad`` and then to a square where the image has room, clipped to it:
    every panel of a row fills its square instead of leaving white bands beside a tall or wide box."""
    side = max(view[1] - view[0], view[3] - view[2]) + 2 * pad

    def axis(lo: float, hi: float, n: int) -> tuple[float, float]:
        start = min(max((lo + hi - side) / 2, 0.0), max(n - side, 0.0))
        return start, min(start + side, n)

    (x1, x2), (y1, y2) = axis(view[0], view[1], hw[1]), axis(view[2], view[3], hw[0])
    return [x1, x2, y1, y2]


def draw_examples(boxset: BoxSet, picks: np.ndarray, rules: Sequence[Rule], stride: int, output_size: int,
                  path: str | Path, images_dir: str | Path | None = None, *, panel_inches: float = 2.4,
                  dpi: int = 100) -> None:
    """A row per box, a panel per rule: the cells the rule reads (blue, darker for more weight, from
    ``bin_weights``), the true box (red), the rule's bin centres (dark dots) joined (orange) to the exact ones
    (red crosses); the photo (washed out, so the blue stays readable) underneath when ``images_dir`` is given.
    Rows are named by the box's category and size; each panel is a square around the box and every cell read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    p = check_output_size(output_size)
    stride = check_stride(stride)
    picks = np.asarray(picks).tolist()
    fig, axes = plt.subplots(len(picks), len(rules), figsize=(panel_inches * len(rules), panel_inches * len(picks)),
                             squeeze=False, gridspec_kw={"wspace": 0.03, "hspace": 0.03})
    grid = (np.arange(p) + 0.5) / p
    for row, i in enumerate(picks):
        box = boxset.boxes[i]
        hw = tuple(int(v) for v in boxset.image_hw[i])
        x1, y1, x2, y2 = box
        true_y, true_x = np.meshgrid(y1 + grid * (y2 - y1), x1 + grid * (x2 - x1), indexing="ij")
        photo = None
        if images_dir is not None:
            image = load_image(Path(images_dir), boxset.images[int(boxset.image_ids[i])], int(boxset.image_ids[i]))
            photo = 0.45 + 0.55 * image / 255.0  # washed out: the blue reads stay visible
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
        view = _square_view(view, hw, 0.5 * stride)
        for col, (rule, (total, read, ok, px, py)) in enumerate(zip(rules, panels)):
            ax = axes[row][col]
            if photo is not None:
                ax.imshow(photo, extent=(0, hw[1], hw[0], 0), interpolation="antialiased")
            else:
                ax.add_patch(Rectangle((0, 0), hw[1], hw[0], color="0.93", zorder=0))
            shade = np.ma.masked_where(~read, 0.35 + 0.65 * total / max(total.max(), 1e-30))
            ax.imshow(shade, extent=(0, total.shape[1] * stride, total.shape[0] * stride, 0), cmap="Blues", vmin=0,
                      vmax=1.0, alpha=0.65, interpolation="nearest")
            for g in range(int(view[0] // stride), int(view[1] // stride) + 2):
                ax.axvline(g * stride, color="0.5", lw=0.3)
            for g in range(int(view[2] // stride), int(view[3] // stride) + 2):
                ax.axhline(g * stride, color="0.5", lw=0.3)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.3))
            for a, b, c, d in zip(true_x[ok], true_y[ok], px[ok], py[ok]):
                ax.plot([a, c], [b, d], color="orange", lw=0.8)
            ax.plot(true_x.ravel(), true_y.ravel(), "x", color="red", ms=3, mew=0.8)
            ax.plot(px[ok], py[ok], ".", color="black", ms=3)
            ax.set_xlim(view[0], view[1])
            ax.set_ylim(view[3], view[2])
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(rule.name, fontsize=9)
            if col == 0:
                ax.set_ylabel(boxset.describe(i), fontsize=9)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
    fig.suptitle(f"stride {stride}, {p}x{p} bins: cells read (blue), true box (red), exact bin centres (x), "
                 f"the rule's (dots)", fontsize=9, y=1 + 0.4 / (panel_inches * len(picks)), va="bottom")
    _save_png(fig, path, dpi, colours=128 if photo is not None else None)
    plt.close(fig)


def _save_png(fig, path: str | Path, dpi: int, colours: int | None = None) -> None:
    """``fig`` as a PNG trimmed to its content, written atomically; ``colours``: reduced to that many (a photo's
    PNG is a quarter of the size, and a figure's few hundred colours survive it)."""
    import io

    from PIL import Image

    from roikit.io import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    if colours is not None:
        image = Image.open(buffer).convert("RGB").quantize(colours, method=Image.Quantize.FASTOCTREE)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())
