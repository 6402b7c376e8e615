"""One detector scored under every pooling rule: Mask R-CNN's Table 2 question (RoIPool, RoIAlign, ...) asked of a
trained model, without training again.

The box head of a trained two-stage detector takes ``C x 7 x 7`` features; any rule that gives as many bins can
pool them (:func:`~roikit.modeling.swap_roi_pooler`). :func:`evaluate_rules` runs the COCO evaluation with the
detector's own pooler (the baseline) and with each rule of :data:`roikit.analysis.rules.RULES` in one pass over
the images (the backbone and RPN once, the box head once per rule); the scores come as a table
(:func:`format_rule_table`), a chart (:func:`plot_rule_scores`) and a JSON file (:func:`save_rule_scores`)::

    model, names = load_torchvision_detector("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_coco.pth")
    dataset = CocoDetection("coco/val2017", "coco/annotations/instances_val2017.json")
    labels = label_to_category_id(names, list(dataset.coco.cats.values()), "instances_val2017.json")
    rows = evaluate_rules(model, dataset, labels, init_distributed(), "runs/r50")
    print(format_rule_table(rows))

torchvision's ``MultiScaleRoIAlign`` is ``roi_align`` with ``aligned=False``: the baseline row of a torchvision
model and the ``roi_align_unaligned`` row agree (the two poolers differ by float rounding only). A model trained
with ``deform_roi_pool`` is swept too: its baseline moves the bins by the learned offsets, each rule pools the same
``C x PH x PW`` bins unmoved (``roi_align(aligned=True)`` at the same sampling ratio is the deform pooler with
its offsets at zero). ``roi_spp``,
the position-sensitive ops and ``roi_align_rotated`` give features or take boxes no rule does: refused.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset
from torchvision.ops import MultiScaleRoIAlign
from tqdm import tqdm

from ..analysis.rules import RULES, Rule
from ..data.build import make_eval_loader
from ..io import atomic_open, atomic_save_json
from ..layers.poolers import OPS, RoIPooler
from ..modeling import swap_roi_pooler
from ..utils.checks import pair
from ..utils.distributed import DistInfo, all_gather_object, is_main_process
from .coco_eval import METRICS, coco_evaluate, detections_to_coco, evaluate, evaluation_files
from .config import DEFAULTS, merge_config, pooler_override

__all__ = ["BASELINE", "pooler_slug", "rule_spec", "pooler_settings", "pooler_record", "swapped_pooler",
           "parse_pooler_spec", "evaluate_detections", "evaluate_rules", "format_rule_table", "baseline_difference",
           "plot_rule_scores", "save_rule_scores"]

BASELINE = "baseline"  # the row of the detector's own pooler


def pooler_slug(spec: str) -> str:
    """A file-name part for a pooler spec: ``"roi_pool:rounding=integer"`` -> ``"roi_pool-rounding-integer"`` (no
    ``:``, ``=`` or ``,``; letters, digits, ``.``, ``_`` and single ``-`` only)."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", spec).strip("-")


def rule_spec(rule: Rule) -> str:
    """The ``--pooler`` spec of a rule: ``"roi_pool:rounding=integer"``,
    ``"roi_align:aligned=false,sampling_ratio=2"``."""
    settings = rule.settings()
    op = settings.pop("op")
    return op + ":" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())


def _default(op: str, key: str) -> Any:
    """The default of an op's setting, from its module's signature (one place for every default)."""
    return inspect.signature(OPS[op][0]).parameters[key].default


def pooler_settings(pooler: nn.Module) -> dict | None:
    """A box pooler's settings in the form of :meth:`Rule.settings` (so a rule that pools alike compares equal),
    or None for a pooler no rule describes (``roi_spp``, max-pooled ``roi_align``, another class)."""
    if isinstance(pooler, MultiScaleRoIAlign):  # torchvision's: roi_align, aligned=False, average
        return {"op": "roi_align", "aligned": False, "sampling_ratio": pooler.sampling_ratio}
    if not isinstance(pooler, RoIPooler) or pooler.op not in ("roi_pool", "roi_align", "prroi_pool"):
        return None
    get = lambda key: pooler.op_options.get(key, _default(pooler.op, key))  # noqa: E731
    if pooler.op == "roi_pool":
        return {"op": "roi_pool", "rounding": get("rounding")}
    if pooler.op == "roi_align":
        if get("pool") != "avg":
            return None
        return {"op": "roi_align", "aligned": get("aligned"), "sampling_ratio": pooler.sampling_ratio}
    return {"op": "prroi_pool", "aligned": get("aligned")}


