"""Explain what each pooling rule does to one box: every rounding step, the cells each bin reads, and how far
each bin's centre lands from where it should be::

    print(format_explanation(explain_box((0, 0, 665, 665), stride=32)))   # or: python tools/explain.py

The cells come from the ops' own rule functions (``bin_edges``, ``ps_roi_pool_edges``) and the bin centres from the
ops themselves (the gradient of each output bin with respect to the feature map), so what is printed is what the
ops do. The rules, their titles and how each is run come from :mod:`roikit.analysis.rules`; they are named here by
their short names. :data:`RULES` are the detector poolers (printed by default), :data:`ZOO` the zoo's other region
ops: ``ps_roi_pool``, ``ps_roi_align``, ``roi_align_rotated`` (at ``angle`` degrees, along the box's own axes;
with and without ``aligned``) and ``deform_roi_pool`` (its bins moved by ``offset``).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ..ops.geometry import bin_edges, ps_roi_pool_edges, round_half_away
from .rules import ZOO_RULES, get_rule

# the rules explained, by their short names in roikit.analysis.rules, in the order they are printed
RULES = tuple(get_rule(name).short for name in (
    "roi_pool_integer", "roi_pool_torchvision", "roi_align_aligned", "roi_align_unaligned", "prroi_pool"))
ZOO = tuple(rule.short for rule in ZOO_RULES.values())  # explained when asked for
NAMES = RULES + ZOO
ROTATED = tuple(rule.short for rule in ZOO_RULES.values() if rule.op == "roi_align_rotated")
MAX_ROTATED_CELLS = 1 << 22  # a rotated box's map (its gradient is float64): 32 MiB at most
_NOISE = 1e-9  # a weight under this fraction of its bins' largest is float noise (cos 90 deg is 6e-17), not a read


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


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _weights_1d(rule: str, lo: float, hi: float, stride: int, output_size: int, sampling_ratio: int,
                offset: float = 0.0) -> torch.Tensor:
    """The weight each output bin gives each cell along one axis, [P, L], read as the op's gradient."""
    shift = abs(offset) * get_rule(rule).gamma * (hi - lo)  # deform_roi_pool's bins move this far, px
    length = int(math.ceil(max(hi + shift, 0) / stride)) + 3
    scale = 1.0 / stride
    feat = torch.zeros(1, 1, 1, length, dtype=torch.float64, requires_grad=True)
    box = torch.tensor([[0.0, lo, 0.0, hi, 1.0]], dtype=torch.float64)
    op = replace(get_rule(rule), sampling_ratio=sampling_ratio)
    extra = {}
    if op.op == "deform_roi_pool":  # x moves by offset, y not at all
        extra["offset"] = torch.zeros(1, 2, 1, output_size, dtype=torch.float64).index_fill_(1, torch.tensor(0),
                                                                                              offset)
    # a 1-row map: the rows of every sample clamp to row 0, so the x weights come out alone
    jac = torch.autograd.functional.jacobian(lambda x: op.pool(x, box, (1, output_size), scale, **extra), feat)
    return jac.reshape(output_size, length)  # from [1, 1, 1, P, 1, 1, 1, L]


