"""What every op's registration shares: the argument checks of the registered ops, the deterministic-backward
switch, autograd with float32 autocast, and the CUDA dispatch to the Triton kernels."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ...utils.checks import FLOAT_DTYPES
from ...utils.switches import ThreadSwitch
from .._utils import check_roi_values

_deterministic = ThreadSwitch()


def deterministic_backward_enabled() -> bool:
    """True when backward kernels must give the same bits on every run (no floating-point atomics).

    On when ``torch.use_deterministic_algorithms(True)`` is in force, or inside :func:`deterministic_backward`.
    The CPU path is always deterministic; the flag chooses the CUDA kernels.
    """
    return _deterministic.on or torch.are_deterministic_algorithms_enabled()


def deterministic_backward(enabled: bool = True):
    """Ask for deterministic backward kernels inside a ``with`` block (this thread)."""
    return _deterministic.set(enabled)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op``'s autograd, and its autocast: as torchvision's ops, under autocast (CPU or CUDA) the forward runs in
    float32, whatever the features' dtype (the functional forms give the result back in the features' dtype)."""
    op.register_autograd(backward, setup_context=setup_context)
    for device in ("cpu", "cuda"):
        op.register_autocast(device, torch.float32)


def features_backward(backward_op) -> Callable:
    """The autograd backward of an op whose only gradient is its first argument's (the features):
    ``backward_op(grad, *saved tensors, *ctx.settings, deterministic)``, None for every other argument.
    The op's ``setup_context`` saves the tensors and sets ``ctx.settings`` in that order."""
    def backward(ctx, grad, *_):  # *_: the gradients of non-differentiable outputs (argmax)
        if grad is None:  # nothing flowed into the output (see integer_output)
            return (None,) * len(ctx.needs_input_grad)
        grad_input = backward_op(grad.contiguous(), *ctx.saved_tensors, *ctx.settings,
                                 deterministic_backward_enabled())
        return (grad_input,) + (None,) * (len(ctx.needs_input_grad) - 1)  # one entry per argument

    return backward


def integer_output(ctx, argmax: Tensor) -> None:
    """Marks an op's argmax output as having no gradient, and turns off autograd's zero-filling of the gradients
    nobody supplied: else every backward makes zeros of argmax's shape (as large as the output; 90 of 370 ms of
    RoIPool's forward+backward at 512 boxes, 14 x 14). The backward then gets None for an output nothing flowed
    into."""
    ctx.mark_non_differentiable(argmax)
    ctx.set_materialize_grads(False)


# On CUDA tensors every op runs its Triton kernels (roikit.ops.triton, imported on the first CUDA call); without
# Triton, and for float64 or an empty map, the plain-PyTorch path (it runs on any device).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton(name: str, *maps: Tensor):
    """The Triton kernel module ``name`` when it can take ``maps``, else None."""
    if any(m.dtype not in _KERNEL_DTYPES or m.numel() == 0 for m in maps):
        return None
    from ..triton import kernels

    return kernels(name)


def register_cuda(op, plain: Callable, family: str, maps: Callable[..., Sequence[Tensor] | None],
                  deterministic: bool = False, check: Callable | None = None) -> None:
    """Run ``op`` on CUDA tensors through ``roikit.ops.triton.<family>``'s launcher of ``plain``'s name, called with the
    op's arguments, when Triton is there and the kernels can take the tensors ``maps(*args)`` picks (else None:
    the plain path, e.g. for an empty gradient map); otherwise through ``plain``, the plain-PyTorch function, which
    does not take the op's last argument ``deterministic`` when it has one. ``check(*args)`` first: the op's
    argument checks (the op's own body, its CPU kernel, runs them too)."""
    name = plain.__name__

    def kernel(*args):
        if check is not None:
            check(*args)
        picked = maps(*args)
        k = None if picked is None else _triton(family, *picked)
        if k is None:
            return plain(*args[:-1]) if deterministic else plain(*args)
        return getattr(k, name)(*args)

    op.register_kernel("cuda", kernel)


