"""The training loop: optimizer and schedule, the loop itself, resume, periodic COCO evaluation.

Training counts iterations, not epochs. The order of the training images is a function of (seed, epoch) and the
random flips of (seed, epoch, image) (:func:`roikit.data.build.make_train_loader`), so a run resumed from a
checkpoint sees the very batches the uninterrupted run would have seen, whatever the number of data workers; with
the optimizer, schedule, gradient scaler and every rank's random state restored
(:func:`roikit.engine.checkpoint.load_checkpoint`), it continues with identical state. A run resumes with its own
config, the one saved in its checkpoint; settings changed on resume are applied on top, printed, and recorded in
``config_resume_<iteration>.yaml`` beside the original ``config.yaml``, which stays as it was; a config file named
on resume is only compared with the saved config, and each key where they differ is printed.

Files of a run (in its output folder): ``checkpoint.pth`` (each save is printed), ``config.yaml``,
``metrics.jsonl`` (training windows and evaluations), and each evaluation's two files named by
:func:`roikit.engine.coco_eval.evaluation_files`: ``eval_final_results.json`` (the detections in COCO's results
format, with the annotation file's own category ids) and ``eval_final_metrics.json`` at the end,
``eval_iter<N>_results.json`` and ``eval_iter<N>_metrics.json`` for a periodic one (``train.eval_period``; each is
kept).

On faults: every parameter and buffer is checked after each optimizer step, and a checkpoint is never written with
a non-finite value, so the last one written stays good; training stops with ``FloatingPointError`` naming the first
bad tensor and that checkpoint. Temporary files that a killed run left in its folder are removed when it starts.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from ..data.build import build_datasets, make_eval_loader, make_train_loader
from ..io import append_jsonl, atomic_save_json, atomic_write_text, remove_stale_temporaries
from ..io import output_dir as make_output_dir
from ..modeling import build_detector
from ..utils.checks import check_choice, check_int
from ..utils.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_mean,
    cleanup,
    init_distributed,
    is_main_process,
    log,
    unwrap,
    wrap_ddp,
)
from .checkpoint import CHECKPOINT_NAME, first_non_finite, load_checkpoint, read_checkpoint, save_checkpoint
from .coco_eval import evaluate, evaluation_files, format_metrics, format_per_class, name_refused_image
from .config import apply_overrides, check_config, config_differences, load_config, parse_override

__all__ = ["build_optimizer", "build_lr_scheduler", "train", "resume", "METRICS_NAME", "CONFIG_NAME", "FINAL_EVAL",
           "periodic_eval_stem"]

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
RESUME_CONFIG_NAME = "config_resume_{iteration}.yaml"
FINAL_EVAL = "eval_final"  # the stem of the last evaluation's files (roikit.engine.coco_eval.evaluation_files)
# every file a run writes atomically (glob patterns), whose temporaries a killed run may have left
RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, RESUME_CONFIG_NAME.format(iteration="*"), f"{FINAL_EVAL}_*.json",
             "eval_iter*_*.json")
MAX_LISTED = 8  # config differences printed on resume, then "and N more"


def periodic_eval_stem(iteration: int) -> str:
    """The stem of a periodic evaluation's files: ``eval_iter<iteration>``."""
    return f"eval_iter{iteration}"


# ---------------------------------------------------------------------------------------------- optimizer, schedule
def build_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``solver.optimizer`` (``sgd`` or ``adamw``) over the parameters of ``model`` that train."""
    s = cfg["solver"]
    params = [p for p in model.parameters() if p.requires_grad]
    if check_choice(s["optimizer"], "solver.optimizer", ("sgd", "adamw")) == "sgd":
        return torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    return torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])


def build_lr_scheduler(cfg: dict, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``warmup_factor`` over ``warmup_iters``, then ``cosine`` (to 0 at ``max_iter``),
    ``step`` (times ``gamma`` at each of ``steps``) or ``constant``; stepped once per iteration."""
    s = cfg["solver"]
    max_iter, warmup, schedule, steps = s["max_iter"], s["warmup_iters"], s["schedule"], s["steps"]
    check_choice(schedule, "solver.schedule", ("cosine", "step", "constant"))
    for x in steps:
        check_int(x, "each element of solver.steps")
    if list(steps) != sorted(steps):
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