def _check(rule: str, lo: float, hi: float, stride: int, output_size: int, axis: str) -> None:
    if rule not in NAMES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, NAMES))}, got {rule!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"the box must have x2 > x1 and y2 > y1, got [{lo}, {hi}] on {axis}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size <= 0:
        raise ValueError(f"output_size must be a positive int, got {output_size!r}")


def _sample_shift(aligned: bool, rotated: bool = False) -> str:
    if aligned:
        return "-0.5 cell (aligned: cell v is centred on pixel (v + 0.5) s)"
    if rotated:
        return ("no -0.5 cell shift (aligned=False): every sample lands half a cell (s / 2 px) too far right and "
                "down on the image")
    return "no -0.5 cell shift (aligned=False): every sample lands half a cell (s / 2 px) too far right"


def _count(sampling_ratio: int) -> str:
    return str(sampling_ratio) if sampling_ratio > 0 else "ceil(bin size)"


def _maps_step(p: int) -> str:
    return (f"maps   bin (p, q) of output channel c reads only input channel (c * {p} + p) * {p} + q "
            f"({p * p} maps; here {p * p} copies of one)")


def _quantized(op, lo: float, hi: float, s: int, p: int) -> tuple[list[str], list[tuple[float, float]]]:
    """The rounding arithmetic of ``roi_pool`` / ``ps_roi_pool`` along one axis, and each bin's cells."""
    length = int(math.ceil(hi / s)) + 3
    rois = torch.tensor([[0.0, lo, 0.0, hi, 1.0]], dtype=torch.float32)
    if op.op == "ps_roi_pool":
        _, (w0, w1) = ps_roi_pool_edges(rois, 1.0 / s, (1, p), (1, length))
    else:
        _, (w0, w1) = bin_edges(rois, 1.0 / s, (1, p), op.rounding, (1, length))
    bins = [(float(a), float(b)) for a, b in zip(w0[0].tolist(), w1[0].tolist())]
    size = (hi - lo) / s
    if op.op == "roi_pool" and op.rounding == "integer":
        start, cells = math.floor(lo / s), math.floor(size)
        bin_cells = max(cells // p, 1)
        return [
            f"start  floor({_fmt(lo)} / {s}) = {start} cells",
            f"size   {_fmt(hi - lo)} / {s} = {size:.2f} cells -> floor = {cells} cells",
            f"bin    {cells} / {p} = {cells / p:.2f} cells -> floor = {bin_cells} cells (at least 1)",
        ], bins
    c_lo, c_hi = lo / s, hi / s
    # the op's own rounding (half away from zero), on the float32 coordinates it sees
    r_lo, r_hi = (int(v) for v in round_half_away(rois[0, [1, 3]] * (1.0 / s)))
    steps = [f"start  round({_fmt(lo)} / {s} = {c_lo:.2f}) = {r_lo} cells",
             f"end    round({_fmt(hi)} / {s} = {c_hi:.2f}) = {r_hi} cells"]
    if op.op == "ps_roi_pool":
        cells = max(r_hi - r_lo, 1)
        steps.append(f"size   {r_hi} - {r_lo} = {cells} cells (no +1, unlike roi_pool; at least 1)")
    else:
        cells = max(r_hi - r_lo + 1, 1)
        steps.append(f"size   {r_hi} - {r_lo} + 1 = {cells} cells (the end cell counts: +1)")
    steps.append(f"bin    {cells} / {p} = {cells / p:.2f} cells, bin i reads [floor(i * {cells / p:.2f}), "
                 f"ceil((i + 1) * {cells / p:.2f}))")
    if op.op == "ps_roi_pool":
        steps += ["clip   to the map, and never its last cell (torchvision's forward stops a row and a column short)",
                  _maps_step(p)]
    return steps, bins


def explain_axis(rule: str, lo: float, hi: float, stride: int, output_size: int = 7, sampling_ratio: int = 2,
                 axis: str = "x", offset: float = 0.0) -> AxisExplanation:
    """Explain one axis ``[lo, hi)`` (pixels) of a box under one rule; ``offset`` (``deform_roi_pool`` only) moves
    every bin by ``offset * gamma * (hi - lo)`` pixels. ``roi_align_rotated`` needs the whole box:
    :func:`explain_rotated`."""
    _check(rule, lo, hi, stride, output_size, axis)
    op = get_rule(rule)
    offset = _number(offset, "offset")
    if op.op == "roi_align_rotated":
        raise ValueError(f"{rule} turns the whole box: explain it with explain_rotated or explain_box")
    if offset != 0.0 and op.op != "deform_roi_pool":
        raise ValueError(f"offset applies to deform_roi_pool only, not to {rule}")
    s, p = stride, output_size
    size = (hi - lo) / s
    ideal = [lo + (i + 0.5) * (hi - lo) / p for i in range(p)]  # centre of each exact bin, px
    if op.quantized:
        steps, bins = _quantized(op, lo, hi, s, p)
        covered = sorted({c for a, b in bins for c in range(int(a), int(b))})
        read = len(covered)
        centres = [((a + b) / 2) * s for a, b in bins]  # uniform weight over whole cells
    else:
        weights = _weights_1d(rule, lo, hi, s, p, sampling_ratio, offset)  # [P, L]
        cell_centres = (torch.arange(weights.shape[1], dtype=torch.float64) + 0.5) * s
        totals = weights.sum(dim=1)
        centres = ((weights * cell_centres).sum(dim=1) / totals.clamp(min=1e-12)).tolist()
        nz = [torch.nonzero(weights[i] > 0).flatten().tolist() for i in range(p)]
        bins = [(float(min(c)), float(max(c) + 1)) if c else (0.0, 0.0) for c in nz]
        read = len(set(c for cs in nz for c in cs))
        steps = [f"size   {_fmt(hi - lo)} / {s} = {size:.2f} cells, no rounding: bin = {size / p:.2f} cells"]
        if op.op == "prroi_pool":
            steps += ["each bin is the exact integral of the bilinear surface over it (no samples)",
                      "cell (v) sits at x = v in feature units: a shift of half a cell against pixel centres"]
        else:
            if op.op == "deform_roi_pool":
                steps.append(f"offset {_fmt(op.gamma)} (gamma) x {_fmt(offset)} x {size:.2f} cells = "
                             f"{op.gamma * offset * size:+.2f} cells ({op.gamma * offset * (hi - lo):+.2f} px): "
                             "every bin and its samples move by that" if offset else
                             "offset 0: no bin moves (roi_align, aligned=True)")
            steps.append(f"samples {_count(sampling_ratio)} per bin and axis, {_sample_shift(op.aligned)}")
            if op.op == "ps_roi_align":
                steps.append(_maps_step(p))
    errors = [c - t for c, t in zip(centres, ideal)]
    steps.append(f"read   {read} cells = {read * s} px of the box's {_fmt(hi - lo)} px"
                 + (f" ({100 * read * s / (hi - lo):.1f}%)" if op.quantized else ""))
    return AxisExplanation(rule, axis, steps, bins, float(read), size, errors)


def explain_rotated(rule: str, box: Sequence[float], stride: int, output_size: int = 7, sampling_ratio: int = 2,
                    angle: float = 0.0) -> list[AxisExplanation]:
    """Explain ``roi_align_rotated`` on the box ``(x1, y1, x2, y2)`` (pixels) turned by ``angle`` degrees about its
    centre (counterclockwise on the image, the op's ``clockwise=False``): its x axis (the width, bins in columns
    ``q``), then its y axis (the height, rows ``p``).

    Each column of bins is read from the op's gradient on a 2-D map: its weighted centre, projected on the box's
    axis, against the exact bin centre ``((q + 0.5) / P - 0.5) w`` from the box's centre (the error is along the
    axis, in pixels), and the cells it reads along the image axis the box's axis runs most along (``bins``; in
    the order of the box's bins, so they run backwards where the axis points left or up).
    """
    if len(box) != 4:
        raise ValueError(f"box must be (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    _check(rule, x1, x2, stride, output_size, "x")
    _check(rule, y1, y2, stride, output_size, "y")
    op = replace(get_rule(rule), sampling_ratio=sampling_ratio)
    if op.op != "roi_align_rotated":
        raise ValueError(f"explain_rotated explains {', '.join(ROTATED)}, not {rule}")
    angle = _number(angle, "angle")
    s, p = stride, output_size
    t = math.radians(angle)
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    axes = {"x": (w, (math.cos(t), -math.sin(t))), "y": (h, (math.sin(t), math.cos(t)))}  # box axis -> image (x, y)
    reach_x = abs(w / 2 * math.cos(t)) + abs(h / 2 * math.sin(t))
    reach_y = abs(w / 2 * math.sin(t)) + abs(h / 2 * math.cos(t))
    width, height = (max(int(math.ceil(max(c + r, 0) / s)) + 3, 1) for c, r in ((cx, reach_x), (cy, reach_y)))
    if width * height > MAX_ROTATED_CELLS:
        raise ValueError(f"the turned box covers a {height} x {width} cell map at stride {s}, over "
                         f"{MAX_ROTATED_CELLS} cells; explain it at a larger stride")
    feat = torch.zeros(1, 1, height, width, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, x1, y1, x2, y2]], dtype=torch.float64)
    out = op.pool(feat, rois, p, 1.0 / s, angle=angle)[0, 0]  # [P, P]
    with torch.no_grad():  # on a map of ones a bin is the share of its samples on the map (the others count 0)
        on_map = op.pool(torch.ones_like(feat), rois, p, 1.0 / s, angle=angle).mean().item()
    edge = [] if on_map > 1 - 1e-9 else [f"edge   the turned box leaves the image (pixel 0 is its edge): "
                                         f"{100 * (1 - on_map):.1f}% of its samples land off the map and count 0"]
    u = (torch.arange(height, dtype=torch.float64) + 0.5) * s  # cell centres, px
    v = (torch.arange(width, dtype=torch.float64) + 0.5) * s
    items = []
    for axis, (extent, direction) in axes.items():
        ex, ey = (round(d, 12) + 0.0 for d in direction)  # cos 90 deg is 6e-17: printed as 0, not -0
        along_x = abs(ex) >= abs(ey)  # the image axis this box axis runs most along
        lines = out.sum(dim=0) if axis == "x" else out.sum(dim=1)  # a column (row) of bins, [P]
        bins, centres, read = [], [], set()
        for i in range(p):
            (g,) = torch.autograd.grad(lines[i], feat, retain_graph=True)
            g = g[0, 0]  # [H, W]: the weight of every cell
            total = g.sum().clamp(min=1e-300)
            gx, gy = (g.sum(dim=0) * v).sum() / total, (g.sum(dim=1) * u).sum() / total
            centres.append(float((gx - cx) * ex + (gy - cy) * ey))
            marginal = g.sum(dim=0) if along_x else g.sum(dim=1)
            cells = torch.nonzero(marginal > _NOISE * marginal.max().clamp(min=1e-300)).flatten().tolist()
            bins.append((float(min(cells)), float(max(cells) + 1)) if cells else (0.0, 0.0))
            read.update(cells)
        ideal = [((i + 0.5) / p - 0.5) * extent for i in range(p)]
        size = extent / s
        image_axis = "columns (x)" if along_x else "rows (y)"
        steps = [
            f"box    centre ({_fmt(cx)}, {_fmt(cy)}) px, {_fmt(w)} x {_fmt(h)} px, turned {_fmt(angle)} deg "
            f"counterclockwise (clockwise=False)",
            f"axis   its {axis} axis ({'width' if axis == 'x' else 'height'}) runs along ({ex:+.2f}, {ey:+.2f}) on "
            f"the image (y down); cells below are the image's {image_axis}",
            f"size   {_fmt(extent)} / {s} = {size:.2f} cells, no rounding: bin = {size / p:.2f} cells",
            "turn   samples lie on the box's own grid (xx, yy) from its centre, turned by t: "
            "x = cx + xx cos t + yy sin t, y = cy - xx sin t + yy cos t",
            f"samples {_count(sampling_ratio)} per bin and axis, {_sample_shift(op.aligned, True)}",
            *edge,
            f"read   {len(read)} cells = {len(read) * s} px along the image's {'x' if along_x else 'y'} for the box's "
            f"{_fmt(extent)} px",
        ]
        errors = [c - t for c, t in zip(centres, ideal)]
        errors = [0.0 if abs(e) < 1e-9 * max(extent, 1.0) else e for e in errors]  # float noise, not -0.0
        items.append(AxisExplanation(rule, axis, steps, bins, float(len(read)), size, errors))
    return items


def explain_box(box: Sequence[float], stride: int, output_size: int = 7, sampling_ratio: int = 2,
                rules: Sequence[str] = RULES, angle: float = 0.0,
                offset: Sequence[float] = (0.0, 0.0)) -> list[AxisExplanation]:
    """Explain a box ``(x1, y1, x2, y2)`` in pixels under every rule, axis by axis (y only where it differs).

    ``angle`` (degrees) turns the box for the ``roi_align_rotated`` rules (:func:`explain_rotated`); ``offset``
    ``(dx, dy)`` moves every bin of ``deform_roi_pool`` by ``gamma * (dx w, dy h)``. Either needs its rule among
    ``rules``.
    """
    if len(box) != 4:
        raise ValueError(f"box must be (x1, y1, x2, y2), got {box!r}")
    if isinstance(rules, str) or not rules or any(r not in NAMES for r in rules):
        raise ValueError(f"rules must be a list of names from {', '.join(NAMES)}, got {rules!r}")
    angle = _number(angle, "angle")
    if isinstance(offset, (str, bytes)) or len(offset) != 2:
        raise ValueError(f"offset must be (dx, dy), got {offset!r}")
    dx, dy = (_number(d, "offset") for d in offset)
    if angle != 0.0 and not any(r in ROTATED for r in rules):
        raise ValueError(f"angle applies to {' and '.join(ROTATED)} only; add one to the rules")
    if (dx, dy) != (0.0, 0.0) and "deform_roi_pool" not in rules:
        raise ValueError("offset applies to deform_roi_pool only; add it to the rules")
    x1, y1, x2, y2 = (float(v) for v in box)
    out = []
    for rule in rules:
        if rule in ROTATED:
            both = explain_rotated(rule, box, stride, output_size, sampling_ratio, angle)
            out += both if (y1, y2) != (x1, x2) or angle % 360 != 0 else both[:1]
            continue
        deform = get_rule(rule).op == "deform_roi_pool"
        out.append(explain_axis(rule, x1, x2, stride, output_size, sampling_ratio, "x", dx if deform else 0.0))
        if (y1, y2) != (x1, x2) or (deform and dy != dx):
            out.append(explain_axis(rule, y1, y2, stride, output_size, sampling_ratio, "y", dy if deform else 0.0))
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
