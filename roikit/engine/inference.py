"""A trained detector from its checkpoint, and its detections on one image.

    cfg = load_config("configs/base_shapes.yaml")
    model, cfg, iteration = load_detector(cfg, "runs/base_shapes/checkpoint.pth")
    found = detect(model, cv2.imread("photo.jpg"), score_threshold=0.5)  # boxes, labels, scores; best first
    names = class_names_of(cfg, cfg["model"]["num_classes"])             # found["labels"] - 1 indexes them

Images are OpenCV's: BGR ``uint8`` arrays ``[H, W, 3]``; the model gets them as the training set feeds them (RGB
float in [0, 1]).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from ..data.shapes import SHAPE_CLASSES
from ..modeling import build_detector
from .checkpoint import check_state_dict, load_checkpoint, read_checkpoint, without_unplaced
from .config import apply_overrides
from .trainer import CONFIG_NAME

__all__ = ["checkpoint_config", "load_detector", "class_names_of", "to_tensor", "detect"]

_BOX_POOLER = "roi_heads.box_roi_pool."  # the state_dict keys of a detector's box pooler


def checkpoint_config(checkpoint: str | Path, overrides: Iterable[str] = ()) -> dict:
    """The config a checkpoint was trained with (as :func:`~roikit.engine.checkpoint.read_checkpoint` gives it,
    over today's defaults), with ``key.sub=value`` overrides; ValueError when the checkpoint has none."""
    cfg = read_checkpoint(checkpoint).get("config")
    if cfg is None:
        raise ValueError(f"checkpoint {checkpoint} holds no config: give the run's config file (--config)")
    return apply_overrides(cfg, overrides)


def load_detector(cfg: dict, checkpoint: str | Path, device: torch.device | str = "cpu", *,
                  same_model_config: bool = True,
                  config_file: str | Path | None = None) -> tuple[GeneralizedRCNN, dict, int]:
    """The detector ``cfg`` describes with the weights of ``checkpoint``: (model in eval mode on ``device``, the
    config with ``model.num_classes`` filled in, the iteration the checkpoint was saved at).

    ``model.num_classes`` left None in ``cfg`` is read from the config saved in the checkpoint. With
    ``same_model_config`` the checkpoint's model config must be the one of ``cfg``; without it (the same weights
    with another pooler, as ``tools/eval.py --pooler``) only its tensors must fit the model, less those of its box
    pooler that the model's pooler has no place for (a deform pooler's offset heads). ValueError for a
    checkpoint that is missing, unreadable, spoilt or made for another model, and for a config no model can be
    built from; ``config_file`` (the file ``cfg`` came from) is named in the error when the checkpoint does not fit
    its model, with the run's own ``config.yaml`` beside the checkpoint.
    """
    need_num_classes = cfg["model"]["num_classes"] is None
    saved = read_checkpoint(checkpoint) if need_num_classes or config_file is not None else {}
    if need_num_classes:  # from the checkpoint's config
        n = (saved.get("config") or {}).get("model", {}).get("num_classes")
        if not isinstance(n, int):
            raise ValueError(f"checkpoint {checkpoint} has no config; set model.num_classes=N")
        cfg = apply_overrides(cfg, [f"model.num_classes={n}"])
    model = build_detector(cfg)
    leave_out = None if same_model_config else _BOX_POOLER
    if config_file is not None:  # a config given by hand: when it does not fit, point at the run's own
        try:
            check_state_dict(model, without_unplaced(model, saved["model"], leave_out), f"checkpoint {checkpoint}")
        except ValueError as e:
            run_config = Path(checkpoint).parent / CONFIG_NAME
            hint = (f"the run's own config is {run_config}" if run_config.is_file() else
                    "leave out the config to use the one saved in the checkpoint")
            raise ValueError(f"{e} (the config is {config_file}; {hint})") from None
    del saved
    iteration = load_checkpoint(checkpoint, model=model, cfg=cfg if same_model_config else None,
                                leave_out=leave_out)
    return model.to(device).eval(), cfg, iteration


def class_names_of(cfg: dict, num_classes: int) -> tuple[str, ...]:
    """Names for labels 1..num_classes: the categories of the config's annotation files, the shapes' names when
    it trains on the synthetic set, else numbers."""
    d = cfg["data"]
    for key in ("val_annotations", "train_annotations"):
        if d[key] and Path(d[key]).is_file():
            try:
                cats = json.loads(Path(d[key]).read_text())["categories"]
                names = tuple(str(c["name"]) for c in sorted(cats, key=lambda c: c["id"]))  # CocoDetection's order
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if len(names) == num_classes:
                return names
    if d["train_annotations"] is None and num_classes == len(SHAPE_CLASSES):
        return SHAPE_CLASSES
    return tuple(f"class {i}" for i in range(1, num_classes + 1))


def to_tensor(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """BGR uint8 [H, W, 3] -> RGB float [3, H, W] in [0, 1], as the training set feeds it."""
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div_(255.0)


@torch.inference_mode()
def detect(model: GeneralizedRCNN, image: np.ndarray, score_threshold: float) -> dict[str, np.ndarray]:
    """Detections of one BGR image with a score >= ``score_threshold``, best first: boxes [K, 4] (x1, y1, x2, y2
    pixels), labels [K] (from 1), scores [K]."""
    device = next(model.parameters()).device
    out = model([to_tensor(image, device)])[0]
    keep = out["scores"] >= score_threshold
    order = torch.argsort(out["scores"][keep], descending=True, stable=True)
    return {k: out[k][keep][order].cpu().numpy() for k in ("boxes", "labels", "scores")}
