"""The demo's detector: a checkpoint loaded for its config (through ``roikit.engine.inference``), or a quick model
trained once on the synthetic shapes and cached.
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

__all__ = ["QUICK_ITERS", "quick_config", "quick_checkpoint", "load_detector"]

# The quick model: AdamW at 3e-3 for 600 iterations reaches AP50 ~0.5 on the shapes (SGD at the base config's 0.02
# gets ~0.14 in as many); about 4 minutes on one CPU thread. Enough to show the demo, not a real model.
QUICK_ITERS = 600
QUICK_SOLVER = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4}
QUICK_DATA = {"num_train": 1000, "num_val": 50, "image_size": 320, "seed": 0}  # the quick model's shapes set


def quick_config(cfg: dict, path: Path, iters: int) -> dict:
    """``cfg`` set up for the quick schedule on a small synthetic set next to the cached checkpoint."""
    n = cfg["model"]["num_classes"]
    if n not in (None, len(SHAPE_CLASSES)):
        raise ValueError(f"no --checkpoint: the quick model trains on the {len(SHAPE_CLASSES)}-class shapes set, but "
                         f"model.num_classes is {n}; give a --checkpoint trained with tools/train.py")
    paths = dict.fromkeys(("train_images", "train_annotations", "val_images", "val_annotations"))
    return merge_config(cfg, {
        "model": {"num_classes": len(SHAPE_CLASSES)},
        "data": {**paths, "shapes": {"root": str(path.parent / "shapes"), **QUICK_DATA}},
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
