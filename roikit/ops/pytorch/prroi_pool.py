"""Precise RoI Pooling (Jiang et al. 2018, IoU-Net) in plain PyTorch.

The feature map is read as a continuous surface: bilinear interpolation between cell values, with the value of
cell (i, j) at the point (y, x) = (i, j) in feature units (or (i + 0.5, j + 0.5) in box units when ``aligned``), and
0 beyond the map. Bin (ph, pw) of a box is the exact integral of that surface over the bin divided by the bin's
area; no sampling, no rounding. A box of zero or negative width or height gives 0.

The surface is ``sum_ij F[i, j] hat(y - i) hat(x - j)`` with ``hat(t) = max(0, 1 - |t|)``, so the integral over
``[y0, y1] x [x0, x1]`` factors into ``Wy[i] * Wx[j]`` with ``Wy[i] = (HAT(y1 - i) - HAT(y0 - i)) / (y1 - y0)``,
where ``HAT`` is the integral of ``hat``: every bin is ``Wy @ F @ Wx^T`` (see ``_crops.py``). The weights are
smooth in the box coordinates, so their gradient gives the gradient with respect to the box.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._crops import channels_last_rows, compute_dtype, chunks, crop_index, separable_backward, separable_forward


def hat_integral(t: Tensor) -> Tensor:
    """``HAT(t) = integral of max(0, 1 - |u|) du from -inf to t``: 0 below -1, 1 above 1, quadratic between."""
    t = t.clamp(-1.0, 1.0)
    return torch.where(t < 0, 0.5 * (t + 1) ** 2, 1.0 - 0.5 * (1 - t) ** 2)


def _axis_weights(start: Tensor, end: Tensor, pooled: int, length: int, with_grad: bool = False):
    """Weights [K, P, L] of the cells ``first + l`` of one axis, the cell indices [K, L] and used lengths [K].

    With ``with_grad``, also the derivatives of the weights with respect to ``start`` and ``end`` ([K, P, L] each):
    ``W = A / b`` with ``A = HAT(hi - i) - HAT(lo - i)``, ``lo = s + p b``, ``hi = lo + b``, ``b = (e - s) / P``, and
    ``HAT' = hat``.
    """
    size = (end - start).clamp(min=0.0)  # reversed boxes integrate over nothing
    bin_size = size / pooled  # [K]
    first = torch.floor(start).long().clamp(0, length - 1)  # the hat of cell i reaches (i - 1, i + 1)
    last = torch.ceil(start + size).long().clamp(0, length - 1)
    lengths = (last - first + 1).clamp(min=1)
    span = int(lengths.max()) if lengths.numel() else 1
    offsets = first[:, None] + torch.arange(span, device=start.device)  # [K, L]
    cells = offsets.clamp(max=length - 1)
    real = ((offsets <= last[:, None])[:, None, :] & (bin_size > 0)[:, None, None])  # [K, 1, L]
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]  # [1, P, 1]
    b = torch.where(bin_size > 0, bin_size, torch.ones_like(bin_size))[:, None, None]  # [K, 1, 1]
    lo = start[:, None, None] + p * b  # [K, P, 1] bin edges
    hi = lo + b
    i = cells.to(start.dtype)[:, None, :]  # [K, 1, L]
    area = hat_integral(hi - i) - hat_integral(lo - i)  # [K, P, L]
    zero = torch.zeros_like(area)
    weight = torch.where(real, area / b, zero)
    if not with_grad:
        return cells, weight, lengths
    hat_hi = (1 - (hi - i).abs()).clamp(min=0)
    hat_lo = (1 - (lo - i).abs()).clamp(min=0)
    # d lo / d s = 1 - p / P, d hi / d s = 1 - (p + 1) / P, d b / d s = -1 / P; d / d e: p / P, (p + 1) / P, 1 / P
    d_start = (hat_hi * (1 - (p + 1) / pooled) - hat_lo * (1 - p / pooled)) / b + area / b**2 / pooled
    d_end = (hat_hi * ((p + 1) / pooled) - hat_lo * (p / pooled)) / b - area / b**2 / pooled
    return cells, weight, lengths, torch.where(real, d_start, zero), torch.where(real, d_end, zero)


def _weights(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], size: tuple[int, int], aligned: bool,
             with_grad: bool = False):
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    return (_axis_weights(y1, y2, pooled[0], size[0], with_grad), _axis_weights(x1, x2, pooled[1], size[1], with_grad))



def prroi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                       aligned: bool) -> Tensor:
    n, c, h, w = input.shape
    if rois.shape[0] == 0:
        return input.new_zeros((0, c, pooled_height, pooled_width))
    dtype = compute_dtype(rois)
    r = rois.to(dtype)
    (rows, wy, len_y), (cols, wx, len_x) = _weights(r, spatial_scale, (pooled_height, pooled_width), (h, w), aligned)
    out = separable_forward(channels_last_rows(input, dtype), input.shape, r[:, 0].long(), rows, wy, len_y, cols, wx,
                            len_x)  # [K, PH, PW, C]
    return out.permute(0, 3, 1, 2).to(input.dtype).contiguous()


def prroi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int, aligned: bool) -> tuple[Tensor, Tensor]:
    """Gradients with respect to the features [N, C, H, W] and to the boxes [K, 5] (0 for the batch index)."""
    n, c, h, w = input.shape
    if rois.shape[0] == 0:
        return torch.zeros_like(input), torch.zeros_like(rois)
    dtype = compute_dtype(rois)
    r = rois.to(dtype)
    (rows, wy, len_y, dy1, dy2), (cols, wx, len_x, dx1, dx2) = _weights(
        r, spatial_scale, (pooled_height, pooled_width), (h, w), aligned, with_grad=True)
    batch = r[:, 0].long()
    g = grad.permute(0, 2, 3, 1).to(dtype)  # [K, PH, PW, C]
    feat = channels_last_rows(input, dtype)
    grad_input = separable_backward(g, input.shape, batch, rows, wy, len_y, cols, wx, len_x)

    # out[k, p, q] = sum_lj Wy[p, l] F[l, j] Wx[q, j], so d loss / d Wy[p, l] = sum_qj grad[p, q] F[l, j] Wx[q, j]
    grad_wy, grad_wx = torch.zeros_like(wy), torch.zeros_like(wx)
    for idx, ly, lx in chunks(len_y, len_x, c):
        flat = crop_index(batch[idx], rows[idx, :ly], cols[idx, :lx], h, w)
        crop = feat.index_select(0, flat.reshape(-1)).reshape(*flat.shape, c)  # [B, Ly, Lx, C]
        gb = g[idx]  # [B, PH, PW, C]
        gx = torch.matmul(wx[idx, None, :, :lx].transpose(2, 3), gb)  # [B, PH, Lx, C] = sum_q grad[p, q] Wx[q, j]
        grad_wy[idx, :, :ly] = torch.einsum("bpjc,bljc->bpl", gx, crop)
        t = torch.einsum("bpl,bljc->bpjc", wy[idx, :, :ly], crop)  # [B, PH, Lx, C] = sum_l Wy[p, l] F[l, j]
        grad_wx[idx, :, :lx] = torch.einsum("bpqc,bpjc->bqj", gb, t)
    grad_rois = torch.zeros_like(r)
    for column, (gw, dw) in zip((1, 2, 3, 4), ((grad_wx, dx1), (grad_wy, dy1), (grad_wx, dx2), (grad_wy, dy2))):
        grad_rois[:, column] = (gw * dw).sum(dim=(1, 2)) * spatial_scale
    grad_input = grad_input.reshape(n, h, w, c).permute(0, 3, 1, 2).to(input.dtype).contiguous()
    return grad_input, grad_rois.to(rois.dtype)
