"""CPU times of the zoo's ops that torchvision has no counterpart for, against the torchvision op each equals on a
special case (``python tools/bench.py --zoo``):

* ``roi_align_rotated`` at angle 0 and ``deform_roi_pool`` at offset 0 both equal ``torchvision.ops.roi_align``
  (``aligned=True``) on the same boxes: the yardstick does the same sampling; the rotated op is also timed at
  random angles, the deformable one with random offsets (no reference there);
* ``roi_align(box_grad=True)`` against plain ``roi_align`` (roikit's and torchvision's): what the box gradient costs.

The workload is :func:`~roikit.analysis.bench.make_workload`'s (2 x 256 x 50 x 68, stride 16, 16-316 px boxes),
7 x 7 bins, ``sampling_ratio=2``, float32. Each time is the minimum over rounds of the median of ``repeat`` calls,
the cases of one row alternating round by round.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchvision

from ..ops import deform_roi_pool, roi_align, roi_align_rotated
from .bench import make_workload, time_ms

__all__ = ["time_zoo", "format_zoo"]

ALIGN = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=2)


def _rotated(rois: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(batch, x1, y1, x2, y2) -> (batch, cx, cy, w, h, angle)."""
    b, x1, y1, x2, y2 = rois.unbind(1)
    return torch.stack([b, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, angles], dim=1)


def _pass(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], features: torch.Tensor, rois: torch.Tensor,
          backward: bool, box_grad: bool = False) -> Callable[[], object]:
    grad = torch.randn(rois.shape[0], features.shape[1], 7, 7, generator=torch.Generator().manual_seed(1))

    def run():
        if not backward:
            with torch.no_grad():
                return fn(features, rois)
        x = features.detach().requires_grad_()
        r = rois.detach().requires_grad_(box_grad)
        fn(x, r).backward(grad)
    return run


def _cases(num_boxes: int):
    features, rois = make_workload(num_boxes)
    g = torch.Generator().manual_seed(2)
    turned = _rotated(rois, torch.rand(num_boxes, generator=g) * 360 - 180)
    offset = torch.randn(num_boxes, 2, 7, 7, generator=g)
    tv = lambda x, r: torchvision.ops.roi_align(x, r, aligned=True, **ALIGN)  # noqa: E731
    for backward in (False, True):
        mode = "forward+backward" if backward else "forward"
        yield "roi_align_rotated", mode, {
            "roikit, angle 0": _pass(lambda x, r: roi_align_rotated(x, _rotated(r, r.new_zeros(len(r))), **ALIGN),
                                     features, rois, backward),
            "roikit, random angles": _pass(lambda x, r: roi_align_rotated(x, turned, **ALIGN), features, rois,
                                           backward),
            "torchvision roi_align (= angle 0)": _pass(tv, features, rois, backward)}
        yield "deform_roi_pool", mode, {
            "roikit, offset 0": _pass(lambda x, r: deform_roi_pool(x, r, None, **ALIGN), features, rois, backward),
            "roikit, random offsets": _pass(lambda x, r: deform_roi_pool(x, r, offset, **ALIGN), features, rois,
                                            backward),
            "torchvision roi_align (= offset 0)": _pass(tv, features, rois, backward)}
    yield "roi_align box_grad", "forward+backward", {
        "roikit, box_grad=True": _pass(lambda x, r: roi_align(x, r, aligned=True, box_grad=True, **ALIGN),
                                       features, rois, True, box_grad=True),
        "roikit, plain": _pass(lambda x, r: roi_align(x, r, aligned=True, **ALIGN), features, rois, True),
        "torchvision roi_align": _pass(tv, features, rois, True)}


def time_zoo(repeat: int = 5, rounds: int = 3, num_boxes: int = 512) -> list[dict]:
    """One row per (op, pass, case): ``{"op", "pass", "case", "ms"}``; the last case of each op is its yardstick."""
    rows = []
    for op, mode, cases in _cases(num_boxes):
        best = dict.fromkeys(cases, math.inf)
        for _ in range(rounds):
            for name, fn in cases.items():
                best[name] = min(best[name], time_ms(fn, repeat, warmup=1))
        rows += [{"op": op, "pass": mode, "case": name, "ms": ms} for name, ms in best.items()]
    return rows


def format_zoo(rows: list[dict]) -> str:
    """A markdown table; each time with its ratio to the op's yardstick (the last case of the op and pass)."""
    lines = ["| op | pass | case | ms | yardstick / this |", "|---|---|---|---:|---:|"]
    yardstick = {(r["op"], r["pass"]): r["ms"] for r in rows}  # the last case of each group wins
    for r in rows:
        ratio = yardstick[r["op"], r["pass"]] / r["ms"]
        lines.append(f"| {r['op']} | {r['pass']} | {r['case']} | {r['ms']:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)
