"""The training loop: data, optimizer and schedule, checkpoints, resume, periodic COCO evaluation.

Training counts iterations, not epochs. The order of the training images is a function of (seed, epoch) and the
random flips of (seed, epoch, image), so a run resumed from a checkpoint sees the very batches the uninterrupted
run would have seen, whatever the number of data workers; with the optimizer, schedule, gradient scaler and every
rank's random state restored, it continues with identical state. A run resumes with its own config, the one saved
in its checkpoint; settings changed on resume are applied on top, printed, and recorded in
``config_resume_<iteration>.yaml`` beside the original ``config.yaml``, which stays as it was.

On faults: every parameter and buffer is checked after each optimizer step, and a checkpoint is never written with
a non-finite value, so the last one written stays good; training stops with ``FloatingPointError`` naming the first
bad tensor and that checkpoint. Temporary files that a killed run left in its folder are removed when it starts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..data import CocoDetection, Compose, RandomHorizontalFlip, collate_fn, ensure_shapes_dataset
from ..io import (append_jsonl, atomic_save_json, atomic_torch_save, atomic_write_text, output_dir as make_output_dir,
                  remove_stale_temporaries)
from ..modeling import build_detector
from .coco_eval import evaluate, format_metrics, format_per_class
from .config import DEFAULTS, apply_overrides, check_config, config_difference, merge_config, parse_override
from .distributed import (DistInfo, all_gather_object, all_reduce_mean, barrier, cleanup, init_distributed,
                          is_main_process, log, unwrap, wrap_ddp)

__all__ = ["build_datasets", "make_train_loader", "make_eval_loader", "build_optimizer", "build_lr_scheduler",
           "save_checkpoint", "load_checkpoint", "read_checkpoint", "check_state_dict", "first_non_finite", "train",
           "resume", "CHECKPOINT_NAME", "METRICS_NAME", "CONFIG_NAME"]

CHECKPOINT_NAME = "checkpoint.pth"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
RESUME_CONFIG_NAME = "config_resume_{iteration}.yaml"
# every file a run writes atomically (glob patterns), whose temporaries a killed run may have left
RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, RESUME_CONFIG_NAME.format(iteration="*"), "eval_final.json",
             "results_val.json")


# ------------------------------------------------------------------------------------------------------------ data
def build_datasets(cfg: dict, *, train: bool = True) -> tuple[CocoDetection | None, CocoDetection]:
    """(training set or None, validation set) from ``cfg["data"]``; the shapes set is generated on first use."""
    d = cfg["data"]
    paths = {key: d[key] for key in ("train_images", "train_annotations", "val_images", "val_annotations")}
    if any(v is None for v in paths.values()):
        s = dict(d["shapes"])
        root = make_output_dir(s.pop("root"), "data.shapes.root")
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


@dataclass(frozen=True)
class _LoadError:
    message: str


class _Loader:
    """A DataLoader (with :func:`collate_fn`) that raises a sample's ValueError as itself, one line naming the file:
    from a worker process the exception itself would come back as a traceback inside a message. So a sample's
    ValueError travels as a value, ``(_LoadError, None)``, and is raised here."""

    def __init__(self, dataset: Dataset, **kwargs) -> None:
        self.loader = DataLoader(_ErrorsAsValues(dataset), collate_fn=collate_fn, **kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for images, targets in self.loader:
            for image in images:
                if isinstance(image, _LoadError):
                    raise ValueError(image.message)
            yield images, targets


class _ErrorsAsValues(Dataset):
    """``dataset[key]``, or ``(_LoadError(message), None)`` where it raises a ValueError."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except ValueError as e:
            return _LoadError(str(e)), None


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
        yield from _Loader(seeded, batch_sampler=batches, num_workers=cfg["data"]["num_workers"],
                           generator=torch.Generator())
        epoch, skip = epoch + 1, 0


def make_eval_loader(dataset: Dataset, cfg: dict, info: DistInfo) -> _Loader:
    """Each image goes to exactly one rank (no padding, so no image is counted twice)."""
    return _Loader(dataset, batch_size=cfg["data"]["eval_batch_size"], num_workers=cfg["data"]["num_workers"],
                   sampler=list(range(info.rank, len(dataset), info.world_size)))


# ---------------------------------------------------------------------------------------------- optimizer, schedule
def build_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    s = cfg["solver"]
    params = [p for p in model.parameters() if p.requires_grad]
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


def save_checkpoint(path: str | Path, *, model, optimizer, scheduler, scaler, iteration: int, cfg: dict) -> None:
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


def load_checkpoint(path: str | Path, *, model, optimizer=None, scheduler=None, scaler=None, cfg: dict | None = None,
                    info: DistInfo | None = None) -> int:
    """Load what ``path`` holds into the given objects; returns the iteration it was saved at.

    With ``cfg``, the checkpoint's model config must be the same (another model is an error, not a warm start).
    With ``info``, this rank's random state is restored when the world size is the one it was saved with.
    """
    ckpt = read_checkpoint(path)
    if cfg is not None and isinstance(ckpt.get("config"), dict):
        diff = config_difference(ckpt["config"].get("model"), cfg["model"], "model", ("checkpoint", "config"))
        if diff:
            raise ValueError(f"checkpoint {path} was trained with another model config ({diff})")
    check_state_dict(model, ckpt["model"], f"checkpoint {path}")
    bad = first_non_finite(ckpt["model"])
    if bad:
        raise ValueError(f"checkpoint {path} holds non-finite values in {bad}: the weights are spoilt")
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


def resume(output_dir: str | Path, overrides: Iterable[str] = (), *, progress: bool = True) -> dict | None:
    """Continue the run in ``output_dir`` from its checkpoint, with the config saved in that checkpoint.

    ``overrides`` (``key.sub=value``, e.g. ``solver.max_iter=3000``) change that config; each change is printed and
    the config resumed with is written to ``config_resume_<iteration>.yaml``; ``config.yaml`` stays the run's
    original. Returns and raises as :func:`train`.
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
    info = init_distributed(cfg["train"]["device"])
    try:
        return _train(cfg, Path(output_dir), info, progress, resumed_with=changes)
    finally:
        cleanup()


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
