"""RoIAlign in plain PyTorch: the CPU path, the fallback on any device, and the reference for the kernels.

Bin (ph, pw) of box k averages (or, with ``pool="max"``, takes the largest of) ``gh * gw`` bilinear samples at

    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh,    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw

with torchvision's conventions: ``y1 = box_y1 * scale - 0.5`` when aligned, a box at least 1 cell wide when not
aligned, ``gh = sampling_ratio`` or ``ceil(bin_h)`` when it is <= 0, a sample outside ``[-1, H] x [-1, W]`` is 0,
one inside is clamped to the map.

A bilinear sample's weight on cell (i, j) is ``a(y, i) * b(x, j)``: it factors into a row part and a column
part, and so does the rule that zeroes outside samples. So every bin is ``Wy[ph] @ F @ Wx[pw]^T`` with
``Wy[k, ph, i] = sum_iy a(y, i) / gh``: two small matrices per box instead of 4 * gh * gw reads per bin and
channel (see ``_crops.py``). Max pooling needs each sample's value, so it uses the per-sample rows of Wy and Wx.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._crops import channels_last_rows, compute_dtype, separable_backward, separable_forward



def sampling_grid(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool):
    """Per box and axis (y, then x): the start, the bin size and the samples per bin, each [K], computed in
    torchvision's order of operations. Sample ``i`` of bin ``p`` lies at ``start + p * bin + (i + 0.5) * bin / g``."""
    r = rois.to(compute_dtype(rois))
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (r[:, i] * spatial_scale - offset for i in range(1, 5))  # [K] each
    width, height = x2 - x1, y2 - y1
    if not aligned:  # force malformed boxes to 1 x 1 (torchvision's legacy rule)
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    bin_h, bin_w = height / pooled[0], width / pooled[1]
    if sampling_ratio > 0:
        gh = torch.full_like(bin_h, sampling_ratio, dtype=torch.int64)
        gw = torch.full_like(bin_w, sampling_ratio, dtype=torch.int64)
    else:
        gh, gw = torch.ceil(bin_h).long(), torch.ceil(bin_w).long()
    return (y1, bin_h, gh), (x1, bin_w, gw)


