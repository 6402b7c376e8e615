"""The training loop: data, optimizer and schedule, checkpoints, resume, periodic COCO evaluation.

Training counts iterations, not epochs. The order of the training images is a function of (seed, epoch) and the
random flips of (seed, epoch, image), so a run resumed from a checkpoint sees the very batches the uninterrupted
run would have seen, whatever the number of data workers; with the optimizer, schedule, gradient scaler and every
rank's random state restored, it continues with identical state.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..data import CocoDetection, Compose, RandomHorizontalFlip, collate_fn, ensure_shapes_dataset
from ..io import append_jsonl, atomic_save_json, atomic_torch_save, atomic_write_text
from ..modeling import build_detector
from .coco_eval import evaluate, format_metrics, format_per_class
from .config import DEFAULTS, merge_config
from .distributed import (DistInfo, all_gather_object, all_reduce_mean, barrier, cleanup, init_distributed,
                          is_main_process, log, unwrap, wrap_ddp)

__all__ = ["build_datasets", "make_train_loader", "make_eval_loader", "build_optimizer", "build_lr_scheduler",
           "save_checkpoint", "load_checkpoint", "check_state_dict", "train", "CHECKPOINT_NAME", "METRICS_NAME"]

CHECKPOINT_NAME = "checkpoint.pth"
METRICS_NAME = "metrics.jsonl"


# ------------------------------------------------------------------------------------------------------------ data
def build_datasets(cfg: dict, *, train: bool = True) -> tuple[CocoDetection | None, CocoDetection]:
    """(training set or None, validation set) from ``cfg["data"]``; the shapes set is generated on first use."""
    d = cfg["data"]
    paths = {key: d[key] for key in ("train_images", "train_annotations", "val_images", "val_annotations")}
    if any(v is None for v in paths.values()):
        s = dict(d["shapes"])
        root = s.pop("root")
        if is_main_process():  # one process generates, the others wait and then find it complete
            shapes = ensure_shapes_dataset(root, progress=False, **s)
        barrier()
        if not is_main_process():
            shapes = ensure_shapes_dataset(root, progress=False, **s)
        paths = {key: shapes[key] if value is None else value for key, value in paths.items()}
    train_set = None
    if train:
        flip = d["hflip"]
        train_set = CocoDetection(paths["train_images"], paths["train_annotations"],
                                  transforms=Compose([RandomHorizontalFlip(flip)]) if flip else None)
    return train_set, CocoDetection(paths["val_images"], paths["val_annotations"])


class _SeededSamples(Dataset):
    """``dataset[index]`` with the random transforms seeded by (seed, epoch, index); keys are (epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            return self.dataset[index]


def _epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int, info: DistInfo) -> list[list]:
    """This rank's batches of one epoch, as lists of (epoch, index); the last partial batch is dropped."""
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    indices = [(epoch, i) for i in sampler]
    return [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


def make_train_loader(dataset: Dataset, cfg: dict, info: DistInfo, start_iter: int) -> Iterator:
    """An endless iterator of training batches, starting at iteration ``start_iter``."""
    batch_size, seed = cfg["data"]["batch_size"], cfg["train"]["seed"]
    per_epoch = len(_epoch_batches(dataset, batch_size, seed, 0, info))
    if per_epoch == 0:
        raise ValueError(f"data.batch_size {batch_size} x {info.world_size} process(es) is more than the "
                         f"{len(dataset)} training images")
    seeded = _SeededSamples(dataset, seed)
    epoch, skip = divmod(start_iter, per_epoch)
    while True:
        batches = _epoch_batches(dataset, batch_size, seed, epoch, info)[skip:]
        # an own generator: the loader must not draw from the global random state, which resume restores
        yield from DataLoader(seeded, batch_sampler=batches, collate_fn=collate_fn,
                              num_workers=cfg["data"]["num_workers"], generator=torch.Generator())
        epoch, skip = epoch + 1, 0


def make_eval_loader(dataset: Dataset, cfg: dict, info: DistInfo) -> DataLoader:
    """Each image goes to exactly one rank (no padding, so no image is counted twice)."""
    return DataLoader(dataset, batch_size=cfg["data"]["eval_batch_size"],
                      sampler=list(range(info.rank, len(dataset), info.world_size)), collate_fn=collate_fn,
                      num_workers=cfg["data"]["num_workers"])


# ---------------------------------------------------------------------------------------------- optimizer, schedule
def build_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    s = cfg["solver"]
    params = [p for p in model.parameters() if p.requires_grad]
    if not s["lr"] > 0:
        raise ValueError(f"solver.lr must be > 0, got {s['lr']!r}")
    if s["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    if s["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    raise ValueError(f"solver.optimizer must be 'sgd' or 'adamw', got {s['optimizer']!r}")


def build_lr_scheduler(cfg: dict, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``warmup_factor`` over ``warmup_iters``, then ``cosine`` (to 0 at ``max_iter``),
    ``step`` (times ``gamma`` at each of ``steps``) or ``constant``; stepped once per iteration."""
    s = cfg["solver"]
    max_iter, warmup, schedule, steps = s["max_iter"], s["warmup_iters"], s["schedule"], s["steps"]
    if max_iter < 1 or warmup < 0:
        raise ValueError(f"solver.max_iter must be >= 1 and solver.warmup_iters >= 0, got {max_iter}, {warmup}")
    if schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"solver.schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")
    if not all(isinstance(x, int) for x in steps) or list(steps) != sorted(steps):
        raise ValueError(f"solver.steps must be increasing iteration numbers, got {steps!r}")

    def factor(it: int) -> float:
        if schedule == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * min(it, max_iter) / max_iter))
        elif schedule == "step":
            f = s["gamma"] ** sum(it >= x for x in steps)
        else:
            f = 1.0
        if it < warmup:
            f *= s["warmup_factor"] + (1.0 - s["warmup_factor"]) * it / warmup
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(path: str | Path, *, model, optimizer, scheduler, scaler, iteration: int, cfg: dict) -> None:
    """Write a checkpoint atomically (a kill leaves the previous one); a collective call in several processes:
    every rank's random state is gathered, rank 0 writes."""
    rng = all_gather_object(_rng_state())
    if not is_main_process():
        return
    atomic_torch_save(path, {
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
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


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: checkpoint {a!r}, config {b!r}"


def load_checkpoint(path: str | Path, *, model, optimizer=None, scheduler=None, scaler=None, cfg: dict | None = None,
                    info: DistInfo | None = None) -> int:
    """Load what ``path`` holds into the given objects; returns the iteration it was saved at.

    With ``cfg``, the checkpoint's model config must be the same (another model is an error, not a warm start).
    With ``info``, this rank's random state is restored when the world size is the one it was saved with.
    """
    ckpt = read_checkpoint(path)
    if cfg is not None and isinstance(ckpt.get("config"), dict):
        diff = _first_difference(ckpt["config"].get("model"), cfg["model"], "model")
        if diff:
            raise ValueError(f"checkpoint {path} was trained with another model config ({diff})")
    check_state_dict(model, ckpt["model"], f"checkpoint {path}")
    model.load_state_dict(ckpt["model"])
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


# -------------------------------------------------------------------------------------------------------- the loop
def _to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def train(cfg: dict, output_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict | None:
    """Train the detector ``cfg`` describes; checkpoints and ``metrics.jsonl`` go to ``output_dir``.

    Runs in one process or under torchrun (DDP). Returns the final COCO metrics on rank 0, None on the others.
    Raises ValueError for a bad setting or file, FloatingPointError when the loss stops being finite.
    """
    info = init_distributed(cfg["train"]["device"])
    try:
        return _train(cfg, Path(output_dir), info, resume, progress)
    finally:
        cleanup()


def _train(cfg, output_dir: Path, info: DistInfo, resume: bool, progress: bool) -> dict | None:
    t = cfg["train"]
    if t["log_period"] < 1 or t["checkpoint_period"] < 0 or t["eval_period"] < 0:
        raise ValueError("train.log_period must be >= 1, train.checkpoint_period and train.eval_period >= 0")
    ckpt_path, metrics_path = output_dir / CHECKPOINT_NAME, output_dir / METRICS_NAME
    if resume and not ckpt_path.is_file():
        raise ValueError(f"--resume: no checkpoint in {output_dir} (expected {ckpt_path})")
    train_set, val_set = build_datasets(cfg)
    if cfg["model"]["num_classes"] is None:
        cfg = {**cfg, "model": {**cfg["model"], "num_classes": train_set.num_classes}}
    if cfg["model"]["num_classes"] != train_set.num_classes:
        raise ValueError(f"model.num_classes is {cfg['model']['num_classes']} but the training set has "
                         f"{train_set.num_classes} classes")

    torch.manual_seed(t["seed"])  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_detector(cfg).to(info.device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    amp = bool(t["amp"]) and info.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    torch.manual_seed(t["seed"] + info.rank)  # each rank samples its own anchors and RoIs

    start_iter = 0
    if resume:
        start_iter = load_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                     cfg=cfg, info=info)
        log(f"resumed from {ckpt_path} at iteration {start_iter}")
    if is_main_process():
        atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    ddp_model = wrap_ddp(model, info)

    max_iter = cfg["solver"]["max_iter"]
    clip = cfg["solver"]["clip_grad_norm"]
    log(f"training {max_iter - start_iter} iterations ({start_iter} -> {max_iter}) on {info.world_size} x "
        f"{info.device.type}, {len(train_set)} images, output in {output_dir}")

    def run_eval(iteration: int) -> dict | None:
        metrics = evaluate(model, make_eval_loader(val_set, cfg, info), val_set, info.device, amp=amp,
                           results_file=output_dir / "results_val.json", progress=progress)
        if metrics is not None:
            append_jsonl(metrics_path, {"type": "eval", "iter": iteration,
                                        **{k: v for k, v in metrics.items() if k != "summary"}})
            log(f"iter {iteration}: {format_metrics(metrics)}")
        return metrics

    batches = make_train_loader(train_set, cfg, info, start_iter)
    bar = tqdm(total=max_iter, initial=start_iter, disable=not (progress and is_main_process()), dynamic_ncols=True)
    ddp_model.train()
    window_start, window_iters = time.perf_counter(), 0
    for it in range(start_iter, max_iter):
        images, targets = _to_device(*next(batches), info.device)
        with torch.autocast(info.device.type, enabled=amp):
            loss_dict = ddp_model(images, targets)
        loss = sum(loss_dict.values())
        reduced = {k: v.item() for k, v in all_reduce_mean(loss_dict).items()}
        total = sum(reduced.values())
        if not math.isfinite(total):
            raise FloatingPointError(
                f"loss is {total} at iteration {it + 1} ("
                + ", ".join(f"{k} {v:.4g}" for k, v in reduced.items())
                + "): training stopped; lower solver.lr, raise solver.warmup_iters or set solver.clip_grad_norm")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        done = it + 1
        window_iters += 1
        lr = optimizer.param_groups[0]["lr"]
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2g}", refresh=False)
        if done % t["log_period"] == 0 or done == max_iter:
            elapsed = time.perf_counter() - window_start
            if is_main_process():
                append_jsonl(metrics_path, {"type": "train", "iter": done, "lr": lr, "loss": total, **reduced,
                                            "sec_per_iter": elapsed / window_iters})
            window_start, window_iters = time.perf_counter(), 0
        if done == max_iter or (t["checkpoint_period"] and done % t["checkpoint_period"] == 0):
            save_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            iteration=done, cfg=cfg)
        if t["eval_period"] and done % t["eval_period"] == 0 and done != max_iter:
            run_eval(done)
            window_start = time.perf_counter()
    bar.close()

    metrics = run_eval(max_iter)
    if metrics is not None:
        log(metrics["summary"])
        log(format_per_class(metrics))
        atomic_save_json(output_dir / "eval_final.json", {k: v for k, v in metrics.items() if k != "summary"})
    return metrics
