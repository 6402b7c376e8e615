"""The demo's detector: a checkpoint loaded for its config (through ``roikit.engine.inference``), a quick model
trained once on the synthetic shapes and cached, or one of torchvision's detectors from a local weights file.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from sources import say

from roikit.data import SHAPE_CLASSES
from roikit.engine import inference
from roikit.engine.checkpoint import read_checkpoint
from roikit.engine.config import merge_config
from roikit.io import atomic_torch_save

__all__ = ["QUICK_ITERS", "quick_config", "quick_checkpoint", "load_detector", "load_torchvision", "describe",
           "knows_only_shapes"]

# The quick model: AdamW at 3e-3 for 600 iterations reaches AP50 ~0.5 on the shapes (SGD at the base config's 0.02
# gets ~0.14 in as many); about 4 minutes on one CPU thread. Enough to show the demo, not a real model. It trains on
# the config's own shapes set (data.shapes: data/shapes, 2,000 + 500 images, as tools/make_shapes.py and
# tools/train.py make it), so a set made by either is reused, and one made here serves them.
QUICK_ITERS = 600
QUICK_SOLVER = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4}


def quick_config(cfg: dict, path: Path, iters: int) -> dict:
    """``cfg`` set up for the quick schedule on the config's synthetic shapes set (``data.shapes``)."""
    n = cfg["model"]["num_classes"]
    if n not in (None, len(SHAPE_CLASSES)):
        raise ValueError(f"no --checkpoint: the quick model trains on the {len(SHAPE_CLASSES)}-class shapes set, but "
                         f"model.num_classes is {n}; give a --checkpoint trained with tools/train.py")
    paths = dict.fromkeys(("train_images", "train_annotations", "val_images", "val_annotations"))
    return merge_config(cfg, {
        "model": {"num_classes": len(SHAPE_CLASSES)},
        "data": paths,
        "solver": {**QUICK_SOLVER, "max_iter": iters, "warmup_iters": min(100, max(iters // 6, 1))},
        "train": {"checkpoint_period": 0, "eval_period": 0},
    }, "the quick model's settings")


def _saved_config(path: Path) -> dict | None:
    return read_checkpoint(path).get("config")


def quick_checkpoint(cfg: dict, path: Path, iters: int) -> Path:
    """The cached quick model for ``cfg`` at ``path``, trained first (``iters`` iterations) when it is missing or
    was made for another model, data or schedule."""
    quick = quick_config(cfg, path, iters)
    if path.is_file():
        try:
            saved = _saved_config(path)
        except ValueError:
            saved = None
        if saved is not None and all(saved.get(k) == quick[k] for k in ("model", "data", "solver")):
            say(f"no --checkpoint: using the quick model {path} ({iters} iterations on the synthetic shapes; "
                f"train a real one with tools/train.py)")
            return path
        say(f"no --checkpoint: {path} was made for another config; training it again")
    from roikit.engine.trainer import train

    run_dir = path.parent / f"{path.stem}_train"
    shutil.rmtree(run_dir, ignore_errors=True)  # the last quick training's, whose result is replaced
    say(f"no --checkpoint: training a quick model ({iters} iterations on the synthetic shapes, a few minutes on "
        f"a CPU, {torch.get_num_threads()} thread(s)) in {run_dir}; it is cached as {path} for the next runs")
    train(quick, run_dir, progress=sys.stderr.isatty())
    ckpt = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    atomic_torch_save(path, {k: ckpt[k] for k in ("model", "config", "iteration")})  # no optimizer state
    return path


def load_detector(cfg: dict, checkpoint: Path,
                  device: torch.device) -> tuple[torch.nn.Module, dict, tuple[str, ...]]:
    """(model in eval mode, the config with ``num_classes`` filled in, class names); ValueError on a checkpoint
    that is missing, unreadable or made for another model than ``cfg`` describes."""
    model, cfg, _ = inference.load_detector(cfg, checkpoint, device)
    return model, cfg, inference.class_names_of(cfg, cfg["model"]["num_classes"])


def load_torchvision(spec: str, weights: str | Path, device: torch.device, min_size: int | None,
                     max_size: int | None) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """torchvision's detector ``spec`` (``torchvision:NAME``) with the weights of the file ``weights``: (model in
    eval mode, names of its labels from 1, as the demo draws them). ``min_size``/``max_size``: its transform's
    (None: torchvision's, 800 and 1333)."""
    from roikit.modeling.torchvision_models import load_torchvision_detector, parse_model_name

    sizes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
    model, names = load_torchvision_detector(parse_model_name(spec), weights, device, **sizes)
    return model, tuple(names[1:])  # names[0] is the background


def knows_only_shapes(class_names: tuple[str, ...]) -> bool:
    return tuple(class_names) == tuple(SHAPE_CLASSES)


def describe(kind: str, source: str, class_names: tuple[str, ...], extra: str = "") -> str:
    """One paragraph on the model the demo runs: what it is and what it can recognise."""
    named = [n for n in class_names if n != "N/A"]
    listed = ", ".join(named[:8]) + (f", ... ({len(named)} in all)" if len(named) > 8 else "")
    if kind == "quick":
        return (f"model: the demo's quick model ({source}): a small CNN trained {extra} iterations on synthetic "
                f"shapes. It knows only the {len(named)} shapes {listed}, and names whatever it sees in a photo "
                f"after one of them (a coffee cup may come out as a 'cross'). For real objects: --model "
                f"torchvision:fasterrcnn_resnet50_fpn --weights FILE (torchvision's COCO detector), or "
                f"--annotations FILE to see what each pooling rule reads on a COCO file's boxes.")
    if kind == "torchvision":
        return f"model: torchvision's {source}: {len(named)} classes: {listed}."
    note = " (synthetic shapes only: it will not know the objects of a photo)" if knows_only_shapes(
        class_names) else ""
    return f"model: roikit detector from {source}{extra}: {len(named)} classes: {listed}{note}."
