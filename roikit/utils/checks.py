"""Argument checks shared by the whole package: each raises a ``ValueError`` that names the argument.

``check_bool`` refuses ``"False"`` (a truthy string), ``check_int`` refuses ``True`` and ``1.0``; the feature checks
let a ``torch.fx`` Proxy through (its shape is unknown while tracing and is checked when the graph runs).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["FLOAT_DTYPES", "check_bool", "check_int", "check_choice", "pair", "check_features",
           "check_float_features", "check_nonempty_map", "check_spatial_scale"]


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (not ``"False"``, not 0 or 1), else a ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(value: Any, name: str, minimum: int | None = None, *, integral: bool = False) -> int:
    """``value`` if it is an int (not a bool, not a float) at least ``minimum``, else a ValueError naming ``name``.

    With ``integral``, any :class:`numbers.Integral` but a bool (numpy's integers too, as a data set's settings may
    come from numpy) is taken and returned as an int. Off by default: the ops pass the value they check to their
    kernels as it is.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value) if integral else value


def _traced(value: Any) -> bool:
    # a torch.fx Proxy stands for a tensor whose shape is not known while tracing: checked when the graph runs
    return isinstance(value, torch.fx.Proxy)


def check_features(input: Tensor, name: str = "input", any_float: bool = False) -> None:
    """A ``Tensor[N, C, H, W]`` of the region ops' dtypes (``FLOAT_DTYPES``), or of any floating dtype with
    ``any_float``."""
    if _traced(input):
        return
    if not isinstance(input, Tensor):
        raise ValueError(f"{name} must be a Tensor[N, C, H, W], got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(input.shape)}")
    if any_float and not input.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {input.dtype}")
    if not any_float and input.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {input.dtype}")


def check_float_features(input: Tensor, name: str = "input") -> None:
    """``check_features`` for layers built on torch's own operators (the pooling family): any floating dtype.

    The region ops accept only ``FLOAT_DTYPES`` (their kernels' dtypes); layers that call ``F.max_pool2d``,
    ``F.unfold``, ``torch.bmm`` ... leave the rarer floating dtypes (float8) to torch, which names what it lacks.
    """
    check_features(input, name, any_float=True)


def check_nonempty_map(input: Tensor, name: str = "input") -> None:
    """A ``[N, C, H, W]`` map with at least one position (global, adaptive and bilinear pooling need one)."""
    if _traced(input):
        return
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(input.shape)}")


def pair(value: Any, name: str = "output_size") -> tuple[int, int]:
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


def check_spatial_scale(spatial_scale: Any) -> float:
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)):
        raise ValueError(f"spatial_scale must be a positive number (1 / stride), got {spatial_scale!r}")
    if not math.isfinite(spatial_scale) or spatial_scale <= 0:
        raise ValueError(f"spatial_scale must be positive and finite (1 / stride), got {spatial_scale}")
    return float(spatial_scale)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
