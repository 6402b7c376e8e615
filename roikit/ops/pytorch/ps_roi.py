"""Position-sensitive RoI pooling (R-FCN) in plain PyTorch: ``ps_roi_align`` and ``ps_roi_pool``.

The input has ``C = C' * PH * PW`` channels; bin (p, q) of output channel c reads only input channel
``(c * PH + p) * PW + q`` (torchvision's channel mapping), so each bin has its own score map.

``ps_roi_align``: RoIAlign's samples with ``aligned=True`` geometry (torchvision's: box shifted by -0.5 cell, no
minimum size), the mean over ``gh * gw`` samples, through the same crops as ``roi_align`` (``_crops.py``) with
the channel picked per bin. ``ps_roi_pool``: the mean of whole cells, read from summed-area tables (a map's
cumulative sums in float64), so each bin costs four reads whatever its size; the backward spreads each bin's
gradient over its cells through a difference table. Both follow the tap rules for non-finite cells (an output is
NaN or infinite only if a cell it averages is).

On CPU tensors each function first tries the numba kernels (:mod:`roikit.ops.pytorch.jit_ps`: torchvision's
arithmetic and bits, within rounding of this path's float64 means for ps_roi_pool); this path, the reference, runs
where they decline or are off.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import compute_dtype, ps_roi_pool_edges, sampling_grid
from . import jit_ps
from ._crops import FeatureRows, add_back
from .roi_align import _axis, _groups


def ps_roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         sampling_ratio: int) -> Tensor:
    """[K, C', PH, PW]."""
    n, c, h, w = input.shape
    k, pooled = rois.shape[0], (pooled_height, pooled_width)
    if k and c and input.numel():
        fast = jit_ps.ps_roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio)
        if fast is not None:  # the numba kernels (roikit.ops.pytorch.jit_ps), where they take the call
            return fast
    out = input.new_zeros((k, c // (pooled_height * pooled_width), pooled_height, pooled_width))
    if k == 0 or out.numel() == 0 or input.numel() == 0:
        return out
    feat = FeatureRows(input, compute_dtype(rois))
    sizes = sampling_grid(rois, spatial_scale, pooled, sampling_ratio, True)
    (y1, bin_h, gh), (x1, bin_w, gw) = sizes
    batch = rois[:, 0].long()
    for idx in _groups(sizes, pooled, (h, w), c, False, reads=1 if feat.finite else 6):
        ay = _axis(y1[idx], bin_h[idx], gh[idx], pooled_height, h, not feat.finite)
        ax = _axis(x1[idx], bin_w[idx], gw[idx], pooled_width, w, not feat.finite)
        value = feat.read(batch[idx], ay, ax, ps=pooled)  # [B, PH, PW, C']
        out.index_copy_(0, idx, value.permute(0, 3, 1, 2).to(out.dtype))
    return out


def ps_roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                          sampling_ratio: int, batch_size: int, channels: int, height: int, width: int) -> Tensor:
    shape = (batch_size, channels, height, width)
    if rois.shape[0] == 0 or grad.numel() == 0 or batch_size * channels * height * width == 0:
        return grad.new_zeros(shape)
    fast = jit_ps.ps_roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, shape, sampling_ratio)
    if fast is not None:
        return fast
    dtype, pooled = compute_dtype(rois), (pooled_height, pooled_width)
    sizes = sampling_grid(rois, spatial_scale, pooled, sampling_ratio, True)
    (y1, bin_h, gh), (x1, bin_w, gw) = sizes
    batch = rois[:, 0].long()
    out = grad.new_zeros((batch_size * height * width, channels), dtype=dtype)
    for idx in _groups(sizes, pooled, (height, width), channels, False, reads=1):
        ay = _axis(y1[idx], bin_h[idx], gh[idx], pooled_height, height, False)
        ax = _axis(x1[idx], bin_w[idx], gw[idx], pooled_width, width, False)
        add_back(grad[idx].permute(0, 2, 3, 1).to(dtype), out, shape, batch[idx], ay, ax, ps=pooled)
    return out.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2).to(grad.dtype).contiguous()


def _channel_of_bin(channels_out: int, pooled: tuple[int, int], device) -> Tensor:
    """Input channel of (c', p, q): [C', PH, PW]."""
    return torch.arange(channels_out * pooled[0] * pooled[1], device=device).reshape(channels_out, *pooled)


