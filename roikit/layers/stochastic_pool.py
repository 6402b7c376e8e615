"""Stochastic pooling (Zeiler and Fergus, "Stochastic Pooling for Regularization of Deep CNNs", ICLR 2013).

Each window ``w`` of non-negative activations ``a_1 .. a_K`` (after a ReLU) defines probabilities
``p_i = a_i / sum_j a_j``.

- Training: the window's output is one activation ``a_i`` drawn with probability ``p_i`` (a multinomial draw per
  window, all windows at once). A cell with ``a_i = 0`` is never drawn; a window of zeros gives 0. The draw is not
  differentiated: the gradient ``g_w`` goes to the drawn cell only, like max pooling with a random "argmax".
  Overlapping windows (stride < kernel) add up their gradients on shared cells.
- Evaluation: the probability-weighted average ``sum_i p_i a_i = sum_i a_i^2 / sum_i a_i`` (0 for a window of
  zeros), the expected value of the training output; it is differentiable everywhere (also on zero windows).

Use it as a regulariser in place of max pooling in small networks trained without dropout; it lies between
average pooling (all cells) and max pooling (the largest). Reproducible with a ``torch.Generator`` on the
input's device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checks import check_bool, check_float_features, pair


def stochastic_pool2d(
    input: Tensor,
    kernel_size,
    stride=None,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Stochastic pooling over sliding windows (no padding).

    Args:
        input (Tensor[N, C, H, W]): non-negative activations (after a ReLU); a negative or NaN value raises
            ``ValueError`` (the check reads the data, so it runs in eager mode only).
        kernel_size (int or (int, int)): window ``(kh, kw)``, at most ``(H, W)``.
        stride (int or (int, int), optional): step between windows; ``None`` means ``kernel_size``.
        training (bool): draw one activation per window (``True``) or return the weighted average (``False``).
        generator (torch.Generator, optional): source of the draws, on the input's device; the same seed gives
            the same output.

    Returns:
        Tensor[N, C, OH, OW], ``OH = floor((H - kh) / sh) + 1`` and ``OW`` likewise.

    Example::

        >>> x = torch.tensor([[[[0., 1.], [1., 2.]]]])      # p = 0, 1/4, 1/4, 1/2
        >>> stochastic_pool2d(x, 2, training=False)          # (0 + 1 + 1 + 4) / 4
        tensor([[[[1.5000]]]])
    """
    check_float_features(input)
    check_bool(training, "training")
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = (kh, kw) if stride is None else pair(stride, "stride")
    n, c, h, w = input.shape
    if h < kh or w < kw:
        raise ValueError(f"kernel_size {(kh, kw)} must fit in the input's H, W = {(h, w)}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if torch.device(generator.device).type != input.device.type:
            raise ValueError(f"generator must be on the input's device {input.device}, got {generator.device}")
    if not torch.compiler.is_compiling() and not bool((input >= 0).all()):
        raise ValueError("input must be >= 0 and not NaN (activations after a ReLU) for stochastic pooling")

    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    k, length = kh * kw, oh * ow
    if input.numel() == 0:
        return input.new_zeros((n, c, oh, ow)) + input.sum() * 0  # keeps the autograd graph connected

    cols = F.unfold(input, (kh, kw), stride=(sh, sw)).view(n, c, k, length)  # [N, C, K, L]
    if training:
        with torch.no_grad():
            weight_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
            weights = cols.transpose(2, 3).reshape(-1, k).to(weight_dtype)  # [N*C*L, K]
            total = weights.sum(1, keepdim=True)
            # a window of zeros has no distribution: draw any cell, its value is 0 anyway
            weights = torch.where(total > 0, weights, torch.ones_like(weights))
            pick = torch.multinomial(weights, 1, generator=generator)  # [N*C*L, 1]
            pick = pick.view(n, c, 1, length)  # [N, C, 1, L]
        out = cols.gather(2, pick)  # [N, C, 1, L]; the gradient flows to the picked cell only
    else:
        acc = cols if cols.dtype == torch.float64 else cols.float()  # a^2 overflows float16 above 256
        total = acc.sum(2, keepdim=True)  # [N, C, 1, L]
        safe = torch.where(total > 0, total, torch.ones_like(total))  # window of zeros: 0 / 1, finite gradient
        out = ((acc * acc).sum(2, keepdim=True) / safe).to(input.dtype)
    return out.view(n, c, oh, ow)


class StochasticPool2d(nn.Module):
    """Stochastic pooling: draws in ``train()`` mode, probability-weighted average in ``eval()`` mode.

    ``forward(input, generator=None)``: ``input`` Tensor[N, C, H, W] (>= 0) -> Tensor[N, C, OH, OW].
    Replaces ``nn.MaxPool2d(kernel_size, stride)`` after a ReLU.
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.generator: torch.Generator | None = None  # the draws' source when forward is given none

    def forward(self, input: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return stochastic_pool2d(input, self.kernel_size, self.stride, self.training, generator or self.generator)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


__all__ = ["stochastic_pool2d", "StochasticPool2d"]
