"""Multi-process training with ``torchrun``: set-up from its environment variables, and the helpers around it.

``torchrun --nproc_per_node N tools/train.py ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT``; :func:`init_distributed` reads them and starts the process group (gloo on the CPU,
nccl on GPUs). Without them everything runs in one process and the helpers below do the one-process thing.
Only rank 0 prints (:func:`log`) and shows progress bars; ``print`` itself is left alone.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import nn

from .checks import check_choice

__all__ = ["DistInfo", "init_distributed", "cleanup", "is_distributed", "get_rank", "get_world_size",
           "is_main_process", "log", "barrier", "all_gather_object", "all_reduce_mean", "wrap_ddp",
           "unwrap"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun; choose this process's device.

    Args:
        device (str): ``"auto"`` (CUDA when there is a GPU), ``"cpu"`` or ``"cuda"``.
    """
    check_choice(device, "train.device", ("auto", "cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no GPU is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world_size is None or world_size <= 1:
        return DistInfo(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = local_rank or 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def log(*args: Any, file: TextIO | None = None) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, file=file or sys.stdout, flush=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean over ranks of each (scalar) value, as torchvision's ``reduce_dict``; keys in sorted order."""
    if not is_distributed():
        return values
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    dist.all_reduce(stacked)
    stacked /= get_world_size()
    return dict(zip(names, stacked))


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when there are several processes, else ``model``."""
    if not info.distributed:
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
