"""Data sets and loaders from a config: the training and validation sets, the training batches, the evaluation
batches.

The order of the training images is a function of (seed, epoch) and the random flips of (seed, epoch, image), so a
run resumed at any iteration sees the very batches the uninterrupted run would have seen, whatever the number of
data workers. A sample that cannot be read is a one-line ValueError naming its file, also from a worker process.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..io import output_dir as make_output_dir
from ..utils.distributed import DistInfo, barrier, is_main_process
from .coco import CocoDetection, collate_fn
from .shapes import ensure_shapes_dataset
from .transforms import Compose, RandomHorizontalFlip

__all__ = ["build_datasets", "make_train_loader", "make_eval_loader"]

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]  # images [3, H, W] and their targets


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

    def __iter__(self) -> Iterator[Batch]:
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


def make_train_loader(dataset: Dataset, cfg: dict, info: DistInfo, start_iter: int) -> Iterator[Batch]:
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
    """This rank's evaluation batches: each image goes to exactly one rank (no padding, so no image is counted
    twice)."""
    return _Loader(dataset, batch_size=cfg["data"]["eval_batch_size"], num_workers=cfg["data"]["num_workers"],
                   sampler=list(range(info.rank, len(dataset), info.world_size)))