# -------------------------------------------------------------------------------------------------------- the loop
def _to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def train(cfg: dict, output_dir: str | Path, *, progress: bool = True) -> dict | None:
    """Train the detector ``cfg`` describes, from the start; checkpoints, ``config.yaml`` and ``metrics.jsonl``
    go to ``output_dir``.

    Runs in one process or under torchrun (DDP). Returns the final COCO metrics on rank 0, None on the others.
    Raises ValueError for a bad setting or file, or a folder that holds a run already (which :func:`resume`
    continues), FloatingPointError when the loss or the weights stop being finite.
    """
    cfg = check_config(cfg)
    held = [name for name in (CHECKPOINT_NAME, METRICS_NAME) if (Path(output_dir) / name).exists()]
    if held:
        raise ValueError(f"{output_dir} holds a run already ({held[0]}): --resume continues it; to start again, "
                         f"delete it or choose another output folder")
    info = init_distributed(cfg["train"]["device"])
    try:
        return _train(cfg, make_output_dir(output_dir, "output folder"), info, progress)
    finally:
        cleanup()


def resume(output_dir: str | Path, overrides: Iterable[str] = (), *, progress: bool = True,
           config_file: str | Path | None = None) -> dict | None:
    """Continue the run in ``output_dir`` from its checkpoint, with the config saved in that checkpoint.

    ``overrides`` (``key.sub=value``, e.g. ``solver.max_iter=3000``) change that config; each change is printed and
    the config resumed with is written to ``config_resume_<iteration>.yaml``; ``config.yaml`` stays the run's
    original. ``config_file`` (the ``--config`` given with ``--resume``), with the same overrides, is compared with
    the config resumed with: the keys where they differ are printed, the saved config is used. Returns and raises
    as :func:`train`.
    """
    ckpt_path = Path(output_dir) / CHECKPOINT_NAME
    if not ckpt_path.is_file():
        raise ValueError(f"--resume: no checkpoint in {output_dir} (expected {ckpt_path})")
    saved = read_checkpoint(ckpt_path).get("config")
    if saved is None:
        raise ValueError(f"--resume: checkpoint {ckpt_path} holds no config to resume with")
    overrides = list(overrides)
    cfg = apply_overrides(saved, overrides)
    changes = []
    for text in overrides:
        path, _ = parse_override(text)
        old, new = _lookup(saved, path), _lookup(cfg, path)
        if old != new:
            changes.append(f"{'.'.join(path)} {old!r} -> {new!r}")
    ignored = _ignored_config_keys(cfg, config_file, overrides) if config_file is not None else None
    info = init_distributed(cfg["train"]["device"])
    try:
        if ignored:
            log(ignored)
        return _train(cfg, Path(output_dir), info, progress, resumed_with=changes)
    finally:
        cleanup()


def _ignored_config_keys(cfg: dict, config_file: str | Path, overrides: list[str]) -> str | None:
    """One line naming the keys where ``config_file`` (with ``overrides``) differs from the config resumed with
    ``cfg``; None when it does not. ``model.num_classes`` left null in the file (taken from the data) is no
    difference."""
    file_cfg = load_config(config_file, overrides)
    diffs = [(key, saved, given) for key, saved, given in config_differences(cfg, file_cfg)
             if not (key == "model.num_classes" and given is None)]
    if not diffs:
        return None
    name = Path(config_file).name
    listed = "; ".join(f"{key}: saved {saved!r}, {name} {given!r}" for key, saved, given in diffs[:MAX_LISTED])
    more = f"; and {len(diffs) - MAX_LISTED} more" if len(diffs) > MAX_LISTED else ""
    return (f"--resume: the run's saved config is used; --config {config_file} differs from it in {len(diffs)} "
            f"key(s) (give key=value to change one): {listed}{more}")


