"""Input checks and normalisation shared by every region op.

Every public op runs the same steps in the same order: check the features, turn the boxes into one
``Tensor[K, 5]`` (batch index, x1, y1, x2, y2), check the settings, then call the registered op.
Checks raise ``ValueError`` naming the argument and what was expected.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence, TypeVar, Union

import torch
import torch.fx
from torch import Tensor
from torch.fx.node import map_aggregate

BoxesType = Union[Tensor, Sequence[Tensor]]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_compiling() -> bool:
    # Value checks read tensor data (a device sync and a graph break): they run in eager mode only.
    return torch.compiler.is_compiling()


F = TypeVar("F", bound=Callable[..., Any])


def fx_leaf(fn: F) -> F:
    """Make ``fn`` a leaf of ``torch.fx`` tracing wherever it is called from.

    ``torch.fx.wrap`` patches a function's name in its own module only; an op called from a user's module (or
    with a list of boxes) would be traced into, and its checks cannot read a Proxy. Called with a Proxy anywhere in
    its arguments, the decorated function records itself as one ``call_function`` node instead of running, as
    torchvision's wrapped ops do; called with tensors, it runs. torch.compile sees through it.
    """
    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        proxies: list[torch.fx.Proxy] = []
        map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, torch.fx.Proxy) else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)

    return leaf  # type: ignore[return-value]


def autocast_to_float32(input: Tensor, boxes: BoxesType) -> tuple[Tensor, BoxesType, torch.dtype | None]:
    """Under autocast, features and boxes in float32 (as torchvision's ops run), and the dtype to give the result
    back in (the features' own); outside autocast, the inputs as they are and None."""
    if not isinstance(input, Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, boxes, None
    dtype = input.dtype
    if isinstance(boxes, Tensor):
        boxes = boxes.float()
    elif isinstance(boxes, (list, tuple)):
        boxes = [b.float() if isinstance(b, Tensor) else b for b in boxes]
    return input.float(), boxes, dtype


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (not ``"False"``, not 0 or 1), else a ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool, not a float) at least ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _traced(value: Any) -> bool:
    # a torch.fx Proxy stands for a tensor whose shape is not known while tracing: checked when the graph runs
    return isinstance(value, torch.fx.Proxy)


def check_features(input: Tensor, name: str = "input") -> None:
    if _traced(input):
        return
    if not isinstance(input, Tensor):
        raise ValueError(f"{name} must be a Tensor[N, C, H, W], got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(input.shape)}")
    if input.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {input.dtype}")


def check_float_features(input: Tensor, name: str = "input") -> None:
    """``check_features`` for layers built on torch's own operators (the pooling family): any floating dtype.

    The region ops accept only ``FLOAT_DTYPES`` (their kernels' dtypes); layers that call ``F.max_pool2d``,
    ``F.unfold``, ``torch.bmm`` ... leave the rarer floating dtypes (float8) to torch, which names what it lacks.
    """
    if _traced(input):
        return
    if not isinstance(input, Tensor):
        raise ValueError(f"{name} must be a Tensor[N, C, H, W], got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {input.dtype}")


def check_nonempty_map(input: Tensor, name: str = "input") -> None:
    """A ``[N, C, H, W]`` map with at least one position (global, adaptive and bilinear pooling need one)."""
    if _traced(input):
        return
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(input.shape)}")


def pair(value, name: str = "output_size") -> tuple[int, int]:
    """An int or a pair of positive ints -> (h, w)."""
    if isinstance(value, (int,)) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    if value[0] <= 0 or value[1] <= 0:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return int(value[0]), int(value[1])


def check_spatial_scale(spatial_scale) -> float:
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)):
        raise ValueError(f"spatial_scale must be a positive number (1 / stride), got {spatial_scale!r}")
    if not math.isfinite(spatial_scale) or spatial_scale <= 0:
        raise ValueError(f"spatial_scale must be positive and finite (1 / stride), got {spatial_scale}")
    return float(spatial_scale)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def convert_boxes_to_rois(boxes: BoxesType, input: Tensor) -> Tensor:
    """Boxes as ``Tensor[K, 5]`` or a list of ``Tensor[L_i, 4]`` (one per image) -> checked ``Tensor[K, 5]``.

    The boxes must have the features' dtype and device. The batch index must be an integer value in
    ``[0, N)`` and every coordinate finite (these two value checks run in eager mode only).
    """
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != input.shape[0]:
            raise ValueError(
                f"boxes is a list of {len(boxes)} tensors but input has a batch of {input.shape[0]} images; "
                "give one Tensor[L, 4] per image"
            )
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {shape}")
            _check_same(b, input, f"boxes[{i}]")
        if len(boxes) == 0:
            rois = input.new_zeros((0, 5))
        else:
            cat = torch.cat(list(boxes), dim=0)
            idx = torch.cat(
                [torch.full((len(b), 1), i, dtype=cat.dtype, device=cat.device) for i, b in enumerate(boxes)], dim=0
            )
            rois = torch.cat([idx, cat], dim=1)
    elif isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of Tensor[L, 4], "
                f"got shape {tuple(boxes.shape)}"
            )
        _check_same(boxes, input, "boxes")
        rois = boxes
    else:
        raise ValueError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if not _is_compiling() and rois.numel() > 0:
        check_roi_values(rois, input.shape[0])
    return rois.contiguous()


def check_roi_values(rois: Tensor, batch_size: int) -> None:
    if not bool(torch.isfinite(rois).all()):
        bad = (~torch.isfinite(rois)).any(dim=1).nonzero()[0].item()
        raise ValueError(f"boxes must be finite; row {bad} is {rois[bad].tolist()}")
    index = rois[:, 0]
    if not bool((index == index.round()).all()):
        bad = (index != index.round()).nonzero()[0].item()
        raise ValueError(f"boxes[:, 0] is the batch index and must hold integer values; row {bad} has {index[bad].item()}")
    if bool((index < 0).any()) or bool((index >= batch_size).any()):
        bad = ((index < 0) | (index >= batch_size)).nonzero()[0].item()
        raise ValueError(
            f"boxes[:, 0] is the batch index and must lie in [0, {batch_size}); row {bad} has {int(index[bad].item())}"
        )


def _check_same(boxes: Tensor, input: Tensor, name: str) -> None:
    if boxes.device != input.device:
        raise ValueError(f"{name} is on {boxes.device} but input is on {input.device}; put both on one device")
    if boxes.dtype != input.dtype:
        raise ValueError(f"{name} has dtype {boxes.dtype} but input has {input.dtype}; they must match")
