"""Spatial pyramid pooling of whole feature maps (He et al. 2014): any input size -> a fixed-length vector.

The default levels (1, 2, 4) give 1 + 4 + 16 = 21 bins per channel: a [N, 256, H, W] map becomes [N, 5376]
whatever H and W are.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checks import check_choice, check_features

BIN_RULES = ("adaptive", "sppnet")


def adaptive_bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
    """How adaptive pooling splits ``in_size`` cells into ``out_size`` bins: ``[(start, end), ...]``.

    PyTorch's rule, in exact integer arithmetic: ``start = floor(i * in / out)``, ``end = ceil((i + 1) * in / out)``.
    Bins cover every cell; when ``out`` does not divide ``in`` some neighbours share a cell
    (``adaptive_bins(10, 7)`` -> (0, 2), (1, 3), (2, 5), (4, 6), (5, 8), (7, 9), (8, 10)).
    """
    for name, value in (("in_size", in_size), ("out_size", out_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)) for i in range(out_size)]


def sppnet_bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
    """The SPPnet paper's rule: window ``ceil(in / n)``, stride ``floor(in / n)``; the first ``n`` windows.

    It needs ``in >= n``. When ``n`` does not divide ``in`` the windows fall short of the map's end and the cells
    past the last window are never read (``sppnet_bins(7, 4)``: windows of 2 cells every 1 cell, cells 5 and 6
    unread).
    """
    adaptive_bins(in_size, out_size)  # the same argument checks
    if in_size < out_size:
        raise ValueError(f"the 'sppnet' rule needs at least {out_size} cells for {out_size} bins, got {in_size}")
    window, stride = -(-in_size // out_size), in_size // out_size
    return [(i * stride, i * stride + window) for i in range(out_size)]


def _pool_bins(x: Tensor, rows, cols, mode: str) -> Tensor:
    cells = []
    for r0, r1 in rows:
        for c0, c1 in cols:
            window = x[:, :, r0:r1, c0:c1]
            cells.append(window.amax(dim=(2, 3)) if mode == "max" else window.mean(dim=(2, 3)))
    return torch.stack(cells, dim=2)  # [N, C, n * n]


def spatial_pyramid_pool(input: Tensor, levels: Sequence[int] = (1, 2, 4), mode: str = "max",
                         bins: str = "adaptive") -> Tensor:
    """Pool the whole map at each level's ``n x n`` grid and concatenate.

    Args:
        input (Tensor[N, C, H, W]): the feature map (any H, W).
        levels (Sequence[int]): grid sizes, ``(1, 2, 4)`` by default (21 bins).
        mode (str): ``"max"`` or ``"avg"``.
        bins (str): ``"adaptive"`` (PyTorch's adaptive pooling rule, :func:`adaptive_bins`) or ``"sppnet"``
            (:func:`sppnet_bins`).

    Returns:
        Tensor[N, C * sum(n * n)]: level by level, each ``[N, C, n, n]`` flattened channel-major.
    """
    check_features(input)
    check_choice(mode, "mode", ("max", "avg"))
    check_choice(bins, "bins", BIN_RULES)
    if isinstance(levels, int) or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty sequence of positive ints, got {levels!r}")
    n, c, h, w = input.shape
    out = []
    for level in levels:
        if bins == "adaptive":
            adaptive_bins(h, level)  # argument checks
            pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
            out.append(pool(input, level).reshape(n, -1))
        else:
            out.append(_pool_bins(input, sppnet_bins(h, level), sppnet_bins(w, level), mode).reshape(n, -1))
    return torch.cat(out, dim=1)


class SpatialPyramidPooling(nn.Module):
    """Module form of :func:`spatial_pyramid_pool`."""

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "max", bins: str = "adaptive"):
        super().__init__()
        self.levels = tuple(levels)
        self.mode = check_choice(mode, "mode", ("max", "avg"))
        self.bins = check_choice(bins, "bins", BIN_RULES)

    def output_shape(self, channels: int) -> tuple[int]:
        """One image's output shape for ``channels``-channel maps: ``(C * sum(n * n),)``."""
        return (channels * sum(n * n for n in self.levels),)

    def forward(self, input: Tensor) -> Tensor:
        return spatial_pyramid_pool(input, self.levels, self.mode, self.bins)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}, bins={self.bins!r}"