def _summed_area(values: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C, H + 1, W + 1] float64 with ``S[i, j] = sum of values[:i, :j]``."""
    s = torch.nn.functional.pad(values.to(torch.float64), (1, 0, 1, 0))
    return s.cumsum(2).cumsum(3)


def ps_roi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int) -> Tensor:
    """[K, C', PH, PW]: the mean of each bin's cells in its own channel, 0 for an empty bin."""
    n, c, h, w = input.shape
    k, pooled = rois.shape[0], (pooled_height, pooled_width)
    c_out = c // (pooled_height * pooled_width)
    if k and c_out and input.numel():
        fast = jit_ps.ps_roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width)
        if fast is not None:  # the numba kernels (roikit.ops.pytorch.jit_ps), where they take the call
            return fast
    out = input.new_zeros((k, c_out, pooled_height, pooled_width))
    if k == 0 or out.numel() == 0 or input.numel() == 0:
        return out
    (hs, he), (ws, we) = ps_roi_pool_edges(rois, spatial_scale, pooled, (h, w))  # [K, P] each
    batch = rois[:, 0].long()
    channel = _channel_of_bin(c_out, pooled, input.device)[None]  # [1, C', PH, PW]
    y0, y1 = hs[:, None, :, None], he[:, None, :, None]  # [K, 1, PH, 1]
    x0, x1 = ws[:, None, None, :], we[:, None, None, :]  # [K, 1, 1, PW]
    area = ((y1 - y0) * (x1 - x0)).to(torch.float64)
    empty = area <= 0

    def box_sums(table: Tensor) -> Tensor:  # table [N, C, H + 1, W + 1] -> [K, C', PH, PW]
        flat = table.reshape(-1)
        base = (batch[:, None, None, None] * c + channel) * ((h + 1) * (w + 1))

        def at(i, j):
            return flat[base + i * (w + 1) + j]

        return at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)

    finite = torch.isfinite(input)
    mean = box_sums(_summed_area(torch.where(finite, input, 0.0))) / torch.where(empty, 1.0, area)
    if not bool(finite.all()):
        nan = box_sums(_summed_area(torch.isnan(input).to(torch.float64))) > 0
        pos = box_sums(_summed_area((input == float("inf")).to(torch.float64))) > 0
        neg = box_sums(_summed_area((input == float("-inf")).to(torch.float64))) > 0
        mean = torch.where(pos, float("inf"), torch.where(neg, float("-inf"), mean))
        mean = torch.where(nan | (pos & neg), float("nan"), mean)
    return torch.where(empty, 0.0, mean).to(input.dtype)


def ps_roi_pool_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                         batch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Each bin's gradient / its area onto every cell it averaged (a difference table, then cumulative sums)."""
    shape = (batch_size, channels, height, width)
    if rois.shape[0] == 0 or grad.numel() == 0 or batch_size * channels * height * width == 0:
        return grad.new_zeros(shape)
    fast = jit_ps.ps_roi_pool_backward(grad, rois, spatial_scale, pooled_height, pooled_width, shape)
    if fast is not None:
        return fast
    pooled = (pooled_height, pooled_width)
    (hs, he), (ws, we) = ps_roi_pool_edges(rois, spatial_scale, pooled, (height, width))
    batch = rois[:, 0].long()
    c_out = channels // (pooled_height * pooled_width)
    channel = _channel_of_bin(c_out, pooled, grad.device)[None]
    y0, y1 = hs[:, None, :, None], he[:, None, :, None]
    x0, x1 = ws[:, None, None, :], we[:, None, None, :]
    area = ((y1 - y0) * (x1 - x0)).to(torch.float64)
    value = torch.where(area > 0, grad.to(torch.float64) / area.clamp(min=1), 0.0)  # [K, C', PH, PW]
    diff = grad.new_zeros((batch_size * channels * (height + 1) * (width + 1),), dtype=torch.float64)
    base = (batch[:, None, None, None] * channels + channel) * ((height + 1) * (width + 1))
    for i, j, sign in ((y0, x0, 1.0), (y0, x1, -1.0), (y1, x0, -1.0), (y1, x1, 1.0)):
        index = (base + i * (width + 1) + j).expand_as(value)
        diff.index_add_(0, index.reshape(-1), (sign * value).reshape(-1))
    table = diff.reshape(batch_size, channels, height + 1, width + 1).cumsum(2).cumsum(3)
    return table[:, :, :height, :width].to(grad.dtype).contiguous()


__all__ = ["ps_roi_align_forward", "ps_roi_align_backward", "ps_roi_pool_forward", "ps_roi_pool_backward"]