def pooler_record(pooler: nn.Module) -> dict:
    """A box pooler as the config's pooler section reads it (``{"op", "output_size", "sampling_ratio",
    "options"}``, ``output_size`` an int when square), e.g. for a metrics file; torchvision's
    ``MultiScaleRoIAlign`` is ``roi_align`` with ``aligned=False``."""
    if isinstance(pooler, MultiScaleRoIAlign):
        op, options = "roi_align", {"aligned": False}
    else:
        op, options = getattr(pooler, "op", type(pooler).__name__), dict(getattr(pooler, "op_options", {}))
    size = pair(pooler.output_size)
    return {"op": op, "output_size": size[0] if size[0] == size[1] else list(size),
            "sampling_ratio": pooler.sampling_ratio, "options": options}


@contextlib.contextmanager
def swapped_pooler(model: nn.Module, op: str, sampling_ratio: int | None = None, **options) -> Iterator[nn.Module]:
    """Run the block with ``model``'s box pooler swapped for ``op`` (with the op's ``options`` and, when given,
    ``sampling_ratio``; see :func:`~roikit.modeling.swap_roi_pooler`), and put the model's own pooler back after
    it. Yields the pooler in use."""
    heads = model.roi_heads
    own = heads.box_roi_pool
    try:
        if sampling_ratio is not None and sampling_ratio != own.sampling_ratio:
            heads.box_roi_pool = copy.copy(own)  # swap_roi_pooler takes the sampling ratio of the pooler it replaces
            heads.box_roi_pool.sampling_ratio = sampling_ratio
        swap_roi_pooler(model, op, **options)
        yield heads.box_roi_pool
    finally:
        heads.box_roi_pool = own


def parse_pooler_spec(spec: str, model: nn.Module, flag: str = "--pooler") -> dict:
    """A ``--pooler`` spec (``"op[:key=value,...]"``) for ``model``'s box pooler, as the config's pooler section
    reads it (:func:`~roikit.engine.config.pooler_override`): ``{"op", "output_size", "sampling_ratio",
    "options"}``. Settings for the pooler's own op are laid over its own. ValueError for a malformed spec, and for
    an ``output_size`` the box head does not take."""
    own = model.roi_heads.box_roi_pool
    settings = pooler_settings(own) or {"op": getattr(own, "op", "roi_align")}
    size = pair(own.output_size)
    cfg = merge_config(DEFAULTS, {"model": {"pooler": {
        "op": settings["op"], "output_size": size[0], "sampling_ratio": own.sampling_ratio,
        "options": {k: v for k, v in settings.items() if k not in ("op", "sampling_ratio")}}}}, "the model's pooler")
    pooler = pooler_override(cfg, spec, flag)["model"]["pooler"]
    if pair(pooler["output_size"]) != size:
        raise ValueError(f"{flag} {spec!r}: the box head takes output_size={size[0]}x{size[1]}, got "
                         f"{pooler['output_size']}")
    return pooler


