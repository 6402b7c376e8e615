"""Explain what each pooling rule does to one box: every rounding step, the cells each bin reads, and how far
each bin's centre lands from where it should be::

    print(format_explanation(explain_box((0, 0, 665, 665), stride=32)))   # or: python tools/explain.py

The cells come from the ops' own rule function (``bin_edges``) and the bin centres from the ops themselves (the
gradient of each output bin with respect to the feature map), so what is printed is what the ops do. The rules, their
titles and how each is run come from :mod:`roikit.analysis.rules`; they are named here by their short names.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ..ops.geometry import bin_edges, round_half_away
from .rules import get_rule

# the rules explained, by their short names in roikit.analysis.rules, in the order they are printed
RULES = tuple(get_rule(name).short for name in (
    "roi_pool_integer", "roi_pool_torchvision", "roi_align_aligned", "roi_align_unaligned", "prroi_pool"))


@dataclass
class AxisExplanation:
    rule: str
    axis: str
    steps: list[str]  # the arithmetic, one line per step
    bins: list[tuple[float, float]]  # cells each bin reads ([start, end) in cells; fractional for samplers)
    cells_read: float  # cells of the map the bins read, in total (union)
    box_cells: float  # the box's size in cells
    centre_error_px: list[float] = field(default_factory=list)  # bin centre minus ideal centre, in pixels


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if abs(x - round(x)) > 1e-9 else str(int(round(x)))


def _weights_1d(rule: str, lo: float, hi: float, stride: int, output_size: int, sampling_ratio: int) -> torch.Tensor:
    """The weight each output bin gives each cell along one axis, [P, L], read as the op's gradient."""
    length = int(math.ceil(max(hi, 0) / stride)) + 3
    scale = 1.0 / stride
    feat = torch.zeros(1, 1, 1, length, dtype=torch.float64, requires_grad=True)
    box = torch.tensor([[0.0, lo, 0.0, hi, 1.0]], dtype=torch.float64)
    op = replace(get_rule(rule), sampling_ratio=sampling_ratio)
    # a 1-row map: the rows of every sample clamp to row 0, so the x weights come out alone
    jac = torch.autograd.functional.jacobian(lambda x: op.pool(x, box, (1, output_size), scale), feat)
    return jac.reshape(output_size, length)  # from [1, 1, 1, P, 1, 1, 1, L]


