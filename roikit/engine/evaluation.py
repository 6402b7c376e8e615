"""What ``tools/eval.py`` evaluates, and how: a detector with its data (a roikit run's checkpoint, or a torchvision
detector from a weights file), scored by COCOeval under its own pooler, another one, or every rule.

    target = torchvision_target("torchvision:fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_coco.pth",
                                "coco/annotations/instances_val2017.json", "coco/val2017")
    rows = evaluate_target(target, "runs/r50", pooler="all")   # also writes the table's JSON and chart

The results files carry the annotation file's own category ids: a roikit run's labels 1..N are the file's sorted
category ids renumbered (``CocoDetection.label_to_cat_id``), a torchvision detector's labels are COCO's ids
themselves (:func:`~roikit.modeling.torchvision_models.label_to_category_id`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data.build import build_datasets
from ..data.coco import CocoDetection
from ..io import atomic_save_json, file_in
from ..modeling.torchvision_models import label_to_category_id, load_torchvision_detector, parse_model_name
from ..utils.distributed import DistInfo, init_distributed, log
from .coco_eval import evaluation_files, format_metrics, format_per_class
from .config import apply_overrides, load_config, pooler_override
from .inference import checkpoint_config, load_detector
from .rule_sweep import (
    evaluate_detections,
    evaluate_rules,
    format_rule_table,
    parse_pooler_spec,
    plot_rule_scores,
    pooler_record,
    pooler_slug,
    save_rule_scores,
    swapped_pooler,
)

__all__ = ["EvalTarget", "torchvision_target", "run_target", "evaluate_target"]

ALL_RULES = "all"


@dataclass
class EvalTarget:
    """A detector and the COCO-format set it is scored on.

    ``label_to_cat_id`` maps the model's labels to the file's category ids; ``about`` goes into every metrics
    file (what was evaluated); ``pooler_spec`` is the --pooler spec a roikit run's model was built with (it names
    the output files); ``default_folder`` is where the outputs go unless told; ``description`` names the model in
    the log and the chart.
    """

    model: nn.Module
    dataset: CocoDetection
    label_to_cat_id: Mapping[int, int]
    info: DistInfo
    about: dict[str, Any]
    default_folder: Path
    batch_size: int
    amp: bool = False
    num_workers: int = 0
    pooler_spec: str | None = None
    description: str = ""


def _sizes(min_size: int | None, max_size: int | None) -> dict[str, int]:
    return {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}


def torchvision_target(model: str, weights: str | Path, annotations: str | Path, images: str | Path, *,
                       device: str = "auto", min_size: int | None = None, max_size: int | None = None) -> EvalTarget:
    """torchvision's detector ``model`` (``"torchvision:NAME"``) with the weights file ``weights``, on the COCO
    annotation file ``annotations`` and its ``images`` folder; ``min_size`` / ``max_size`` set torchvision's
    resize (default 800 / 1333). ValueError for an unknown model, a bad weights file (another architecture), an
    annotation file whose category ids are not the model's labels."""
    name = parse_model_name(model)
    info = init_distributed(device)
    dataset = CocoDetection(images, annotations)
    detector, names = load_torchvision_detector(name, weights, info.device, **_sizes(min_size, max_size))
    labels = label_to_category_id(names, list(dataset.coco.cats.values()), str(dataset.ann_file))
    return EvalTarget(detector, dataset, labels, info, about={"model": model, "weights": str(weights)},
                      default_folder=Path("runs") / f"torchvision_{name}", batch_size=1,  # as torchvision scores them
                      description=f"{model} with {Path(weights).name}")


