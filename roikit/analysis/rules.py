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
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor

from roikit.ops import prroi_pool, roi_align, roi_pool

__all__ = ["Rule", "RULES", "DEFAULT_RULES", "ALIASES", "get_rule", "make_rules"]

Colour = tuple[int, int, int]  # B, G, R (OpenCV)


@dataclass(frozen=True)
class Rule:
    """A named pooling rule: an op and its settings, and how the tools show it.

    ``op`` is ``"roi_pool"`` (with ``rounding``), ``"roi_align"`` (``aligned``, ``sampling_ratio``, average
    pooling) or ``"prroi_pool"`` (``aligned``). ``short`` is the name ``explain`` and the demo's pooling view
    print (``"integer"`` for ``roi_pool_integer``); ``title`` the line ``explain`` heads the rule with;
    ``colour`` its BGR colour in OpenCV drawings and ``plot_colour`` its matplotlib colour.
    """

    name: str
    op: str
    rounding: str = "torchvision"
    aligned: bool = False
    sampling_ratio: int = 2
    short: str = ""
    title: str = ""
    colour: Colour = (200, 200, 200)
    plot_colour: str | None = None

    @property
    def quantized(self) -> bool:
        """Whether the rule reads whole cells (``roi_pool``) rather than bilinear samples."""
        return self.op == "roi_pool"

    def pool(self, features: Tensor, rois: Tensor, output_size: int | tuple[int, int],
             spatial_scale: float) -> Tensor:
        """The op itself: ``Tensor[K, C, PH, PW]`` (``roi_align`` averages its samples)."""
        if self.op == "roi_pool":
            return roi_pool(features, rois, output_size, spatial_scale, rounding=self.rounding)
        if self.op == "roi_align":
            return roi_align(features, rois, output_size, spatial_scale, self.sampling_ratio, self.aligned, "avg")
        return prroi_pool(features, rois, output_size, spatial_scale, self.aligned)

    def settings(self) -> dict:
        """The op and the settings that matter to it (as the misalignment study's results.json records them)."""
        if self.op == "roi_pool":
            return {"op": self.op, "rounding": self.rounding}
        if self.op == "roi_align":
            return {"op": self.op, "aligned": self.aligned, "sampling_ratio": self.sampling_ratio}
        return {"op": self.op, "aligned": self.aligned}


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
DEFAULT_RULES = ("roi_pool_torchvision", "roi_pool_integer", "roi_align_aligned", "roi_align_unaligned", "prroi_pool")
ALIASES: dict[str, str] = {rule.short: rule.name for rule in RULES.values() if rule.short != rule.name}


def get_rule(name: str) -> Rule:
    """The rule called ``name`` in :data:`RULES` or by its short name (:data:`ALIASES`); ValueError otherwise."""
    rule = RULES.get(ALIASES.get(name, name)) if isinstance(name, str) else None
    if rule is None:
        raise ValueError(f"unknown rule {name!r}; choose from {', '.join(RULES)} (or {', '.join(ALIASES)})")
    return rule


def make_rules(names: Sequence[str] = DEFAULT_RULES, sampling_ratio: int = 2) -> list[Rule]:
    """Rules by name (see :data:`RULES`); ``sampling_ratio`` applies to the ``roi_align`` ones (<= 0: adaptive)."""
    if isinstance(names, str) or not names:
        raise ValueError(f"rules must be a non-empty list of names from {', '.join(RULES)}, got {names!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(map(repr, unknown))}; choose from {', '.join(RULES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"rules are listed twice: {list(names)}")
    return [replace(RULES[name], sampling_ratio=sampling_ratio) for name in names]