class _KnownLabels(nn.Module):
    """``model``'s detections with a label in ``labels`` (the others, e.g. COCO's "N/A" ids, are dropped)."""

    def __init__(self, model: nn.Module, labels: Iterable[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("labels", torch.tensor(sorted(labels), dtype=torch.int64), persistent=False)

    @property
    def transform(self) -> nn.Module | None:
        """The model's image transform (evaluate uses it to name an image the model refuses)."""
        return getattr(self.model, "transform", None)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        found = []
        for out in self.model(images):
            keep = torch.isin(out["labels"], self.labels.to(out["labels"].device))
            found.append({key: value[keep] for key, value in out.items()})
        return found


def evaluate_detections(model: nn.Module, dataset, label_to_cat_id: Mapping[int, int], info: DistInfo, *,
                        max_images: int | None = None, batch_size: int = 1, num_workers: int = 0,
                        results_file: str | Path | None = None, amp: bool = False,
                        progress: bool = False) -> dict[str, Any] | None:
    """COCOeval scores of ``model`` on the :class:`~roikit.data.CocoDetection` ``dataset`` (its first
    ``max_images`` images, or all), through :func:`roikit.engine.coco_eval.evaluate` (one share of the images per
    process under torchrun; rank 0 returns the scores, the others None).

    ``label_to_cat_id`` maps the model's labels to the file's category ids: ``dataset.label_to_cat_id`` for a
    roikit detector trained on that file (labels 1..N), :func:`~roikit.modeling.torchvision_models.
    label_to_category_id` for a torchvision one (labels are COCO's ids). Detections of a label outside the map are
    dropped, so the results file (written atomically when ``results_file`` is given) holds only category ids of
    the file.
    """
    images = dataset if max_images is None else Subset(dataset, range(min(max_images, len(dataset))))
    loader = make_eval_loader(images, {"data": {"eval_batch_size": batch_size, "num_workers": num_workers}}, info)
    # what evaluate reads of a data set: the COCO object, the label map, how to name an image in an error
    view = SimpleNamespace(coco=dataset.coco, label_to_cat_id=label_to_cat_id,
                           describe=getattr(dataset, "describe", None))
    return evaluate(_KnownLabels(model, label_to_cat_id).to(info.device), loader, view, info.device,
                    results_file=results_file, amp=amp, progress=progress)


# the box poolers no rule can stand in for, and why (the others pool upright boxes into C x PH x PW bins, as the
# rules do; deform_roi_pool too: its learned offsets move the bins, the rules pool them unmoved)
_NO_STAND_IN = {
    "roi_spp": "gives each box's pyramid of bins flattened level by level (C x bins), not the rules' C x PH x PW",
    "ps_roi_align": "is position-sensitive: its box head reads C / (PH * PW) channels per bin, a rule would give C",
    "ps_roi_pool": "is position-sensitive: its box head reads C / (PH * PW) channels per bin, a rule would give C",
    "roi_align_rotated": "pools rotated boxes (cx, cy, w, h, angle), the rules upright ones",
}


def _rule_poolers(model: nn.Module, rules: Sequence[Rule], prefix: str) -> list[tuple[str, str, str, nn.Module]]:
    """(row name, pooler spec, file stem, pooler) of the model's own pooler and of each rule's, built now.
    ValueError for a box pooler whose features no rule can stand in for."""
    own = model.roi_heads.box_roi_pool
    if isinstance(own, RoIPooler) and own.op in _NO_STAND_IN:
        raise ValueError(f"this model's box pooler is {own.op}, which {_NO_STAND_IN[own.op]}: no rule can stand "
                         f"in for it; evaluate it with its own pooler (leave out --pooler all)")
    poolers = [(BASELINE, " ".join(repr(own).split()), prefix, own)]
    for rule in rules:
        spec = rule_spec(rule)
        options = {k: v for k, v in rule.settings().items() if k not in ("op", "sampling_ratio")}
        with swapped_pooler(model, rule.op, rule.sampling_ratio if rule.op == "roi_align" else None,
                            **options) as pooler:
            poolers.append((rule.name, spec, f"{prefix}_{pooler_slug(spec)}", pooler))
    return poolers


def _detect_with_each(model: nn.Module, images: list[torch.Tensor], poolers: Sequence[nn.Module]) -> list[list[dict]]:
    """The detections of a torchvision ``GeneralizedRCNN`` (eval mode) for ``images``, once per box pooler: the
    transform, backbone and RPN run once, the box head once per pooler (the steps of ``GeneralizedRCNN.forward``)."""
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(batch, features)
    found = []
    for pooler in poolers:
        model.roi_heads.box_roi_pool = pooler
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
        found.append(model.transform.postprocess(detections, batch.image_sizes, sizes))
    return found


def evaluate_rules(model: nn.Module, dataset, label_to_cat_id: Mapping[int, int], info: DistInfo,
                   folder: str | Path, *, rules: Sequence[Rule] | None = None, prefix: str = "eval",
                   max_images: int | None = None, batch_size: int = 1, num_workers: int = 0, amp: bool = False,
                   progress: bool = False, about: Mapping[str, Any] | None = None) -> list[dict] | None:
    """Score the torchvision-style detector ``model`` with its own pooler (the row :data:`BASELINE`) and under each
    rule (default: all of :data:`~roikit.analysis.rules.RULES`) on ``dataset`` (as :func:`evaluate_detections`).

    One pass over the images: the backbone and the RPN run once per batch, the box head once per rule, so each
    rule sees the very proposals of the baseline, and the sweep costs little more than one evaluation. Each row
    writes ``evaluation_files(folder, stem)``: stem ``prefix`` for the baseline, ``<prefix>_<pooler_slug(
    rule_spec(rule))>`` for a rule (the names ``--pooler SPEC`` gives); its metrics file holds ``about``, the
    pooler (:func:`pooler_record`), the number of images and the scores. The model's own pooler is put back.

    Returns:
        One row per pooler, baseline first: ``{"rule", "pooler" (the spec, or the pooler's repr for the
        baseline), "stem", <each of METRICS>}`` and, for the baseline, ``"same_as"``: the rule that pools as the
        model's own pooler, or None. None on the ranks other than 0 (under torchrun each rank runs a share of the
        images; rank 0 gathers them and scores).
    """
    rules = list(RULES.values()) if rules is None else list(rules)
    own = model.roi_heads.box_roi_pool
    same_as = next((r.name for r in RULES.values() if r.settings() == pooler_settings(own)), None)
    poolers = _rule_poolers(model, rules, prefix)
    images = dataset if max_images is None else Subset(dataset, range(min(max_images, len(dataset))))
    loader = make_eval_loader(images, {"data": {"eval_batch_size": batch_size, "num_workers": num_workers}}, info)
    keep = torch.tensor(sorted(label_to_cat_id), dtype=torch.int64, device=info.device)
    image_ids: list[int] = []
    results: list[list[dict]] = [[] for _ in poolers]
    was_training = model.training
    model.eval()
    try:
        for batch, targets in tqdm(loader, desc=f"eval ({len(poolers)} poolers)", leave=False,
                                   disable=not (progress and is_main_process())):
            batch = [image.to(info.device, non_blocking=True) for image in batch]
            with torch.no_grad(), torch.autocast(info.device.type, enabled=amp and info.device.type == "cuda"):
                found = _detect_with_each(model, batch, [p for *_, p in poolers])
            image_ids.extend(int(t["image_id"]) for t in targets)
            for rows, outputs in zip(results, found):
                for target, out in zip(targets, outputs):
                    chosen = torch.isin(out["labels"], keep)
                    rows.extend(detections_to_coco({k: v[chosen] for k, v in out.items()}, target["image_id"],
                                                   label_to_cat_id))
    finally:
        model.roi_heads.box_roi_pool = own
        model.train(was_training)

    gathered = all_gather_object((image_ids, results))
    if not is_main_process():
        return None
    image_ids = [i for ids, _ in gathered for i in ids]
    rows = []
    for k, (name, spec, stem, pooler) in enumerate(poolers):
        found = [r for _, per_pooler in gathered for r in per_pooler[k]]
        results_file, metrics_file = evaluation_files(folder, stem)
        atomic_save_json(results_file, found, indent=None)
        scores = coco_evaluate(dataset.coco, found, image_ids)
        atomic_save_json(metrics_file, {**(about or {}), "pooler": pooler_record(pooler), "images": len(image_ids),
                                        **{key: v for key, v in scores.items() if key != "summary"}})
        row = {"rule": name, "pooler": spec, "stem": stem, **{m: float(scores[m]) for m in METRICS}}
        if name == BASELINE:
            row["same_as"] = same_as
        rows.append(row)
    return rows


def baseline_difference(rows: Sequence[dict]) -> tuple[str, float] | None:
    """(the rule the baseline pools as, the largest |difference| of their scores in AP points) or None when no
    rule pools as the baseline."""
    base = next((r for r in rows if r["rule"] == BASELINE), None)
    twin = next((r for r in rows if base is not None and r["rule"] == base.get("same_as")), None)
    if twin is None:
        return None
    return twin["rule"], max(abs(100 * base[m] - 100 * twin[m]) for m in METRICS)


def _pooler_name(spec: str) -> str:
    """A baseline row's pooler in a few words: its class and, for a roikit one, its op (``"RoIPooler
    deform_roi_pool"``)."""
    op = re.search(r"op='(\w+)'", spec)
    return spec.split("(")[0] + (f" {op.group(1)}" if op else "")


def _cell(value: float) -> str:
    return f"{100 * value:.1f}" if value >= 0 else "-"  # COCOeval's -1: no ground truth of that size


def format_rule_table(rows: Sequence[dict]) -> str:
    """A markdown table, one row per rule, scores in percent; under it, how far the baseline is from the rule that
    pools as it does."""
    lines = ["| rule | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for r in rows:
        name = f"{r['rule']} ({_pooler_name(r['pooler'])})" if r["rule"] == BASELINE else r["rule"]
        lines.append(f"| {name} | " + " | ".join(_cell(r[m]) for m in METRICS) + " |")
    diff = baseline_difference(rows)
    if diff is not None:
        lines.append(f"\nThe baseline pools as {diff[0]}: the two rows differ by {diff[1]:.2f} AP points at most.")
    return "\n".join(lines) + "\n"


def plot_rule_scores(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Left: grouped bars, one group per COCO score, one bar per rule (the rules' own colours, the baseline grey
    and hatched), each labelled with its value to one decimal. Right: each rule's AP minus the baseline's, in AP
    points. Written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(14, 4.4), dpi=100, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.84 / len(rows)
    top = max([100 * r[m] for r in rows for m in METRICS] + [1.0])
    colours, names = [], []
    for i, r in enumerate(rows):
        base = r["rule"] == BASELINE
        colours.append("0.7" if base else RULES[r["rule"]].plot_colour)
        names.append(f"baseline: {_pooler_name(r['pooler'])}" if base else r["rule"])
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(METRICS))]
        bars = ax.bar(xs, [max(100 * r[m], 0.0) for m in METRICS], width=width, label=names[-1], color=colours[-1],
                      hatch="//" if base else None, edgecolor="0.3", linewidth=0.4)
        ax.bar_label(bars, labels=[_cell(r[m]) for m in METRICS], fontsize=6.5, rotation=90, padding=2)
    ax.set_xticks(range(len(METRICS)), METRICS)
    ax.set_ylim(0, math.ceil(top * 1.18) + 1)
    ax.set_ylabel("COCO score (%)")
    ax.legend(fontsize=7, ncols=4, loc="upper right")
    ax.grid(axis="y", alpha=0.3)

    base_ap = next((100 * r["AP"] for r in rows if r["rule"] == BASELINE), None)
    others = [(n, c, 100 * r["AP"] - base_ap) for n, c, r in zip(names, colours, rows)
              if r["rule"] != BASELINE and base_ap is not None]
    bars = ax_d.barh(range(len(others)), [d for _, _, d in others], color=[c for _, c, _ in others])
    ax_d.bar_label(bars, labels=[f"{d:+.1f}" for _, _, d in others], fontsize=7, padding=2)
    ax_d.set_yticks(range(len(others)), [n for n, _, _ in others], fontsize=8)
    ax_d.invert_yaxis()
    ax_d.axvline(0, color="0.3", linewidth=0.8)
    span = max([abs(d) for _, _, d in others] + [0.5]) * 1.35
    ax_d.set_xlim(-span, span)
    ax_d.set_xlabel("AP minus the baseline's (points)")
    ax_d.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def save_rule_scores(path: str | Path, rows: Sequence[dict], **about: Any) -> None:
    """The scores of every rule as JSON, atomically: ``{**about, "rows": rows, "baseline_difference": ...}``."""
    diff = baseline_difference(rows)
    atomic_save_json(path, {**about, "rows": list(rows), "baseline_difference": None if diff is None else
                            {"rule": diff[0], "max_abs_ap_points": diff[1]}})
