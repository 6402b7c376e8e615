"""The pooling rules the analysis tools compare, in one table: each rule's op and settings, its names, colours and
titles.

``explain`` (the rounding arithmetic), the demo's pooling view and the misalignment study (its tables, plots and
pictures) all take their rules from :data:`RULES`::

    >>> RULES["roi_pool_integer"].settings()
    {'op': 'roi_pool', 'rounding': 'integer'}
    >>> get_rule("integer").name            # the short names explain and the demo use are aliases
    'roi_pool_integer'

``Rule.pool`` runs the rule's op. The geometry behind each rule (which cells a bin reads, where a sample lands) is
:mod:`roikit.ops.geometry`.

:data:`RULES` holds the rules that can stand in for a detector's box-head pooler (``eval.py --pooler all`` and the
demo iterate it). The other region ops of the zoo are in :data:`ZOO_RULES`: ``explain`` explains them, and the
misalignment study measures the one with a rounding rule of its own (``ps_roi_pool``, see :data:`STUDY_RULES`).
They cannot replace a detector's pooler: the position-sensitive ops need ``C' * PH * PW`` channels (``Rule.pool``
gives them a one-map form: every bin reads the same map), ``roi_align_rotated`` a box angle, ``deform_roi_pool``
offsets.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from roikit.ops import deform_roi_pool, prroi_pool, ps_roi_align, ps_roi_pool, roi_align, roi_align_rotated, roi_pool

__all__ = ["Rule", "RULES", "ZOO_RULES", "STUDY_RULES", "DEFAULT_RULES", "ALIASES", "get_rule", "make_rules"]

Colour = tuple[int, int, int]  # B, G, R (OpenCV)


@dataclass(frozen=True)
class Rule:
    """A named pooling rule: an op and its settings, and how the tools show it.

    ``op`` is ``"roi_pool"`` (with ``rounding``), ``"roi_align"`` (``aligned``, ``sampling_ratio``, average
    pooling) or ``"prroi_pool"`` (``aligned``); in :data:`ZOO_RULES` also ``"ps_roi_pool"``, ``"ps_roi_align"``
    (``sampling_ratio``), ``"roi_align_rotated"`` (``aligned``, ``sampling_ratio``) and ``"deform_roi_pool"``
    (``sampling_ratio``, ``gamma``). ``short`` is the name ``explain`` and the demo's pooling view
    print (``"integer"`` for ``roi_pool_integer``); ``title`` the line ``explain`` heads the rule with;
    ``colour`` its BGR colour in OpenCV drawings and ``plot_colour`` its matplotlib colour.
    """

    name: str
    op: str
    rounding: str = "torchvision"
    aligned: bool = False
    sampling_ratio: int = 2
    gamma: float = 0.1  # deform_roi_pool's offset scale (mmcv's default)
    short: str = ""
    title: str = ""
    colour: Colour = (200, 200, 200)
    plot_colour: str | None = None

    @property
    def quantized(self) -> bool:
        """Whether the rule reads whole cells (``roi_pool``, ``ps_roi_pool``) rather than bilinear samples."""
        return self.op in ("roi_pool", "ps_roi_pool")

    def pool(self, features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float, *,
             angle: float = 0.0, offset: Tensor | None = None) -> Tensor:
        """The op itself on ``features`` [N, C, H, W] and ``rois`` [K, 5] ``(batch, x1, y1, x2, y2)``:
        ``Tensor[K, C, PH, PW]`` (``roi_align`` averages its samples).

        The position-sensitive ops get each channel repeated ``PH * PW`` times (bin ``(p, q)`` reads its own copy,
        so every bin reads the same map). ``roi_align_rotated`` turns every box by ``angle`` degrees about its
        centre; ``deform_roi_pool`` moves bin ``(p, q)`` by ``offset`` [K, 2, PH, PW] (x, then y) times ``gamma``
        times the box's width and height (None: no shift).
        """
        if angle != 0.0 and self.op != "roi_align_rotated":
            raise ValueError(f"angle applies to roi_align_rotated only, not to {self.name}")
        if offset is not None and self.op != "deform_roi_pool":
            raise ValueError(f"offset applies to deform_roi_pool only, not to {self.name}")
        if self.op == "roi_pool":
            return roi_pool(features, rois, output_size, spatial_scale, rounding=self.rounding)
        if self.op == "roi_align":
            return roi_align(features, rois, output_size, spatial_scale, self.sampling_ratio, self.aligned, "avg")
        if self.op == "prroi_pool":
            return prroi_pool(features, rois, output_size, spatial_scale, self.aligned)
        if self.op in ("ps_roi_pool", "ps_roi_align"):
            ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
            maps = features.repeat_interleave(ph * pw, dim=1)  # channel (c PH + p) PW + q is a copy of channel c
            if self.op == "ps_roi_pool":
                return ps_roi_pool(maps, rois, output_size, spatial_scale)
            return ps_roi_align(maps, rois, output_size, spatial_scale, self.sampling_ratio)
        if self.op == "roi_align_rotated":
            centre, size = (rois[:, 1:3] + rois[:, 3:5]) / 2, rois[:, 3:5] - rois[:, 1:3]
            turned = torch.cat([rois[:, :1], centre, size, torch.full_like(rois[:, :1], float(angle))], dim=1)
            return roi_align_rotated(features, turned, output_size, spatial_scale, self.sampling_ratio, self.aligned)
        return deform_roi_pool(features, rois, offset, output_size, spatial_scale, self.sampling_ratio, self.gamma)

    def settings(self) -> dict:
        """The op and the settings that matter to it (as the misalignment study's results.json records them)."""
        if self.op == "roi_pool":
            return {"op": self.op, "rounding": self.rounding}
        if self.op in ("roi_align", "roi_align_rotated"):
            return {"op": self.op, "aligned": self.aligned, "sampling_ratio": self.sampling_ratio}
        if self.op == "prroi_pool":
            return {"op": self.op, "aligned": self.aligned}
        if self.op == "ps_roi_pool":
            return {"op": self.op}
        if self.op == "ps_roi_align":
            return {"op": self.op, "sampling_ratio": self.sampling_ratio}
        return {"op": self.op, "sampling_ratio": self.sampling_ratio, "gamma": self.gamma}


def _rules(*rules: Rule) -> dict[str, Rule]:
    return {rule.name: rule for rule in rules}


# Plot colours are matplotlib's first six cycle colours in the table's order, the ones the misalignment plots have
# always given the default rules; the two samplers share green in OpenCV drawings (the demo shows one at a time).
RULES: dict[str, Rule] = _rules(
    Rule("roi_pool_torchvision", "roi_pool", rounding="torchvision", short="torchvision",
         title='roi_pool, rounding="torchvision" (Fast R-CNN / Caffe, torchvision.ops.roi_pool)',
         colour=(255, 160, 40), plot_colour="C0"),
    Rule("roi_pool_integer", "roi_pool", rounding="integer", short="integer",
         title='roi_pool, rounding="integer" (the double rounding as usually taught)',
         colour=(60, 60, 255), plot_colour="C1"),
    Rule("roi_align_aligned", "roi_align", aligned=True, short="roi_align", title="roi_align, aligned=True",
         colour=(80, 230, 80), plot_colour="C2"),
    Rule("roi_align_unaligned", "roi_align", aligned=False, short="roi_align_unaligned",
         title="roi_align, aligned=False", colour=(80, 230, 80), plot_colour="C3"),
    # aligned=False is the op's default, as in the original PrRoIPool code
    Rule("prroi_pool", "prroi_pool", aligned=False, short="prroi_pool", title="prroi_pool (exact integral)",
         colour=(220, 80, 220), plot_colour="C4"),
    Rule("prroi_pool_aligned", "prroi_pool", aligned=True, short="prroi_pool_aligned",
         title="prroi_pool, aligned=True (exact integral)", colour=(160, 60, 160), plot_colour="C5"),
)
# The zoo's other region ops (explain, and ps_roi_pool in the misalignment study); never a detector's pooler.
# ps_roi_pool shares torchvision roi_pool's blue in drawings; plot colours continue matplotlib's cycle.
ZOO_RULES: dict[str, Rule] = _rules(
    Rule("ps_roi_pool", "ps_roi_pool", short="ps_roi_pool",
         title="ps_roi_pool (R-FCN, torchvision.ops.ps_roi_pool: its own rounding)", colour=(255, 160, 40),
         plot_colour="C6"),
    Rule("ps_roi_align", "ps_roi_align", aligned=True, short="ps_roi_align",
         title="ps_roi_align (R-FCN, torchvision.ops.ps_roi_align: always aligned)", colour=(80, 230, 80),
         plot_colour="C7"),
    Rule("roi_align_rotated", "roi_align_rotated", aligned=True, short="roi_align_rotated",
         title="roi_align_rotated, aligned=True (detectron2's ROIAlignRotated)", colour=(80, 230, 80),
         plot_colour="C8"),
    Rule("roi_align_rotated_unaligned", "roi_align_rotated", aligned=False, short="roi_align_rotated_unaligned",
         title="roi_align_rotated, aligned=False (mmcv's legacy mode)", colour=(80, 230, 80), plot_colour="C9"),
    Rule("deform_roi_pool", "deform_roi_pool", aligned=True, short="deform_roi_pool",
         title="deform_roi_pool, gamma=0.1 (mmcv's deformable RoI pooling)", colour=(0, 200, 255),
         plot_colour="tab:olive"),
)
DEFAULT_RULES = ("roi_pool_torchvision", "roi_pool_integer", "roi_align_aligned", "roi_align_unaligned", "prroi_pool")
# The rules the misalignment study measures: the detector poolers and ps_roi_pool (the zoo's only rounding rule)
STUDY_RULES = (*RULES, "ps_roi_pool")
ALIASES: dict[str, str] = {rule.short: rule.name for rule in RULES.values() if rule.short != rule.name}


def get_rule(name: str) -> Rule:
    """The rule called ``name`` in :data:`RULES` or :data:`ZOO_RULES`, or by its short name (:data:`ALIASES`);
    ValueError otherwise."""
    name = ALIASES.get(name, name) if isinstance(name, str) else None
    rule = RULES.get(name, ZOO_RULES.get(name)) if name is not None else None
    if rule is None:
        raise ValueError(f"unknown rule {name!r}; choose from {', '.join([*RULES, *ZOO_RULES])} "
                         f"(or {', '.join(ALIASES)})")
    return rule


def make_rules(names: Sequence[str] = DEFAULT_RULES, sampling_ratio: int = 2) -> list[Rule]:
    """Rules by name from :data:`STUDY_RULES` (see :data:`RULES`, :data:`ZOO_RULES`); ``sampling_ratio`` applies to
    the ``roi_align`` ones (<= 0: adaptive)."""
    if isinstance(names, str) or not names:
        raise ValueError(f"rules must be a non-empty list of names from {', '.join(STUDY_RULES)}, got {names!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    unknown = [n for n in names if n not in STUDY_RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(map(repr, unknown))}; choose from {', '.join(STUDY_RULES)}"
                         + (" (the zoo's other ops are explained by tools/explain.py, not measured here)"
                            if any(n in ZOO_RULES for n in unknown) else ""))
    if len(set(names)) != len(names):
        raise ValueError(f"rules are listed twice: {list(names)}")
    table = {**RULES, **ZOO_RULES}
    return [replace(table[name], sampling_ratio=sampling_ratio) for name in names]
