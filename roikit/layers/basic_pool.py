"""Max, average, global and adaptive pooling: torch's own operators, with when to use each and their backward rules.

Nothing here re-implements a kernel: every function calls ``F.max_pool2d``, ``F.avg_pool2d`` or
``F.adaptive_{avg,max}_pool2d``. What this file adds is a mode string that a config can name
(``mode="avg" | "max"``), input checks that raise ``ValueError``, and the notes below.

When to use which
-----------------
- **Max pooling** keeps the strongest response in each window: the detector-style choice ("is the part there?"),
  robust to where in the window it is. Sparse gradient (one cell per window).
- **Average pooling** keeps the mean response: smoother, keeps every cell's contribution ("how much of it is
  there?"); the usual choice just before a classifier on a texture-like signal. Dense gradient.
- **Global average pooling** (``GlobalPool("avg")``): one value per channel, any input size; the standard
  classification head since Network-in-Network / ResNet. Global max pooling (``GlobalPool("max")``) answers
  "does the channel fire anywhere?" and suits weakly localised objects.
- **Adaptive pooling** (``AdaptivePool2d``): a fixed output grid from any input size (RoI heads, SPP levels).
  Bin ``i`` of ``out`` bins over ``H`` cells spans ``[floor(i H / out), ceil((i + 1) H / out))``: when ``out``
  does not divide ``H`` neighbouring bins **overlap** (H=5, out=3: ``[0, 2), [1, 4), [3, 5)``).
- **Overlapping max pooling** (``OverlappingMaxPool2d``, kernel 3 stride 2 as in AlexNet): windows share a
  row/column; Krizhevsky et al. 2012 report slightly less overfitting than kernel 2 stride 2.

Backward rules (``tests/test_pooling_family.py`` checks each on hand-made maps)
------------------------------------------------------------------------------
Let ``g_w`` be the gradient arriving at output window ``w``.

- Average pooling: every cell of ``w`` gets ``g_w / |w|`` (``|w|`` = the divisor: ``kh * kw``, or the number of
  cells inside the map when ``count_include_pad=False``). Global average pooling: ``g / (H * W)`` everywhere.
- Max pooling: the whole ``g_w`` goes to the argmax of ``w``; every other cell of ``w`` gets 0. On ties torch
  picks a single cell (do not rely on which one).
- A cell inside several windows (overlapping pooling, adaptive bins that overlap) gets the **sum** of its
  shares: ``sum_{w containing the cell} g_w / |w|`` for avg, ``sum_{w whose argmax it is} g_w`` for max (so a
  cell can receive 4 g from kernel 3 stride 2). Cells in no window (e.g. the last row of a 6x6 map under
  kernel 3 stride 2) get 0.
- Sum of the input gradient: equals ``sum_w g_w`` for max pooling, and for average pooling whenever the divisor
  counts only real cells, with or without overlap. It is *lost* in one case: average pooling with padding and
  ``count_include_pad=True`` (the default), where the shares of the padded cells go nowhere.

The rules on small maps (these examples run in the test suite, ``tests/test_doc_examples.py``)::

    >>> import torch
    >>> from roikit.layers import overlapping_max_pool2d, pool2d
    >>> x = torch.tensor([[[[1., 2.], [3., 4.]]]], requires_grad=True)
    >>> pool2d(x, 2, mode="avg").backward(torch.tensor([[[[8.]]]]))
    >>> x.grad                                  # average: 8 / 4 to every cell of the window
    tensor([[[[2., 2.],
              [2., 2.]]]])
    >>> x.grad = None
    >>> pool2d(x, 2, mode="max").backward(torch.tensor([[[[8.]]]]))
    >>> x.grad                                  # max: all 8 to the argmax (the 4)
    tensor([[[[0., 0.],
              [0., 8.]]]])

    Overlapping windows (kernel 3, stride 2 on 5 x 5: four windows sharing row 2 and column 2). Average pooling
    with 9 arriving at each window: every cell gets 9 / 9 from each window it is in, so the sum stays 4 x 9.

    >>> y = torch.zeros(1, 1, 5, 5, requires_grad=True)
    >>> pool2d(y, 3, stride=2, mode="avg").backward(torch.full((1, 1, 2, 2), 9.))
    >>> y.grad
    tensor([[[[1., 1., 2., 1., 1.],
              [1., 1., 2., 1., 1.],
              [2., 2., 4., 2., 2.],
              [1., 1., 2., 1., 1.],
              [1., 1., 2., 1., 1.]]]])
    >>> float(y.grad.sum())
    36.0

    Max pooling, when the centre cell is the maximum of all four windows: it gets the gradient of all four.

    >>> z = torch.zeros(1, 1, 5, 5)
    >>> z[0, 0, 2, 2] = 10.
    >>> _ = z.requires_grad_()
    >>> overlapping_max_pool2d(z).backward(torch.ones(1, 1, 2, 2))
    >>> z.grad[0, 0, 2, 2], float(z.grad.sum())
    (tensor(4.), 4.0)
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checks import check_bool, check_choice, check_float_features, check_nonempty_map, pair

POOL_MODES = ("avg", "max")


def _padding(value) -> tuple[int, int]:
    # pair() wants positive ints; padding may be 0
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or min(value) < 0
    ):
        raise ValueError(f"padding must be an int >= 0 or a pair of them, got {value!r}")
    return int(value[0]), int(value[1])


def _check_padding(pad: tuple[int, int], kernel: tuple[int, int]) -> None:
    # torch's own limit, checked here to raise ValueError instead of torch's RuntimeError
    if pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
        raise ValueError(f"padding must be at most half of kernel_size {kernel}, got {pad}")


def pool2d(
    input: Tensor,
    kernel_size,
    stride=None,
    padding=0,
    mode: str = "max",
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> Tensor:
    """Max or average pooling over sliding windows, picked by a string (calls ``F.max_pool2d`` / ``F.avg_pool2d``).

    Args:
        input (Tensor[N, C, H, W]): the features.
        kernel_size (int or (int, int)): window ``(kh, kw)``.
        stride (int or (int, int), optional): step between windows; ``None`` means ``kernel_size``
            (non-overlapping windows). A stride smaller than the kernel gives overlapping windows.
        padding (int or (int, int)): implicit padding on each side (``-inf`` for max, zeros for avg); at most
            half the kernel.
        mode (str): ``"max"`` or ``"avg"``.
        ceil_mode (bool): round the output size up instead of down.
        count_include_pad (bool): avg only; divide by ``kh * kw`` even where the window covers padding
            (see the module notes: this loses part of the gradient).

    Returns:
        Tensor[N, C, OH, OW] with ``OH = floor((H + 2 ph - kh) / sh) + 1`` (``ceil`` with ``ceil_mode``).
    """
    check_float_features(input)
    check_choice(mode, "mode", POOL_MODES)
    check_bool(ceil_mode, "ceil_mode")
    check_bool(count_include_pad, "count_include_pad")
    kernel = pair(kernel_size, "kernel_size")
    step = kernel if stride is None else pair(stride, "stride")
    pad = _padding(padding)
    _check_padding(pad, kernel)
    if mode == "max":
        return F.max_pool2d(input, kernel, step, pad, ceil_mode=ceil_mode)
    return F.avg_pool2d(input, kernel, step, pad, ceil_mode=ceil_mode, count_include_pad=count_include_pad)


class Pool2d(nn.Module):
    """``pool2d`` as a module: max or average pooling chosen by ``mode``, for heads configured by name.

    Example: ``Pool2d(2)`` halves the map with max pooling; ``Pool2d(3, 2, mode="avg")`` is overlapping
    average pooling.
    """

    def __init__(self, kernel_size, stride=None, padding=0, mode: str = "max", ceil_mode: bool = False,
                 count_include_pad: bool = True):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = _padding(padding)
        self.mode = check_choice(mode, "mode", POOL_MODES)
        self.ceil_mode = check_bool(ceil_mode, "ceil_mode")
        self.count_include_pad = check_bool(count_include_pad, "count_include_pad")

    def forward(self, input: Tensor) -> Tensor:
        return pool2d(input, self.kernel_size, self.stride, self.padding, self.mode, self.ceil_mode,
                      self.count_include_pad)

    def extra_repr(self) -> str:
        s = f"mode={self.mode!r}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.ceil_mode:
            s += ", ceil_mode=True"
        if self.mode == "avg" and not self.count_include_pad:
            s += ", count_include_pad=False"
        return s


def global_pool2d(input: Tensor, mode: str = "avg", keepdim: bool = False) -> Tensor:
    """One value per channel over the whole map (calls ``F.adaptive_avg_pool2d`` / ``F.adaptive_max_pool2d``).

    Args:
        input (Tensor[N, C, H, W]): the features, any ``H, W >= 1``.
        mode (str): ``"avg"`` (mean; backward gives ``g / (H * W)`` to every cell) or ``"max"`` (backward gives
            ``g`` to the argmax only).
        keepdim (bool): return ``[N, C, 1, 1]`` instead of ``[N, C]``.

    Returns:
        Tensor[N, C] (or Tensor[N, C, 1, 1] with ``keepdim``).
    """
    check_float_features(input)
    check_choice(mode, "mode", POOL_MODES)
    check_bool(keepdim, "keepdim")
    check_nonempty_map(input)
    out = F.adaptive_avg_pool2d(input, 1) if mode == "avg" else F.adaptive_max_pool2d(input, 1)
    return out if keepdim else out.flatten(1)


class GlobalPool(nn.Module):
    """Global average or max pooling: ``[N, C, H, W] -> [N, C]`` (``[N, C, 1, 1]`` with ``keepdim``).

    The classification head's pooling: ``nn.Sequential(backbone, GlobalPool("avg"), nn.Linear(C, classes))``.
    """

    def __init__(self, mode: str = "avg", keepdim: bool = False):
        super().__init__()
        self.mode = check_choice(mode, "mode", POOL_MODES)
        self.keepdim = bool(keepdim)

    def forward(self, input: Tensor) -> Tensor:
        return global_pool2d(input, self.mode, self.keepdim)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (", keepdim=True" if self.keepdim else "")


def adaptive_pool2d(input: Tensor, output_size, mode: str = "avg") -> Tensor:
    """A fixed ``output_size`` grid from any input size (calls ``F.adaptive_avg_pool2d`` / ``_max_pool2d``).

    Args:
        input (Tensor[N, C, H, W]): the features.
        output_size (int or (int, int)): ``(OH, OW)``. Bin ``i`` spans ``[floor(i H / OH), ceil((i + 1) H / OH))``
            rows (same for columns), so bins overlap when ``OH`` does not divide ``H``, and a bin may be a
            single cell repeated when ``OH > H``.
        mode (str): ``"avg"`` or ``"max"``.

    Returns:
        Tensor[N, C, OH, OW].
    """
    check_float_features(input)
    check_choice(mode, "mode", POOL_MODES)
    size = pair(output_size, "output_size")
    check_nonempty_map(input)
    if mode == "avg":
        return F.adaptive_avg_pool2d(input, size)
    return F.adaptive_max_pool2d(input, size)


class AdaptivePool2d(nn.Module):
    """``adaptive_pool2d`` as a module: ``[N, C, H, W] -> [N, C, OH, OW]`` for any ``H, W``."""

    def __init__(self, output_size, mode: str = "avg"):
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.mode = check_choice(mode, "mode", POOL_MODES)

    def forward(self, input: Tensor) -> Tensor:
        return adaptive_pool2d(input, self.output_size, self.mode)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, mode={self.mode!r}"


def _check_overlap(kernel: tuple[int, int], step: tuple[int, int]) -> None:
    if step[0] >= kernel[0] and step[1] >= kernel[1]:
        raise ValueError(
            f"stride must be smaller than kernel_size (overlapping windows), got kernel_size={kernel}, "
            f"stride={step}; use pool2d / nn.MaxPool2d for non-overlapping pooling"
        )


def overlapping_max_pool2d(input: Tensor, kernel_size=3, stride=2, padding=0, ceil_mode: bool = False) -> Tensor:
    """Max pooling with windows larger than the stride (AlexNet: kernel 3, stride 2; 55x55 -> 27x27).

    Args:
        input (Tensor[N, C, H, W]): the features.
        kernel_size (int or (int, int)): window, default 3.
        stride (int or (int, int)): step, default 2; must be smaller than ``kernel_size`` along at least one axis.
        padding (int or (int, int)): ``-inf`` padding on each side, at most half the kernel.
        ceil_mode (bool): round the output size up.

    Returns:
        Tensor[N, C, OH, OW], ``OH = floor((H + 2 p - k) / s) + 1``. In backward a cell that is the argmax of
        several windows gets the sum of their gradients.
    """
    kernel = pair(kernel_size, "kernel_size")
    step = pair(stride, "stride")
    _check_overlap(kernel, step)
    return pool2d(input, kernel, step, padding, "max", ceil_mode)


class OverlappingMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with AlexNet's overlapping defaults (kernel 3, stride 2), rejecting non-overlapping windows.

    It is an ``nn.MaxPool2d`` (same forward, same state), so it can replace one anywhere; its repr shows the
    settings, e.g. ``OverlappingMaxPool2d(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=False)``.
    """

    def __init__(self, kernel_size=3, stride=2, padding=0, ceil_mode: bool = False):
        kernel = pair(kernel_size, "kernel_size")
        step = pair(stride, "stride")
        pad = _padding(padding)
        _check_overlap(kernel, step)
        _check_padding(pad, kernel)
        super().__init__(kernel_size, stride, padding, ceil_mode=check_bool(ceil_mode, "ceil_mode"))

    def forward(self, input: Tensor) -> Tensor:
        check_float_features(input)
        return super().forward(input)


__all__ = [
    "pool2d", "Pool2d", "global_pool2d", "GlobalPool", "adaptive_pool2d", "AdaptivePool2d",
    "overlapping_max_pool2d", "OverlappingMaxPool2d",
]
