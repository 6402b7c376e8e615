"""What every op's registration shares: the deterministic-backward switch, autograd with float32 autocast, and the
CUDA dispatch to the Triton kernels."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ...utils.switches import ThreadSwitch

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
        grad_input = backward_op(grad.contiguous(), *ctx.saved_tensors, *ctx.settings,
                                 deterministic_backward_enabled())
        return (grad_input,) + (None,) * (len(ctx.needs_input_grad) - 1)  # one entry per argument

    return backward


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
                  deterministic: bool = False) -> None:
    """Run ``op`` on CUDA tensors through ``roikit.ops.triton.<family>``'s launcher of ``plain``'s name, called with the
    op's arguments, when Triton is there and the kernels can take the tensors ``maps(*args)`` picks (else None:
    the plain path, e.g. for an empty gradient map); otherwise through ``plain``, the plain-PyTorch function, which
    does not take the op's last argument ``deterministic`` when it has one."""
    name = plain.__name__

    def kernel(*args):
        picked = maps(*args)
        k = None if picked is None else _triton(family, *picked)
        if k is None:
            return plain(*args[:-1]) if deterministic else plain(*args)
        return getattr(k, name)(*args)

    op.register_kernel("cuda", kernel)
