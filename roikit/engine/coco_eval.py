"""COCO evaluation: detections -> COCO results JSON -> pycocotools' COCOeval -> AP table.

The numbers are COCOeval's own (``stats[0:6]``: AP, AP50, AP75, APs, APm, APl); the per-class table reads AP per
category from its ``eval["precision"]`` array (IoU 0.50:0.95, all areas, 100 detections), as detectron2 does.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..io import atomic_save_json
from ..utils.distributed import all_gather_object, is_main_process

__all__ = ["METRICS", "evaluation_files", "detections_to_coco", "coco_evaluate", "evaluate", "format_metrics",
           "format_per_class", "name_refused_image"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def evaluation_files(folder: str | Path, stem: str) -> tuple[Path, Path]:
    """The two files one evaluation writes, by every tool alike: ``<stem>_results.json`` (the detections in COCO's
    results format, with the annotation file's own category ids) and ``<stem>_metrics.json`` (the scores)."""
    folder = Path(folder)
    return folder / f"{stem}_results.json", folder / f"{stem}_metrics.json"


def name_refused_image(error: ValueError, model: torch.nn.Module, images: list[Tensor], image_ids: list[int],
                       dataset: Any) -> ValueError:
    """``error``, which ``model`` raised for a batch (e.g. an image too thin for its transform to resize), with the
    record of the first image its ``transform`` refuses alone in front (``dataset.describe(image_id)``: the
    annotation file, image id and image file); ``error`` itself when no single image is refused or the model or
    data set cannot tell. Only on the error path: it runs the transform once per image of the batch."""
    transform, describe = getattr(model, "transform", None), getattr(dataset, "describe", None)
    if transform is None or describe is None:
        return error
    for image, image_id in zip(images, image_ids):
        try:
            with torch.no_grad():
                transform([image])
        except ValueError as e:
            return ValueError(f"{describe(image_id)}: {e}")
    return error


def detections_to_coco(output: Mapping[str, Tensor], image_id: int, label_to_cat_id: Mapping[int, int]) -> list[dict]:
    """One image's detections (``boxes`` x1, y1, x2, y2, ``scores``, ``labels``) as COCO result entries."""
    boxes = output["boxes"].detach().float().cpu()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    return [
        {"image_id": int(image_id), "category_id": int(label_to_cat_id[label]),
         "bbox": [round(v, 3) for v in box], "score": round(score, 5)}
        for box, score, label in zip(xywh, scores, labels)
    ]


def coco_evaluate(coco_gt, results: list[dict], image_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """COCOeval (``iouType="bbox"``) of ``results`` against the ``pycocotools.coco.COCO`` object ``coco_gt``.

    Args:
        results (List[dict]): COCO result entries (``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
            ``score``).
        image_ids (Iterable[int], optional): the images evaluated (default: all of ``coco_gt``'s).

    Returns:
        dict: ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (floats in [0, 1]; -1 where COCOeval has no
        ground truth), ``per_class`` ({class name: {"AP", "AP50"}}), ``summary`` (COCOeval's printout) and
        ``num_detections``.
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(coco_gt.getImgIds() if image_ids is None else set(image_ids))
    cats = sorted(coco_gt.cats.values(), key=lambda c: c["id"])
    if not results:
        metrics = {name: 0.0 for name in METRICS}
        metrics.update(per_class={c["name"]: {"AP": 0.0, "AP50": 0.0} for c in cats}, num_detections=0,
                       summary="no detections: every AP is 0")
        return metrics
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):  # loadRes, evaluate and accumulate print progress lines
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator.summarize()
    metrics: dict[str, Any] = {name: float(v) for name, v in zip(METRICS, evaluator.stats[: len(METRICS)])}

    precision = evaluator.eval["precision"]  # [T IoUs, R recalls, K classes, A areas, M max-dets]
    per_class = {}
    for k, cat in enumerate(cats):
        p = precision[:, :, k, 0, -1]
        p_all, p_50 = p[p > -1], p[0][p[0] > -1]
        per_class[cat["name"]] = {"AP": float(p_all.mean()) if p_all.size else float("nan"),
                                  "AP50": float(p_50.mean()) if p_50.size else float("nan")}
    metrics.update(per_class=per_class, summary=buffer.getvalue().rstrip(), num_detections=len(results))
    return metrics


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, dataset, device: torch.device, *, results_file: str | Path | None = None,
             amp: bool = False, progress: bool = False) -> dict[str, Any] | None:
    """Run ``model`` (eval mode) over ``loader`` and score it with COCOeval.

    In several processes each rank runs its own share of the images (``loader`` gives each image to one rank);
    rank 0 gathers the detections, writes ``results_file`` (atomically) and returns the metrics, the other ranks
    return None. ``dataset`` is the :class:`~roikit.data.CocoDetection` (its ``coco`` and ``label_to_cat_id``).
    """
    was_training = model.training
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    for images, targets in tqdm(loader, desc="eval", disable=not (progress and is_main_process()), leave=False):
        images = [image.to(device, non_blocking=True) for image in images]
        try:
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                outputs = model(images)
        except ValueError as e:  # name the image a model refuses
            raise name_refused_image(e, model, images, [int(t["image_id"]) for t in targets], dataset) from None
        for target, output in zip(targets, outputs):
            image_ids.append(int(target["image_id"]))
            results.extend(detections_to_coco(output, target["image_id"], dataset.label_to_cat_id))
    model.train(was_training)

    gathered = all_gather_object((image_ids, results))
    if not is_main_process():
        return None
    image_ids = [i for ids, _ in gathered for i in ids]
    results = [r for _, rs in gathered for r in rs]
    if results_file is not None:
        atomic_save_json(results_file, results, indent=None)
    return coco_evaluate(dataset.coco, results, image_ids)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``AP 61.2  AP50 93.0 ...`` in percent; ``-`` where COCOeval found no ground truth (its -1)."""
    return "  ".join(f"{name} {100 * metrics[name]:.1f}" if metrics[name] >= 0 else f"{name} -" for name in METRICS)


def format_per_class(metrics: Mapping[str, Any]) -> str:
    """A per-class table: class, AP, AP50 (percent)."""
    rows = metrics["per_class"]
    width = max([len("class")] + [len(name) for name in rows])
    lines = [f"{'class':<{width}}  {'AP':>5}  {'AP50':>5}", f"{'-' * width}  {'-' * 5}  {'-' * 5}"]
    for name, m in rows.items():
        cells = ["  -  " if math.isnan(m[k]) else f"{100 * m[k]:5.1f}" for k in ("AP", "AP50")]
        lines.append(f"{name:<{width}}  {cells[0]}  {cells[1]}")
    return "\n".join(lines)