def explain_axis(rule: str, lo: float, hi: float, stride: int, output_size: int = 7, sampling_ratio: int = 2,
                 axis: str = "x") -> AxisExplanation:
    """Explain one axis ``[lo, hi)`` (pixels) of a box under one rule."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"the box must have x2 > x1 and y2 > y1, got [{lo}, {hi}] on {axis}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size <= 0:
        raise ValueError(f"output_size must be a positive int, got {output_size!r}")
    s, p = stride, output_size
    size = (hi - lo) / s
    ideal = [lo + (i + 0.5) * (hi - lo) / p for i in range(p)]  # centre of each exact bin, px
    steps: list[str] = []
    op = get_rule(rule)
    if op.quantized:
        length = int(math.ceil(hi / s)) + 3
        rois = torch.tensor([[0.0, lo, 0.0, hi, 1.0]], dtype=torch.float32)
        _, (w0, w1) = bin_edges(rois, 1.0 / s, (1, p), op.rounding, (1, length))
        bins = [(float(a), float(b)) for a, b in zip(w0[0].tolist(), w1[0].tolist())]
        if op.rounding == "integer":
            start, cells = math.floor(lo / s), math.floor(size)
            bin_cells = max(cells // p, 1)
            steps += [
                f"start  floor({_fmt(lo)} / {s}) = {start} cells",
                f"size   {_fmt(hi - lo)} / {s} = {size:.2f} cells -> floor = {cells} cells",
                f"bin    {cells} / {p} = {cells / p:.2f} cells -> floor = {bin_cells} cells (at least 1)",
            ]
        else:
            c_lo, c_hi = lo / s, hi / s
            # the op's own rounding (half away from zero), on the float32 coordinates it sees
            r_lo, r_hi = (int(v) for v in round_half_away(rois[0, [1, 3]] * (1.0 / s)))
            cells = max(r_hi - r_lo + 1, 1)
            steps += [
                f"start  round({_fmt(lo)} / {s} = {c_lo:.2f}) = {r_lo} cells",
                f"end    round({_fmt(hi)} / {s} = {c_hi:.2f}) = {r_hi} cells",
                f"size   {r_hi} - {r_lo} + 1 = {cells} cells (the end cell counts: +1)",
                f"bin    {cells} / {p} = {cells / p:.2f} cells, bin i reads [floor(i * {cells / p:.2f}), "
                f"ceil((i + 1) * {cells / p:.2f}))",
            ]
        covered = sorted({c for a, b in bins for c in range(int(a), int(b))})
        read = len(covered)
        centres = [((a + b) / 2) * s for a, b in bins]  # uniform weight over whole cells
    else:
        weights = _weights_1d(rule, lo, hi, s, p, sampling_ratio)  # [P, L]
        cell_centres = (torch.arange(weights.shape[1], dtype=torch.float64) + 0.5) * s
        totals = weights.sum(dim=1)
        centres = ((weights * cell_centres).sum(dim=1) / totals.clamp(min=1e-12)).tolist()
        nz = [torch.nonzero(weights[i] > 0).flatten().tolist() for i in range(p)]
        bins = [(float(min(c)), float(max(c) + 1)) if c else (0.0, 0.0) for c in nz]
        read = len(set(c for cs in nz for c in cs))
        steps += [f"size   {_fmt(hi - lo)} / {s} = {size:.2f} cells, no rounding: bin = {size / p:.2f} cells"]
        if op.op == "prroi_pool":
            steps += ["each bin is the exact integral of the bilinear surface over it (no samples)",
                      "cell (v) sits at x = v in feature units: a shift of half a cell against pixel centres"]
        else:
            shift = "-0.5 cell (aligned: cell v is centred on pixel (v + 0.5) s)" if op.aligned else \
                "no -0.5 cell shift (aligned=False): every sample lands half a cell (s / 2 px) too far right"
            steps += [f"samples {sampling_ratio} per bin and axis, {shift}"]
    errors = [c - t for c, t in zip(centres, ideal)]
    steps.append(f"read   {read} cells = {read * s} px of the box's {_fmt(hi - lo)} px"
                 + (f" ({100 * read * s / (hi - lo):.1f}%)" if op.quantized else ""))
    return AxisExplanation(rule, axis, steps, bins, float(read), size, errors)


def explain_box(box: Sequence[float], stride: int, output_size: int = 7, sampling_ratio: int = 2,
                rules: Sequence[str] = RULES) -> list[AxisExplanation]:
    """Explain a box ``(x1, y1, x2, y2)`` in pixels under every rule, axis by axis (y only where it differs)."""
    if len(box) != 4:
        raise ValueError(f"box must be (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    out = []
    for rule in rules:
        out.append(explain_axis(rule, x1, x2, stride, output_size, sampling_ratio, "x"))
        if (y1, y2) != (x1, x2):
            out.append(explain_axis(rule, y1, y2, stride, output_size, sampling_ratio, "y"))
    return out


def format_explanation(items: list[AxisExplanation], box: Sequence[float] | None = None, stride: int | None = None,
                       output_size: int | None = None) -> str:
    """The explanation as text: a header for the box (when given), then per rule and axis its title, the
    arithmetic, the cells each bin reads and the bin-centre errors."""
    lines = []
    if box is not None:
        x1, y1, x2, y2 = box
        lines.append(f"Box ({_fmt(x1)}, {_fmt(y1)}, {_fmt(x2)}, {_fmt(y2)}): {_fmt(x2 - x1)} x {_fmt(y2 - y1)} px, "
                     f"stride {stride} (spatial_scale = 1/{stride}), {output_size} x {output_size} bins")
        lines.append("")
    for item in items:
        lines.append(f"{get_rule(item.rule).title}  [{item.axis} axis]")
        lines += [f"  {step}" for step in item.steps]
        bins = " ".join(f"[{_fmt(a)},{_fmt(b)})" for a, b in item.bins)
        lines.append(f"  cells  {bins}")
        errs = " ".join(f"{e:+.1f}" for e in item.centre_error_px)
        mean = sum(abs(e) for e in item.centre_error_px) / len(item.centre_error_px)
        lines.append(f"  bin centre - true centre (px): {errs}   mean |error| {mean:.1f} px")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