# ---------------------------------------------------------------- argument checks of the registered ops
# ``torch.ops.roikit.*`` are called directly by torch.compile / torch.export graphs and by users, past the public
# wrappers: every op's real implementation (CPU and CUDA) checks what its kernels need to read only what is theirs
# (the numba and Triton kernels index the map with the batch index unchecked) and raises a ValueError that names
# the op and the argument. Fake kernels check only what needs no data and no symbolic size (``fake=True``).
def check_op_args(op: str, rois: Tensor, pooled: Sequence[int], *, maps: Sequence[Tensor] = (),
                  sizes: Mapping[str, int | Sequence[int]] | None = None, scales: Sequence[float] = (),
                  grad: Tensor | None = None, position_sensitive: bool = False, rois_width: int = 5,
                  fake: bool = False) -> None:
    """Check one call of ``roikit::<op>``.

    Args:
        rois: ``Tensor[K, rois_width]`` (batch index, then coordinates), floating, on the maps' (or grad's) device;
            unless ``fake``, every value finite and the batch index an integer in ``[0, N)`` (eager values: skipped
            only while a CUDA graph is being captured).
        pooled: ``(PH, PW)``, positive ints.
        maps: the features the op reads (``input``, or the pyramid's levels): 4-D, float16/bfloat16/float32/
            float64, one device and dtype, one batch size N and channel count C.
        sizes: for a backward op given no map, the map's sizes by argument name (``batch_size`` and ``channels``
            at least; an int or a list of ints each), non-negative ints.
        scales: spatial scales, positive and finite.
        grad: a backward's incoming gradient, ``[K, C', PH, PW]`` with ``C' = C`` (or ``C / (PH PW)`` for
            ``position_sensitive`` ops, whose C must be a multiple of ``PH PW``), in the maps' dtype.
    """
    # Every call of every op runs these checks (a few microseconds of a small call): the usual values take the first,
    # cheap test of each check (an exact ``type(...) is`` needs no abstract-class lookup) and the rest runs only
    # for the others.
    where = f"roikit::{op}"
    for name, value in zip(("pooled_height", "pooled_width"), pooled):
        if type(value) is int and value > 0:
            continue
        if not (fake and isinstance(value, torch.SymInt)) and not (_is_int(value) and value > 0):
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if not fake:  # (under torch.compile a scale may be symbolic)
        for i, scale in enumerate(scales):
            if type(scale) is float and 0.0 < scale < math.inf:
                continue
            if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
                raise ValueError(f"{where}: spatial scale {i} must be positive and finite (1 / stride), got "
                                 f"{scale!r}")
    if grad is not None:
        check_tensor(where, grad, "grad", 4)
    for i, m in enumerate(maps):
        name = "input" if len(maps) == 1 else f"features[{i}]"
        check_tensor(where, m, name, 4)
        if fake:
            continue
        first = maps[0]
        if i and (m.device != first.device or m.dtype != first.dtype or m.shape[:2] != first.shape[:2]):
            raise ValueError(f"{where}: {name} is {m.dtype} [N, C] = {list(m.shape[:2])} on {m.device} but "
                             f"features[0] is {first.dtype} {list(first.shape[:2])} on {first.device}; every level "
                             "must share one dtype, device, batch and channels")
    check_tensor(where, rois, "rois", 2, any_float=True)
    if rois.shape[1] != rois_width:
        what = "(batch index, cx, cy, w, h, angle)" if rois_width == 6 else "(batch index, x1, y1, x2, y2)"
        raise ValueError(f"{where}: rois must be a Tensor[K, {rois_width}] {what}, got shape {tuple(rois.shape)}")
    if fake:
        return
    if maps:
        (batch, channels, *_), device = maps[0].shape, maps[0].device
    elif sizes is not None and grad is not None:
        for name, value in sizes.items():
            if type(value) is int and value >= 0:
                continue
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if not (_is_int(v) and v >= 0):
                    raise ValueError(f"{where}: {name} must be a non-negative int (or a list of them), got {value!r}")
        batch, channels, device = sizes["batch_size"], sizes["channels"], grad.device
    else:
        raise TypeError(f"{where}: check_op_args needs maps, or sizes and grad")
    _check_device(where, rois, "rois", device)
    out_channels = channels
    if position_sensitive:
        bins = pooled[0] * pooled[1]
        if channels % bins:
            raise ValueError(f"{where}: the map has {channels} channels: position-sensitive pooling into "
                             f"{pooled[0]} x {pooled[1]} bins needs a multiple of {bins} (C' x PH x PW)")
        out_channels = channels // bins
    if grad is not None:
        _check_device(where, grad, "grad", device)
        if maps and grad.dtype != maps[0].dtype:
            raise ValueError(f"{where}: grad is {grad.dtype} but input is {maps[0].dtype}; give both one dtype")
        expected = (rois.shape[0], out_channels, *pooled)
        if grad.shape != expected:
            raise ValueError(f"{where}: grad must have the forward output's shape [K, C', PH, PW] = {list(expected)}, "
                             f"got {list(grad.shape)}")
    if rois.numel() and not _capturing(rois):
        check_roi_values(rois, batch, f"{where}: rois")


def check_tensor(where: str, t, name: str, dim: int, any_float: bool = False) -> None:
    """``t`` a ``dim``-D Tensor of the region ops' dtypes (any floating dtype with ``any_float``)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{where}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() if any_float else t.dtype in FLOAT_DTYPES):
        kinds = "floating-point" if any_float else "float16, bfloat16, float32 or float64"
        raise ValueError(f"{where}: {name} must be {kinds}, got {t.dtype}")


def check_index_map(op: str, index: Tensor, grad: Tensor, name: str, dtype: torch.dtype,
                    high: int | None = None) -> None:
    """A backward's index map (a forward's argmax): ``grad``'s shape, ``dtype``, contiguous (the kernels index it
    flat), on grad's device; with ``high``, its values in ``[-1, high)`` (-1: an empty bin)."""
    where = f"roikit::{op}"
    if not isinstance(index, Tensor) or index.dtype != dtype or index.shape != grad.shape:
        got = f"{index.dtype} {list(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(f"{where}: {name} must be the forward's {dtype} {name} of grad's shape {list(grad.shape)}, "
                         f"got {got}")
    _check_device(where, index, name, grad.device)
    if not index.is_contiguous():
        raise ValueError(f"{where}: {name} must be contiguous (the forward's {name})")
    if high is not None and index.numel() and not _capturing(index):
        low, top = (int(v) for v in torch.aminmax(index))
        if low < -1 or top >= high:
            raise ValueError(f"{where}: {name} must hold cells in [-1, {high}) (H * W, -1 for an empty bin), got "
                             f"values in [{low}, {top}]")


def check_finite(op: str, t: Tensor, name: str) -> None:
    """Every value of ``t`` finite (eager values, as the boxes')."""
    if t.numel() and not _capturing(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"roikit::{op}: {name} must be finite")


def _check_device(where: str, t: Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{where}: {name} is on {t.device} but the map is on {device}; put both on one device")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _capturing(t: Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream: value checks (a device sync) cannot run."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