def run_target(checkpoint: str | Path, *, config: str | Path | None = None, overrides: Iterable[str] = (),
               pooler: str | None = None, annotations: str | Path | None = None, images: str | Path | None = None,
               device: str | None = None, min_size: int | None = None, max_size: int | None = None) -> EvalTarget:
    """A roikit run's detector: ``checkpoint`` with the config saved in it (or ``config``, a YAML file) and the
    ``overrides``; ``pooler`` (a spec, not "all") builds it with another pooler. It is scored on ``annotations`` /
    ``images`` when given, else on the config's validation set; ``device`` (default: the config's train.device).
    """
    checkpoint = Path(checkpoint)
    overrides = [*overrides, *(f"model.transform.{k}={v}" for k, v in _sizes(min_size, max_size).items())]
    cfg = load_config(config, overrides) if config else checkpoint_config(checkpoint, overrides)
    if pooler:
        cfg = pooler_override(cfg, pooler)
    info = init_distributed(device or cfg["train"]["device"])
    if annotations is not None:
        dataset = CocoDetection(images, annotations)
    else:
        dataset = build_datasets(cfg, train=False)[1]
    if cfg["model"]["num_classes"] is None:
        cfg = apply_overrides(cfg, [f"model.num_classes={dataset.num_classes}"])
    elif cfg["model"]["num_classes"] != dataset.num_classes:
        raise ValueError(f"{dataset.ann_file} has {dataset.num_classes} categories, but the model has "
                         f"{cfg['model']['num_classes']} classes: evaluate on the set the run was trained for")
    # the model config may differ from the checkpoint's in its pooler (--pooler): only the tensors must fit
    model, cfg, iteration = load_detector(cfg, checkpoint, info.device, same_model_config=False, config_file=config)
    return EvalTarget(model, dataset, dataset.label_to_cat_id, info,
                      about={"checkpoint": str(checkpoint), "iteration": iteration}, default_folder=checkpoint.parent,
                      batch_size=cfg["data"]["eval_batch_size"], amp=cfg["train"]["amp"],
                      num_workers=cfg["data"]["num_workers"], pooler_spec=pooler,
                      description=f"{checkpoint} (iteration {iteration})")


def evaluate_target(target: EvalTarget, folder: str | Path, *, pooler: str | None = None, name: str | None = None,
                    max_images: int | None = None, batch_size: int | None = None,
                    progress: bool = True) -> list[dict] | dict | None:
    """Score ``target`` and write the files into ``folder`` (see :func:`~roikit.engine.coco_eval.evaluation_files`).

    ``pooler``: None (the model's own, or a run's --pooler), a spec (swapped in) or ``"all"`` (the model's own
    and every rule: also ``<name>_all_rules.json`` and ``.png``, and the table printed). ``name``: the file stem
    (default ``eval``, ``eval_<pooler slug>``; with "all", the stem every rule's slug is added to). Returns the
    scores (the rows with "all") on rank 0, None on the others.
    """
    n = len(target.dataset) if max_images is None else min(max_images, len(target.dataset))
    sweep = pooler == ALL_RULES
    swap = None if sweep else pooler
    spec = swap or target.pooler_spec
    prefix = name or "eval"  # with "all": the stem of the baseline, each rule's slug added to it
    stem = prefix if sweep or name else "eval" + (f"_{pooler_slug(spec)}" if spec else "")
    file_in(folder, stem, "--name")

    if sweep:
        log(f"evaluating {target.description} on {n} images with its own pooler and every rule "
            f"(one pass: the box head once per rule)")
        rows = evaluate_rules(target.model, target.dataset, target.label_to_cat_id, target.info, folder,
                              prefix=prefix, max_images=max_images, batch_size=batch_size or target.batch_size,
                              num_workers=target.num_workers, amp=target.amp, progress=progress, about=target.about)
        if rows is not None:
            summary, chart = (Path(folder) / f"{prefix}_all_rules.{ext}" for ext in ("json", "png"))
            print(format_rule_table(rows), end="")
            save_rule_scores(summary, rows, **target.about, annotations=str(target.dataset.ann_file), images=n)
            plot_rule_scores(rows, chart, f"{target.description}: {n} images of {target.dataset.ann_file.name}")
            log(f"scores: {summary}\nchart: {chart}")
        return rows

    with contextlib.ExitStack() as stack:
        if swap:
            settings = parse_pooler_spec(swap, target.model)
            stack.enter_context(swapped_pooler(target.model, settings["op"], settings["sampling_ratio"],
                                               **settings["options"]))
        box_pooler = target.model.roi_heads.box_roi_pool
        results_file, metrics_file = evaluation_files(folder, stem)
        log(f"evaluating {target.description} on {n} images with {' '.join(repr(box_pooler).split())}")
        metrics = evaluate_detections(target.model, target.dataset, target.label_to_cat_id, target.info,
                                      max_images=max_images, batch_size=batch_size or target.batch_size,
                                      num_workers=target.num_workers, results_file=results_file, amp=target.amp,
                                      progress=progress)
    if metrics is not None:
        atomic_save_json(metrics_file, {**target.about, "pooler": pooler_record(box_pooler), "images": n,
                                        **{k: v for k, v in metrics.items() if k != "summary"}})
        log(metrics["summary"])
        log(format_per_class(metrics))
        log(format_metrics(metrics))
        log(f"results: {results_file}")
    return metrics
