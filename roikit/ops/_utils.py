"""Input checks and normalisation shared by every region op.

Every public op runs the same steps in the same order: check the features, turn the boxes into one
``Tensor[K, 5]`` (batch index, x1, y1, x2, y2), check the settings, then call the registered op.
Checks raise ``ValueError`` naming the argument and what was expected.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..utils.checks import (  # noqa: F401
    FLOAT_DTYPES,
    check_bool,
    check_choice,
    check_features,
    check_float_features,
    check_int,
    check_nonempty_map,
    check_spatial_scale,
    pair,
)
from ..utils.fx import fx_leaf  # noqa: F401

BoxesType = Tensor | Sequence[Tensor]


def _is_compiling() -> bool:
    # Value checks read tensor data (a device sync and a graph break): they run in eager mode only.
    return torch.compiler.is_compiling()


def autocast_to_float32(input: Tensor, boxes: BoxesType) -> tuple[Tensor, BoxesType, torch.dtype | None]:
    """Under autocast, features and boxes in float32 (as torchvision's ops run), and the dtype to give the result
    back in (the features' own); outside autocast, the inputs as they are and None."""
    if not isinstance(input, Tensor) or not torch.is_autocast_enabled("cpu" if input.is_cpu else input.device.type):
        return input, boxes, None
    dtype = input.dtype
    if isinstance(boxes, Tensor):
        boxes = boxes.float()
    elif isinstance(boxes, (list, tuple)):
        boxes = [b.float() if isinstance(b, Tensor) else b for b in boxes]
    return input.float(), boxes, dtype


def convert_boxes_to_rois(boxes: BoxesType, input: Tensor, check_values: bool = True) -> Tensor:
    """Boxes as ``Tensor[K, 5]`` or a list of ``Tensor[L_i, 4]`` (one per image) -> checked ``Tensor[K, 5]``.

    The boxes must be on the features' device, in any floating dtype (coordinates are computed in float64 for
    float64 boxes, in float32 otherwise: float32 boxes keep pixel coordinates exact beside bfloat16 features).
    With ``check_values`` the batch index must be an integer value in ``[0, N)`` and every coordinate finite (these
    two value checks run in eager mode only). The region ops' wrappers pass ``False``: the registered op they call
    checks the values itself (``roikit.ops._library._common.check_op_args``), also in compiled graphs.
    """
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != input.shape[0]:
            raise ValueError(
                f"boxes is a list of {len(boxes)} tensors but input has a batch of {input.shape[0]} images; "
                "give one Tensor[L, 4] per image"
            )
        device = input.device
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {shape}")
            if b.device != device or not b.is_floating_point():  # (the name's f-string only for an error)
                _check_same(b, input, f"boxes[{i}]")
        if len(boxes) == 0:
            rois = input.new_zeros((0, 5))
        else:
            cat = torch.cat(boxes, dim=0)
            idx = torch.cat(
                [torch.full((b.shape[0], 1), i, dtype=cat.dtype, device=cat.device) for i, b in enumerate(boxes)], dim=0
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
    if check_values and not _is_compiling() and rois.numel() > 0:
        check_roi_values(rois, input.shape[0])
    return rois.contiguous()


def _rois_pass(rois: Tensor, batch_size: int) -> bool:
    """True when the boxes pass every check of :func:`check_roi_values`: CPU float32/float64 boxes answered by one
    numba pass over the rows (about 2 us for 64 boxes; numpy's four reductions, 8 us, where numba cannot be
    imported), others by one fused torch reduction (one device sync on CUDA)."""
    if rois.is_cpu and rois.dtype in _NUMPY_DTYPES:  # (is_cpu: device.type costs 0.5 us)
        values = rois.detach().numpy()
        checks = numba_module("_numba_checks")
        if checks is not None:
            return checks.rois_pass(values, batch_size)
        index = values[:, 0]
        return bool(np.isfinite(values).all()) and bool((index == np.round(index)).all()) and index.min() >= 0 \
            and index.max() < batch_size
    index = rois[:, 0]
    return bool(torch.isfinite(rois).all() & (index == index.round()).all() & (index >= 0).all()
                & (index < batch_size).all())


_NUMPY_DTYPES = (torch.float32, torch.float64)


@functools.cache
def numba_module(name: str):
    """``roikit.ops.<name>``, a module of numba code (``"pytorch._numba_kernels"``), or None when numba cannot be
    imported: the numpy / PyTorch code runs instead. Imported on first use (``import numba`` takes about 0.3 s)."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


def check_roi_values(rois: Tensor, batch_size: int, name: str = "boxes") -> None:
    """A ValueError naming ``name`` and the first bad row unless every value of ``rois`` (``Tensor[K, 5 or 6]``, at
    least one row) is finite and its batch index ``rois[:, 0]`` an integer value in ``[0, batch_size)``."""
    if _rois_pass(rois, batch_size):  # the usual case; the checks below name what is wrong
        return
    if not bool(torch.isfinite(rois).all()):
        bad = (~torch.isfinite(rois)).any(dim=1).nonzero()[0].item()
        raise ValueError(f"{name} must be finite; row {bad} is {rois[bad].tolist()}")
    index = rois[:, 0]
    if not bool((index == index.round()).all()):
        bad = (index != index.round()).nonzero()[0].item()
        raise ValueError(f"{name}[:, 0] is the batch index and must hold integer values; row {bad} has "
                         f"{index[bad].item()}")
    bad = ((index < 0) | (index >= batch_size)).nonzero()[0].item()
    raise ValueError(
        f"{name}[:, 0] is the batch index and must lie in [0, {batch_size}); row {bad} has {int(index[bad].item())}"
    )


def _check_same(boxes: Tensor, input: Tensor, name: str) -> None:
    if boxes.device != input.device:
        raise ValueError(f"{name} is on {boxes.device} but input is on {input.device}; put both on one device")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {boxes.dtype} (float32 boxes keep pixel "
                         "coordinates exact also for float16 / bfloat16 features)")
