"""Box-by-box crops of a channels-last feature map, batched in memory-bounded chunks.

Every region op here reads, for box k, a small set of rows ``rows[k, :Ly_k]`` and columns ``cols[k, :Lx_k]`` of
image ``n_k``: a crop ``F[n_k][rows][:, cols]`` of shape ``[Ly_k, Lx_k, C]``. Boxes are sorted by crop area and
grouped into chunks whose crops hold at most ``budget`` values, so memory stays bounded whatever the boxes, and
each chunk is handled with a few batched matrix products instead of a Python loop per box.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

CHUNK_BUDGET = 1 << 22  # values per chunk of crops (16 MiB in float32)


def compute_dtype(rois: Tensor) -> torch.dtype:
    """Coordinates and sums are computed in float64 for float64 boxes, in float32 otherwise (also for half types)."""
    return torch.float64 if rois.dtype == torch.float64 else torch.float32


def channels_last_rows(input: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, C, H, W] -> [N * H * W, C] in ``dtype`` (free when the input is already channels-last)."""
    n, c, h, w = input.shape
    return input.permute(0, 2, 3, 1).to(dtype).reshape(n * h * w, c)


def chunks(len_y: Tensor, len_x: Tensor, channels: int, budget: int | None = None) -> Iterator[tuple[Tensor, int, int]]:
    """Yield ``(box_indices, Ly, Lx)``: boxes grouped by crop area, each group padded to its largest crop."""
    if len_y.numel() == 0:
        return
    budget = CHUNK_BUDGET if budget is None else budget
    area = (len_y * len_x).clamp(min=1)
    order = torch.argsort(area, stable=True)
    ly_sorted, lx_sorted = len_y[order].tolist(), len_x[order].tolist()
    start = 0
    while start < len(order):
        ly, lx, end = max(ly_sorted[start], 1), max(lx_sorted[start], 1), start + 1
        while end < len(order):
            ny, nx = max(ly, ly_sorted[end]), max(lx, lx_sorted[end])
            if (end + 1 - start) * ny * nx * channels > budget:
                break
            ly, lx, end = ny, nx, end + 1
        yield order[start:end], ly, lx
        start = end


def crop_index(batch: Tensor, rows: Tensor, cols: Tensor, height: int, width: int) -> Tensor:
    """Flat row index into the [N * H * W, C] map for each crop cell: [B, Ly, Lx]."""
    return (batch[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]


def separable_forward(
    feat: Tensor, shape: tuple[int, int, int, int], batch: Tensor,
    rows: Tensor, wy: Tensor, len_y: Tensor, cols: Tensor, wx: Tensor, len_x: Tensor,
) -> Tensor:
    """``out[k] = Wy[k] @ F[n_k] @ Wx[k]^T`` for every box, read through crops.

    feat: [N * H * W, C] channels-last rows; rows: [K, Ly] and cols: [K, Lx] cell indices;
    wy: [K, PH, Ly] and wx: [K, PW, Lx] the weights each output row / column gives to each crop row / column.
    Returns [K, PH, PW, C].
    """
    _, channels, height, width = shape
    k, ph, pw = wy.shape[0], wy.shape[1], wx.shape[1]
    out = feat.new_zeros((k, ph, pw, channels))
    for idx, ly, lx in chunks(len_y, len_x, channels):
        flat = crop_index(batch[idx], rows[idx, :ly], cols[idx, :lx], height, width)  # [B, Ly, Lx]
        crop = feat.index_select(0, flat.reshape(-1)).reshape(*flat.shape, channels)  # [B, Ly, Lx, C]
        b = crop.shape[0]
        t = torch.bmm(wy[idx, :, :ly], crop.reshape(b, ly, lx * channels))  # [B, PH, Lx * C]
        out[idx] = torch.matmul(wx[idx, None, :, :lx], t.reshape(b, ph, lx, channels))  # [B, PH, PW, C]
    return out


def separable_backward(
    grad: Tensor, shape: tuple[int, int, int, int], batch: Tensor,
    rows: Tensor, wy: Tensor, len_y: Tensor, cols: Tensor, wx: Tensor, len_x: Tensor,
) -> Tensor:
    """The adjoint of :func:`separable_forward`: grad [K, PH, PW, C] -> [N * H * W, C].

    Each crop's gradient ``Wy^T @ grad @ Wx`` is added back into the map with ``index_add_``, which runs in a
    fixed order on the CPU: the result is the same bit for bit on every run.
    """
    n, channels, height, width = shape
    ph, pw = wy.shape[1], wx.shape[1]
    out = grad.new_zeros((n * height * width, channels))
    for idx, ly, lx in chunks(len_y, len_x, channels):
        g = grad[idx]  # [B, PH, PW, C]
        b = g.shape[0]
        t = torch.matmul(wx[idx, None, :, :lx].transpose(2, 3), g)  # [B, PH, Lx, C]
        crop = torch.bmm(wy[idx, :, :ly].transpose(1, 2), t.reshape(b, ph, lx * channels))  # [B, Ly, Lx * C]
        flat = crop_index(batch[idx], rows[idx, :ly], cols[idx, :lx], height, width)
        out.index_add_(0, flat.reshape(-1), crop.reshape(-1, channels))
    return out
