"""Checkpoints: written atomically and never with a non-finite value, read back checked, loaded into a model.

A checkpoint is a dict: ``model`` and ``optimizer`` state dicts, ``scheduler``, ``scaler``, ``iteration``, the
``config`` the run trained with and every rank's random state (``rng``), which :func:`load_checkpoint` restores
when the world size is the one it was saved with, so that a resumed run continues with identical state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io import atomic_torch_save
from ..utils.distributed import DistInfo, all_gather_object, is_main_process, unwrap
from .config import DEFAULTS, config_difference, merge_config

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "read_checkpoint", "check_state_dict", "load_checkpoint",
           "first_non_finite", "without_unplaced"]

CHECKPOINT_NAME = "checkpoint.pth"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def first_non_finite(tensors: dict[str, Any]) -> str | None:
    """The name of the first tensor in ``tensors`` (nested dicts and lists, e.g. an optimizer's state) holding a
    NaN or an infinity, as ``"a.b"``; None when all are finite. One copy to the CPU per device, however many."""
    named: list[tuple[str, torch.Tensor]] = []

    def walk(obj: Any, name: str) -> None:
        if torch.is_tensor(obj):
            if obj.is_floating_point() or obj.is_complex():
                named.append((name, obj))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{name}.{i}" if name else str(i))

    walk(tensors, "")
    flags = [torch.isfinite(t.detach()).all() for _, t in named]
    finite = torch.ones(len(flags), dtype=torch.bool)
    for device in {f.device for f in flags}:  # one copy to the CPU per device
        index = [i for i, f in enumerate(flags) if f.device == device]
        finite[index] = torch.stack([flags[i] for i in index]).cpu()
    bad = (~finite).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, iteration: int,
                    cfg: dict) -> None:
    """Write a checkpoint atomically (a kill leaves the previous one); a collective call in several processes:
    every rank's random state is gathered, rank 0 writes. FloatingPointError, and the previous checkpoint left as
    it is, when a parameter, buffer or optimizer state holds a non-finite value."""
    rng = all_gather_object(_rng_state())
    if not is_main_process():
        return
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
    bad = first_non_finite(state)
    if bad:
        raise FloatingPointError(f"not writing checkpoint {path} of iteration {iteration}: {bad} is not finite")
    atomic_torch_save(path, {
        **state, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
        "config": cfg, "rng": rng,
    })


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict a checkpoint holds (on the CPU), checked; its ``config`` (when it has one) laid over today's
    :data:`~roikit.engine.config.DEFAULTS`, so that settings added since it was saved read as their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise ValueError(f"cannot read checkpoint {path}: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not a roikit checkpoint (no 'model' state dict)")
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = merge_config(DEFAULTS, ckpt["config"], f"the config saved in checkpoint {path}")
    else:
        ckpt.pop("config", None)
    return ckpt


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """ValueError naming the first difference when ``state`` does not fit ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or resized:
        parts = []
        if resized:
            k = resized[0]
            parts.append(f"{len(resized)} tensor(s) of another shape (e.g. {k}: checkpoint "
                         f"{list(state[k].shape)}, model {list(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ValueError(f"{where} does not match the model of the config: {'; '.join(parts)}")


def without_unplaced(model: torch.nn.Module, state: dict[str, torch.Tensor],
                     prefix: str | None) -> dict[str, torch.Tensor]:
    """``state`` less its tensors under the key ``prefix`` that ``model`` has no place for (all of it: None)."""
    if not prefix:
        return state
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own or not k.startswith(prefix)}


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    scaler: torch.amp.GradScaler | None = None, cfg: dict | None = None,
                    info: DistInfo | None = None, leave_out: str | None = None) -> int:
    """Load what ``path`` holds into the given objects; returns the iteration it was saved at.

    With ``cfg``, the checkpoint's model config must be the same (another model is an error, not a warm start).
    ``leave_out``: a key prefix under which the checkpoint's tensors that ``model`` has no place for are passed
    over (e.g. ``"roi_heads.box_roi_pool."``: the offset heads of a deform pooler, evaluated with another pooler).
    With ``info``, this rank's random state is restored when the world size is the one it was saved with.
    """
    ckpt = read_checkpoint(path)
    if cfg is not None and isinstance(ckpt.get("config"), dict):
        diff = config_difference(ckpt["config"].get("model"), cfg["model"], "model", ("checkpoint", "config"))
        if diff:
            raise ValueError(f"checkpoint {path} was trained with another model config ({diff})")
    state = without_unplaced(model, ckpt["model"], leave_out)
    check_state_dict(model, state, f"checkpoint {path}")
    bad = first_non_finite(state)
    if bad:
        raise ValueError(f"checkpoint {path} holds non-finite values in {bad}: the weights are spoilt")
    model.load_state_dict(state)
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if obj is not None:
            if key not in ckpt:
                raise ValueError(f"checkpoint {path} has no {key} state to resume from")
            obj.load_state_dict(ckpt[key])
    rng = ckpt.get("rng")
    if info is not None and isinstance(rng, list) and len(rng) == info.world_size:
        torch.set_rng_state(rng[info.rank]["cpu"])
        if "cuda" in rng[info.rank] and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng[info.rank]["cuda"])
    return int(ckpt.get("iteration", 0))
