"""Deformable RoI pooling (Dai et al. 2017, mmcv's ``DeformRoIPool``) in plain PyTorch: the CPU path, the fallback on
any device, and the reference for the Triton kernels.

The geometry is ``roi_align(aligned=True)``'s, with every bin moved by its own learned offset. For box k (cells,
``scale = spatial_scale``)::

    x1 = box_x1 * scale - 0.5,  roi_w = (box_x2 * scale - 0.5) - x1,  bin_w = roi_w / PW  (the same for y)
    gw = sampling_ratio, or ceil(bin_w) when it is <= 0
    bin (ph, pw) starts at  (x1 + (gamma * roi_w) * offset[k, 0, ph, pw]) + pw * bin_w   (offset[k, 1]: y, roi_h)

and averages ``gh * gw`` bilinear samples at ``start + (i + 0.5) * bin / g`` (a sample outside ``[-1, H] x
[-1, W]`` is 0, one inside is clamped to the map), as mmcv's kernel does, in its order of operations. No offset
(``None``) is roi_align with ``aligned=True``, and runs as that op.

**Each bin is a tiny RoIAlign.** With an offset the sample rows of a bin depend on the bin, not on its row alone,
so the row-times-column factorisation of ``roi_align`` holds per bin: every bin is a box of one bin, with the same
crop cells, sample runs (bisection: only the samples on the map are read), memory-bounded groups and non-finite
tap rules as ``roi_align`` (see ``roi_align.py`` and ``_crops.py``). A bin's value is ``sum (Wy (x) Wx) * crop``:
one fused weighted gather (``embedding_bag``) per group of bins on a finite map.

**Gradients.** Features: the transpose of the forward (one ``index_add_`` per group, a fixed order). Offsets: the
derivative of the forward, bin by bin: ``d out / d offset_x = gamma * roi_w * sum_c grad_c * (Wy @ F_c @ Sx^T)``,
where ``Sx`` holds each sample's slope weights (-1 on its low tap, +1 on its high tap, divided by ``gw``), 0 where
the forward holds the edge value: a sample before the first cell centre (``x < 0``) or at or past the last one
(``x >= W - 1``), or off the map. mmcv's CUDA kernel differentiates the unclamped bilinear formula instead, so in
those border bands its offset gradient is not its forward's derivative; inside the map both agree. A bin that reads
a non-finite cell (any of its samples' taps, in any channel) has a NaN offset gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import MAX_CELLS, compute_dtype, sample_coord, sampling_grid
from ._crops import BOX_SLICE, Axis, FeatureRows, crop_index
from .roi_align import _groups, _samples, roi_align_backward, roi_align_forward

MAX_START = 2.0**60  # a box corner moved by an offset, in cells, is clamped to +-2^60 (NaN: off the map)


def box_extents(rois: Tensor, spatial_scale: float) -> tuple[Tensor, Tensor]:
    """``roi_h, roi_w`` [K]: the box's height and width in cells, which scale its offsets (mmcv's order)."""
    r = rois.to(compute_dtype(rois))
    x1, y1, x2, y2 = ((r[:, i] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS) - 0.5 for i in range(1, 5))
    return y2 - y1, x2 - x1


def bin_starts(rois: Tensor, offset: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int,
               gamma: float):
    """Per axis (y, then x): each bin's start [K, PH, PW], and the box's bin size and samples per bin [K]."""
    (y1, bin_h, gh), (x1, bin_w, gw) = sampling_grid(rois, spatial_scale, pooled, sampling_ratio, True)
    roi_h, roi_w = box_extents(rois, spatial_scale)
    off = offset.to(y1.dtype)
    p = torch.arange(pooled[0], device=rois.device).to(y1.dtype)[None, :, None]
    q = torch.arange(pooled[1], device=rois.device).to(y1.dtype)[None, None, :]
    # the box's corner moved by each bin's offset, clamped (an overflowing offset, inf * 0 = NaN, goes off the map)
    corner_y = (y1[:, None, None] + (gamma * roi_h)[:, None, None] * off[:, 1])
    corner_x = (x1[:, None, None] + (gamma * roi_w)[:, None, None] * off[:, 0])
    corner_y, corner_x = (torch.nan_to_num(c, nan=MAX_START).clamp(-MAX_START, MAX_START) for c in (corner_y, corner_x))
    return (corner_y + p * bin_h[:, None, None], bin_h, gh), (corner_x + q * bin_w[:, None, None], bin_w, gw)


def _bin_axis(start: Tensor, bin_size: Tensor, grid: Tensor, length: int, with_taps: bool, with_slope: bool):
    """What a group of bins (each a box of one bin, ``start`` [B]) reads along one axis: an :class:`Axis` (cells
    [B, L], the mean's weights [B, 1, L], and the tap matrices with ``with_taps``) and, with ``with_slope``, the
    slope weights [B, 1, L] (the derivative of the weights with respect to the bin's start).

    Cells are the bin's contiguous span or its samples' two taps listed one after the other, whichever is shorter
    (at most ``length`` cells, or 2 per sample on the map).
    """
    b = start.shape[0]
    index, _, valid, low, high, w_low, w_high = _samples(start, bin_size, grid, 1, length, False)  # [B, 1, M]
    m = low.shape[2]
    first = torch.where(valid, low, length).flatten(1).amin(dim=1) if m else start.new_zeros(b, dtype=torch.int64)
    last = torch.where(valid, high, -1).flatten(1).amax(dim=1) if m else start.new_full((b,), -1, dtype=torch.int64)
    first = torch.where(last >= 0, first, 0)
    span = (last - first + 1).clamp(min=1)  # [B]
    taps = 2 * m
    listed = span > taps
    size = max(int(torch.where(listed, taps, span).max()), 1) if b else 1
    contiguous = (first[:, None] + torch.arange(size, device=start.device)).clamp(max=length - 1)  # [B, L]
    by_sample = torch.stack([low, high], dim=-1).reshape(b, taps)
    cells = torch.where(listed[:, None], torch.nn.functional.pad(by_sample, (0, max(size - taps, 0)))[:, :size],
                        contiguous)
    s = torch.arange(m, device=start.device).reshape(1, 1, m)
    pos_low = torch.where(listed[:, None, None], 2 * s, low - first[:, None, None])
    pos_high = torch.where(listed[:, None, None], 2 * s + 1, high - first[:, None, None])
    pos_low = torch.where(valid, pos_low, 0).clamp(0, size - 1)  # invalid samples carry weight 0 and no tap
    pos_high = torch.where(valid, pos_high, 0).clamp(0, size - 1)

    inv = 1.0 / grid.clamp(min=1).to(start.dtype)[:, None, None]

    def scatter(low_values: Tensor, high_values: Tensor) -> Tensor:
        out = start.new_zeros((b, 1, size))
        out.scatter_add_(2, pos_low, low_values.to(start.dtype))
        out.scatter_add_(2, pos_high, high_values.to(start.dtype))
        return out

    axis = Axis(cells, scatter(w_low * inv, w_high * inv))
    if with_taps:
        axis = Axis(cells, axis.weight, scatter(valid, valid) > 0, scatter(valid & (w_low == 0), valid & (w_high == 0))
                    > 0)
    if not with_slope:
        return axis, None
    coord = sample_coord(start[:, None, None], bin_size[:, None, None], grid[:, None, None],
                         torch.zeros((), device=start.device), index)
    # the weights move with the sample only between the first and the last cell centre (elsewhere it is clamped)
    moving = (valid & (coord >= 0) & (high > low)).to(start.dtype) * inv
    return axis, scatter(-moving, moving)


def _bin_weights(y: Tensor, x: Tensor) -> Tensor:
    """Each bin's weight on each cell of its crop, ``wy (x) wx``: [B, Ly * Lx]."""
    return (y[:, 0, :, None] * x[:, 0, None, :]).flatten(1)


def _read(rows: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """``sum_l weight[b, l] * rows[index[b, l]]`` for every bin: [B, C] (one fused gather, no crop in memory)."""
    return torch.nn.functional.embedding_bag(index.flatten(1), rows, per_sample_weights=weight.to(rows.dtype),
                                             mode="sum")


def _bins(rois: Tensor, offset: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int,
          gamma: float):
    """The bins of a slice of boxes as boxes of their own, flattened to [B = K * PH * PW]: sizes for ``_groups``
    ``((start_y, bin_h, gh), (start_x, bin_w, gw))`` and each bin's box index."""
    (sy, bin_h, gh), (sx, bin_w, gw) = bin_starts(rois, offset, spatial_scale, pooled, sampling_ratio, gamma)
    bins = pooled[0] * pooled[1]

    def per_bin(v: Tensor) -> Tensor:
        return v.repeat_interleave(bins)

    sizes = ((sy.reshape(-1), per_bin(bin_h), per_bin(gh)), (sx.reshape(-1), per_bin(bin_w), per_bin(gw)))
    return sizes, torch.arange(rois.shape[0], device=rois.device).repeat_interleave(bins)


def _slices(count: int, bins: int):
    """Slices of boxes holding at most about ``BOX_SLICE`` bins (at least one box)."""
    step = max(BOX_SLICE // max(bins, 1), 1)
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


def deform_roi_pool_forward(input: Tensor, rois: Tensor, offset: Tensor | None, spatial_scale: float,
                            pooled_height: int, pooled_width: int, sampling_ratio: int, gamma: float) -> Tensor:
    """[K, C, PH, PW]; ``offset`` [K, 2, PH, PW] (x, then y, in units of the box's width and height times gamma)
    or None."""
    pooled = (pooled_height, pooled_width)
    if offset is None:
        return roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, True,
                                 False)[0]
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_zeros((k, c, pooled_height, pooled_width))
    if k == 0 or input.numel() == 0:
        return out
    feat = FeatureRows(input, compute_dtype(rois))
    bins = pooled_height * pooled_width
    for sl in _slices(k, bins):
        sizes, box = _bins(rois[sl], offset[sl], spatial_scale, pooled, sampling_ratio, gamma)
        (sy, bin_h, gh), (sx, bin_w, gw) = sizes
        batch = rois[sl, 0].long()[box]
        values = out.new_empty((box.shape[0], c))  # [K' * PH * PW, C]: the slice's bins, one row each
        for idx in _groups(sizes, (1, 1), (h, w), c, False, reads=1 if feat.finite else 6):
            ay, _ = _bin_axis(sy[idx], bin_h[idx], gh[idx], h, not feat.finite, False)
            ax, _ = _bin_axis(sx[idx], bin_w[idx], gw[idx], w, not feat.finite, False)
            if feat.finite:
                index = crop_index(batch[idx], ay.cells, ax.cells, h, w)
                value = _read(feat.rows, index, _bin_weights(ay.weight, ax.weight))
            else:  # the tap rules for non-finite cells
                value = feat.read(batch[idx], ay, ax)[:, 0, 0]
            values.index_copy_(0, idx, value.to(out.dtype))
        out[sl] = values.reshape(-1, pooled_height, pooled_width, c).permute(0, 3, 1, 2)
    return out


def deform_roi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, offset: Tensor | None, spatial_scale: float,
                             pooled_height: int, pooled_width: int, sampling_ratio: int, gamma: float,
                             offset_grad: bool) -> tuple[Tensor, Tensor]:
    """Gradients with respect to the features [N, C, H, W] and, with ``offset_grad`` (and an offset), the offset
    [K, 2, PH, PW] (else an empty tensor)."""
    n, c, h, w = input.shape
    shape = (n, c, h, w)
    pooled = (pooled_height, pooled_width)
    offset_grad = offset_grad and offset is not None
    grad_offset = (offset.new_zeros(offset.shape) if offset_grad else grad.new_zeros((0,)))
    if offset is None:
        empty = torch.empty((0,), dtype=torch.int64, device=grad.device)
        return roi_align_backward(grad, rois, empty, spatial_scale, pooled_height, pooled_width, n, c, h, w,
                                  sampling_ratio, True, False), grad_offset
    if rois.shape[0] == 0 or input.numel() == 0:
        return grad.new_zeros(shape), grad_offset
    dtype = compute_dtype(rois)
    feat = FeatureRows(input, dtype) if offset_grad else None
    gin = grad.new_zeros((n * h * w, c), dtype=dtype)
    bins = pooled_height * pooled_width
    for sl in _slices(rois.shape[0], bins):
        sizes, box = _bins(rois[sl], offset[sl], spatial_scale, pooled, sampling_ratio, gamma)
        (sy, bin_h, gh), (sx, bin_w, gw) = sizes
        batch = rois[sl, 0].long()[box]
        roi_h, roi_w = box_extents(rois[sl], spatial_scale)
        g_slice, o_slice = grad[sl], grad_offset[sl] if offset_grad else None
        reads = 1 if not offset_grad else (3 if feat.finite else 8)
        for idx in _groups(sizes, (1, 1), (h, w), c, False, reads=reads):
            ay, slope_y = _bin_axis(sy[idx], bin_h[idx], gh[idx], h, False, offset_grad)
            ax, slope_x = _bin_axis(sx[idx], bin_w[idx], gw[idx], w, False, offset_grad)
            k_, p = box[idx], idx % bins
            g = g_slice[k_, :, p // pooled_width, p % pooled_width].to(dtype)  # [B, C]
            index = crop_index(batch[idx], ay.cells, ax.cells, h, w).flatten(1)  # [B, Ly * Lx]
            weight = _bin_weights(ay.weight, ax.weight)
            gin.index_add_(0, index.reshape(-1), (weight[:, :, None] * g[:, None, :]).reshape(-1, c))
            if not offset_grad:
                continue
            d_x = (_read(feat.rows, index, _bin_weights(ay.weight, slope_x)) * g).sum(dim=1)  # [B]
            d_y = (_read(feat.rows, index, _bin_weights(slope_y, ax.weight)) * g).sum(dim=1)
            if not feat.finite:  # a bin that reads a non-finite cell: NaN (its taps, as the forward reads them)
                ty, _ = _bin_axis(sy[idx], bin_h[idx], gh[idx], h, True, False)
                tx, _ = _bin_axis(sx[idx], bin_w[idx], gw[idx], w, True, False)
                bad = ~torch.isfinite(feat.read(batch[idx], ty, tx)[:, 0, 0]).all(dim=1)
                d_x, d_y = (torch.where(bad, float("nan"), d) for d in (d_x, d_y))
            o_slice[k_, 0, p // pooled_width, p % pooled_width] = (gamma * roi_w[k_] * d_x).to(o_slice.dtype)
            o_slice[k_, 1, p // pooled_width, p % pooled_width] = (gamma * roi_h[k_] * d_y).to(o_slice.dtype)
    grad_input = gin.reshape(n, h, w, c).permute(0, 3, 1, 2).to(grad.dtype).contiguous()
    return grad_input, grad_offset


__all__ = ["deform_roi_pool_forward", "deform_roi_pool_backward", "bin_starts", "box_extents", "MAX_START"]
