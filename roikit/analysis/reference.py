"""What a pooled picture should be: the picture as a feature map of its stride, and the exact mean colour of every
bin of a box at full resolution. The misalignment study's crop error and the demo's pooling view compare each
rule's crop with these.

Pixels are constant unit squares: pixel ``(x, y)`` is ``[x, x + 1) x [y, y + 1)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["stride_map", "exact_bin_means"]


def stride_map(images: Tensor, stride: int) -> Tensor:
    """[N, C, H, W] -> [N, C, ceil(H / s), ceil(W / s)]: each cell the mean of the pixels it covers (a partial last
    cell averages the ones it has).

    Integer images are averaged in float32, which holds the sum of a cell's 8-bit pixels exactly for strides up to
    256 px; floating images in their own dtype."""
    images = images if images.is_floating_point() else images.float()
    return torch.nn.functional.avg_pool2d(images, stride, stride, ceil_mode=True)


def exact_bin_means(images: Sequence[np.ndarray], image_index: np.ndarray, boxes: np.ndarray,
                    output_size: int) -> Tensor:
    """Exact mean colour of every bin of every box at full resolution: [K, P, P, C] float64.

    Args:
        images: pictures ``[H, W, C]`` (any real dtype; sizes may differ).
        image_index (ndarray[K]): each box's picture in ``images``.
        boxes (ndarray[K, 4]): x1, y1, x2, y2 in pixels.
        output_size (int): bins per side, ``P``.

    Pixels are constant unit squares, so ``I(x, y) = integral of the image over [0, x] x [0, y]`` is bilinear
    inside each pixel and equals the bilinear interpolation of the summed-area table at ``(x, y)``: a bin's
    integral is ``I`` at its four corners, with fractional pixels weighted by the area they cover. Exact up to
    float64 rounding.
    """
    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)) or output_size < 1:
        raise ValueError(f"output_size must be a positive int (bins per side), got {output_size!r}")
    p = int(output_size)
    tables, bases, sizes, base = [], [], [], 0
    for img in images:
        t = torch.from_numpy(np.ascontiguousarray(img)).double()  # [H, W, C]
        h, w, c = t.shape
        sat = torch.zeros((h + 1, w + 1, c), dtype=torch.float64)
        sat[1:, 1:] = t.cumsum(0).cumsum(1)
        tables.append(sat.reshape(-1, c))
        bases.append(base)
        sizes.append((h, w))
        base += (h + 1) * (w + 1)
    flat = torch.cat(tables)
    idx = torch.as_tensor(image_index, dtype=torch.long)
    hw = torch.as_tensor(sizes, dtype=torch.long)[idx]  # [K, 2]
    b = torch.as_tensor(boxes, dtype=torch.float64)
    t = torch.arange(p + 1, dtype=torch.float64) / p
    ys = b[:, 1:2] + t * (b[:, 3:4] - b[:, 1:2])  # [K, P + 1] bin edges
    xs = b[:, 0:1] + t * (b[:, 2:3] - b[:, 0:1])
    y0 = ys.floor().long().clamp(min=0).minimum(hw[:, :1] - 1)
    x0 = xs.floor().long().clamp(min=0).minimum(hw[:, 1:] - 1)
    fy, fx = (ys - y0)[:, :, None, None], (xs - x0)[:, None, :, None]
    row = hw[:, 1:] + 1  # [K, 1] table row length

    def at(dy: int, dx: int) -> Tensor:  # [K, P + 1, P + 1, C]
        i = torch.as_tensor(bases)[idx][:, None, None] + (y0 + dy)[:, :, None] * row[:, :, None] + (x0 + dx)[:, None, :]
        return flat[i]

    integral = (at(0, 0) * (1 - fy) * (1 - fx) + at(0, 1) * (1 - fy) * fx + at(1, 0) * fy * (1 - fx)
                + at(1, 1) * fy * fx)
    sums = integral[:, 1:, 1:] - integral[:, :-1, 1:] - integral[:, 1:, :-1] + integral[:, :-1, :-1]
    area = ((b[:, 3] - b[:, 1]) * (b[:, 2] - b[:, 0]) / (p * p))[:, None, None, None]
    return sums / area