def _axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, length: int):
    """Bilinear taps of every sample along one axis.

    Returns ``low, high`` cell indices and ``w_low, w_high`` weights, each [K, P, G] (G = the largest grid;
    samples past a box's own grid get weight 0), and ``valid`` [K, P, G].
    """
    g_max = max(int(grid.max()), 1) if grid.numel() else 1
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)
    i = torch.arange(g_max, device=start.device)
    g = grid.clamp(min=1).to(start.dtype)[:, None, None]
    # torchvision: start + p * bin + ((i + 0.5) * bin) / grid, in this order
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) + (
        (i.to(start.dtype) + 0.5)[None, None, :] * bin_size[:, None, None]
    ) / g  # [K, P, G]
    valid = (i[None, None, :] < grid[:, None, None]) & (coord >= -1.0) & (coord <= length)
    coord = coord.clamp(min=0.0)
    low = coord.long()  # truncation, as (int) in C; coord >= 0 here
    at_end = low >= length - 1
    low = torch.where(at_end, torch.full_like(low, length - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(coord), coord - low.to(coord.dtype))
    w_low = torch.where(valid, 1.0 - frac, torch.zeros_like(frac))
    w_high = torch.where(valid, frac, torch.zeros_like(frac))
    return low, high, w_low, w_high, valid


def _axis_taps(start, bin_size, grid, pooled: int, length: int, per_sample: bool):
    """Cells one axis reads and the weight each output row (or each sample) gives them.

    Returns ``cells`` [K, L] (valid cell indices), ``weight`` [K, R, L] with R = P (averaged over the samples of a
    bin) or R = P * G (one row per sample, for max pooling), and ``lengths`` [K] (used part of L per box).

    A box reads its contiguous span of cells or, when that is longer, the two taps of each of its samples listed
    one after the other (a big box with few samples): whichever is shorter.
    """
    k = start.shape[0]
    low, high, w_low, w_high, valid = _axis_samples(start, bin_size, grid, pooled, length)  # [K, P, G]
    g_max = low.shape[2]
    first = torch.where(valid, low, torch.full_like(low, length)).amin(dim=(1, 2))  # [K]
    last = torch.where(valid, high, torch.full_like(high, -1)).amax(dim=(1, 2))  # [K]
    first = torch.where(last >= 0, first, torch.zeros_like(first))
    span = (last - first + 1).clamp(min=1)  # [K] contiguous cells first..last
    taps = 2 * pooled * g_max  # sample s = p * G + i has its taps at 2 * s and 2 * s + 1
    listed = span > taps  # [K]
    lengths = torch.where(listed, torch.full_like(span, taps), span)
    size = int(lengths.max())

    contiguous = (first[:, None] + torch.arange(size, device=start.device)).clamp(max=length - 1)  # [K, L]
    by_sample = torch.stack([low, high], dim=-1).reshape(k, taps)  # [K, 2 * P * G]
    cells = torch.where(listed[:, None], torch.nn.functional.pad(by_sample, (0, max(size - taps, 0)))[:, :size],
                        contiguous)
    s = torch.arange(pooled * g_max, device=start.device).reshape(1, pooled, g_max)
    pos_low = torch.where(listed[:, None, None], 2 * s, low - first[:, None, None])  # [K, P, G]
    pos_high = torch.where(listed[:, None, None], 2 * s + 1, high - first[:, None, None])
    pos_low = torch.where(valid, pos_low, 0).clamp(0, size - 1)  # invalid samples carry weight 0
    pos_high = torch.where(valid, pos_high, 0).clamp(0, size - 1)

    if per_sample:  # one row per sample: [K, P * G, L]
        weight = start.new_zeros((k, pooled * g_max, size))
        weight.scatter_add_(2, pos_low.reshape(k, -1, 1), w_low.reshape(k, -1, 1))
        weight.scatter_add_(2, pos_high.reshape(k, -1, 1), w_high.reshape(k, -1, 1))
    else:  # the mean over the bin's samples: [K, P, L]
        g = grid.clamp(min=1).to(start.dtype)[:, None, None]
        weight = start.new_zeros((k, pooled, size))
        weight.scatter_add_(2, pos_low, w_low / g)
        weight.scatter_add_(2, pos_high, w_high / g)
    return cells, weight, lengths


def _taps(input_shape, rois, spatial_scale, pooled, sampling_ratio, aligned, per_sample):
    _, _, height, width = input_shape
    (y1, bin_h, gh), (x1, bin_w, gw) = sampling_grid(rois, spatial_scale, pooled, sampling_ratio, aligned)
    rows, wy, len_y = _axis_taps(y1, bin_h, gh, pooled[0], height, per_sample)
    cols, wx, len_x = _axis_taps(x1, bin_w, gw, pooled[1], width, per_sample)
    return (rows, wy, len_y, gh), (cols, wx, len_x, gw)


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                      sampling_ratio: int, aligned: bool, pool_max: bool) -> tuple[Tensor, Tensor]:
    """Returns ``output`` [K, C, PH, PW] and, for max pooling, ``argmax`` [K, C, PH, PW] (the sample's
    ``iy * gw + ix`` within its bin, -1 for a bin with no sample); an empty argmax for average pooling."""
    n, c, h, w = input.shape
    k, pooled = rois.shape[0], (pooled_height, pooled_width)
    dtype = compute_dtype(rois)
    if k == 0:
        empty = input.new_zeros((0, c, pooled_height, pooled_width))
        return empty, torch.zeros((0, c, pooled_height, pooled_width) if pool_max else (0,), dtype=torch.int64)
    feat = channels_last_rows(input, dtype)  # [N * H * W, C]
    batch = rois[:, 0].long()
    (rows, wy, len_y, gh), (cols, wx, len_x, gw) = _taps(input.shape, rois, spatial_scale, pooled, sampling_ratio,
                                                          aligned, pool_max)
    if not pool_max:
        out = separable_forward(feat, input.shape, batch, rows, wy, len_y, cols, wx, len_x)  # [K, PH, PW, C]
        return out.permute(0, 3, 1, 2).to(input.dtype).contiguous(), torch.zeros((0,), dtype=torch.int64)

    # max: every sample's value, then the largest per bin (the first one on ties, iy-major)
    samples = separable_forward(feat, input.shape, batch, rows, wy, len_y, cols, wx, len_x)  # [K, PH*Gy, PW*Gx, C]
    g_y, g_x = wy.shape[1] // pooled_height, wx.shape[1] // pooled_width
    iy = torch.arange(g_y, device=rois.device)[None, :] < gh[:, None]  # [K, Gy]
    ix = torch.arange(g_x, device=rois.device)[None, :] < gw[:, None]  # [K, Gx]
    samples = samples.reshape(k, pooled_height, g_y, pooled_width, g_x, c)
    real = iy[:, None, :, None, None, None] & ix[:, None, None, None, :, None]
    samples = samples.masked_fill(~real, float("-inf"))
    samples = samples.permute(0, 5, 1, 3, 2, 4).reshape(k, c, pooled_height, pooled_width, g_y * g_x)
    value, arg = samples.max(dim=-1)  # [K, C, PH, PW]
    empty = ((gh <= 0) | (gw <= 0))[:, None, None, None].expand_as(value)  # no sample at all: 0
    value = value.masked_fill(empty, 0.0)
    # sample index within its own bin: iy * gw + ix
    arg = (arg // g_x) * gw[:, None, None, None] + arg % g_x
    arg = arg.masked_fill(empty, -1)
    return value.to(input.dtype).contiguous(), arg


def roi_align_backward(grad: Tensor, rois: Tensor, argmax: Tensor, spatial_scale: float, pooled_height: int,
                       pooled_width: int, batch_size: int, channels: int, height: int, width: int,
                       sampling_ratio: int, aligned: bool, pool_max: bool) -> Tensor:
    """Gradient with respect to the features, [N, C, H, W]."""
    shape = (batch_size, channels, height, width)
    dtype = compute_dtype(rois)
    if rois.shape[0] == 0:
        return grad.new_zeros(shape)
    pooled = (pooled_height, pooled_width)
    batch = rois[:, 0].long()
    (rows, wy, len_y, gh), (cols, wx, len_x, gw) = _taps(shape, rois, spatial_scale, pooled, sampling_ratio,
                                                          aligned, pool_max)
    g = grad.permute(0, 2, 3, 1).to(dtype)  # [K, PH, PW, C]
    if pool_max:
        # spread each bin's gradient onto its winning sample only: a one-hot over the samples of the bin
        k = rois.shape[0]
        g_y, g_x = wy.shape[1] // pooled_height, wx.shape[1] // pooled_width
        arg = argmax.permute(0, 2, 3, 1)  # [K, PH, PW, C]
        a = arg.clamp(min=0)
        gw1 = gw.clamp(min=1)[:, None, None, None]  # a box with no sample has no winner (arg -1)
        slot = (a // gw1) * g_x + a % gw1  # iy * Gx + ix
        one_hot = g.new_zeros((k, pooled_height, pooled_width, channels, g_y * g_x))
        one_hot.scatter_(4, slot.unsqueeze(-1), torch.where(arg >= 0, g, 0.0).unsqueeze(-1))
        one_hot = one_hot.reshape(k, pooled_height, pooled_width, channels, g_y, g_x)
        g = one_hot.permute(0, 1, 4, 2, 5, 3).reshape(k, pooled_height * g_y, pooled_width * g_x, channels)
    out = separable_backward(g, shape, batch, rows, wy, len_y, cols, wx, len_x)  # [N * H * W, C]
    return out.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2).to(grad.dtype).contiguous()