def _lookup(cfg: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        cfg = cfg[key]
    return cfg


def _train(cfg, output_dir: Path, info: DistInfo, progress: bool, resumed_with: list[str] | None = None) -> dict | None:
    """The run; ``resumed_with`` (the changes made to the saved config, maybe none) when it resumes."""
    t = cfg["train"]
    resuming = resumed_with is not None
    ckpt_path, metrics_path = output_dir / CHECKPOINT_NAME, output_dir / METRICS_NAME
    if is_main_process():
        files, size = remove_stale_temporaries(output_dir, RUN_FILES)
        if files:
            log(f"removed {files} temporary file(s) ({size / 2**20:.1f} MiB) that an interrupted run left in "
                f"{output_dir}")
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
    if resuming:
        start_iter = load_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                     cfg=cfg, info=info)
        note = "with the config saved in it"
        if resumed_with:
            record = output_dir / RESUME_CONFIG_NAME.format(iteration=start_iter)
            note += f", changed: {'; '.join(resumed_with)} (recorded in {record.name})"
            if is_main_process():
                atomic_write_text(record, f"# resumed at iteration {start_iter}, changed: {'; '.join(resumed_with)}\n"
                                  + yaml.safe_dump(cfg, sort_keys=False))
        log(f"resumed from {ckpt_path} at iteration {start_iter}, {note}")
    elif is_main_process():
        atomic_write_text(output_dir / CONFIG_NAME, yaml.safe_dump(cfg, sort_keys=False))
    last_good = f"the last good checkpoint is {ckpt_path} (iteration {start_iter})" if resuming \
        else "no checkpoint written yet"
    ddp_model = wrap_ddp(model, info)

    max_iter = cfg["solver"]["max_iter"]
    clip = cfg["solver"]["clip_grad_norm"]
    log(f"training {max_iter - start_iter} iterations ({start_iter} -> {max_iter}) on {info.world_size} x "
        f"{info.device.type}, {len(train_set)} images, output in {output_dir}")

    def stop(what: str, iteration: int) -> FloatingPointError:
        return FloatingPointError(f"{what} at iteration {iteration}: training stopped, {last_good}; lower solver.lr, "
                                  f"raise solver.warmup_iters or set solver.clip_grad_norm")

    def run_eval(iteration: int, stem: str) -> dict | None:
        results_file, metrics_file = evaluation_files(output_dir, stem)
        metrics = evaluate(model, make_eval_loader(val_set, cfg, info), val_set, info.device, amp=amp,
                           results_file=results_file, progress=progress)
        if metrics is not None:
            scores = {k: v for k, v in metrics.items() if k != "summary"}
            append_jsonl(metrics_path, {"type": "eval", "iter": iteration, **scores})
            atomic_save_json(metrics_file, {"iteration": iteration, "annotations": str(val_set.ann_file),
                                            "images": len(val_set), "pooler": cfg["model"]["pooler"], **scores})
            log(f"iter {iteration}: {format_metrics(metrics)} (in {metrics_file.name}, detections in "
                f"{results_file.name})")
        return metrics

    batches = make_train_loader(train_set, cfg, info, start_iter)
    bar = tqdm(total=max_iter, initial=start_iter, disable=not (progress and is_main_process()), dynamic_ncols=True)
    ddp_model.train()
    window_start, window_iters = time.perf_counter(), 0
    for it in range(start_iter, max_iter):
        images, targets = _to_device(*next(batches), info.device)
        try:
            with torch.autocast(info.device.type, enabled=amp):
                loss_dict = ddp_model(images, targets)
        except ValueError as e:  # an image the model refuses (too thin to resize): name its file
            raise name_refused_image(e, model, images, [t["image_id"] for t in targets], train_set) from None
        loss = sum(loss_dict.values())
        reduced = {k: v.item() for k, v in all_reduce_mean(loss_dict).items()}
        total = sum(reduced.values())
        if not math.isfinite(total):
            raise stop(f"loss is {total} (" + ", ".join(f"{k} {v:.4g}" for k, v in reduced.items()) + ")", it + 1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        done = it + 1
        # parameters and buffers (BatchNorm's statistics); every rank stops, though a buffer may go bad on one only
        bad = next(filter(None, all_gather_object(first_non_finite(unwrap(model).state_dict()))), None)
        if bad:
            raise stop(f"{bad} is not finite after the step", done)
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
            last_good = f"the last good checkpoint is {ckpt_path} (iteration {done})"
            log(f"iter {done}: saved checkpoint {ckpt_path}")
        if t["eval_period"] and done % t["eval_period"] == 0 and done != max_iter:
            run_eval(done, periodic_eval_stem(done))
            window_start = time.perf_counter()
    bar.close()

    metrics = run_eval(max_iter, FINAL_EVAL)
    if metrics is not None:
        log(metrics["summary"])
        log(format_per_class(metrics))
    return metrics
