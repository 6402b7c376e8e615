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

from ..geometry import MAX_CELLS, compute_dtype, hat_mean
from ._crops import Axis, FeatureRows, add_back, box_slices, crop_index, groups


def _axis_weights(start: Tensor, end: Tensor, pooled: int, length: int, with_grad: bool = False):
    """The :class:`Axis` of one axis (float64 weights [B, P, L] of the cells ``first + l``), and with ``with_grad``
    the derivatives of the weights with respect to ``start`` and ``end`` ([B, P, L] each).

    ``W[p, i]`` is the mean of cell i's tent over bin p: ``[lo, hi]`` with ``lo = s + p b``, ``hi = lo + b`` and
    ``b = (e - s) / P``; so ``dW/ds = dW/dlo (1 - p / P) + dW/dhi (1 - (p + 1) / P)`` and
    ``dW/de = dW/dlo p / P + dW/dhi (p + 1) / P``.
    """
    size = (end - start).clamp(min=0.0)  # reversed boxes integrate over nothing
    bin_size = size / pooled  # [B]
    first = torch.floor(start).clamp(0, length - 1).long()  # the tent of cell i reaches (i - 1, i + 1)
    last = torch.ceil(start + size).clamp(0, length - 1).long()
    lengths = (last - first + 1).clamp(min=1)
    span = int(lengths.max()) if lengths.numel() else 1
    offsets = first[:, None] + torch.arange(span, device=start.device)  # [B, L]
    cells = offsets.clamp(max=length - 1)
    real = ((offsets <= last[:, None])[:, None, :] & (bin_size > 0)[:, None, None])  # [B, 1, L]
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]  # [1, P, 1]
    b = torch.where(bin_size > 0, bin_size, torch.ones_like(bin_size))[:, None, None]  # [B, 1, 1]
    lo = start[:, None, None] + p * b  # [B, P, 1] bin edges
    hi = torch.minimum(lo + b, torch.maximum(end[:, None, None], lo))  # the last edge exactly at the box's end
    i = cells.to(start.dtype)[:, None, :]  # [B, 1, L]
    mean, d_lo, d_hi = hat_mean(lo - i, hi - i)  # [B, P, L]
    weight = torch.where(real, mean, 0.0)
    axis = Axis(cells, weight)
    if not with_grad:
        return axis
    d_start = d_lo * (1 - p / pooled) + d_hi * (1 - (p + 1) / pooled)
    d_end = d_lo * (p / pooled) + d_hi * ((p + 1) / pooled)
    return axis, torch.where(real, d_start, 0.0), torch.where(real, d_end, 0.0)


def _box_edges(rois: Tensor, spatial_scale: float, aligned: bool) -> list[Tensor]:
    """x1, y1, x2, y2 in cells, float64 (the float32 product of a tiny scale would round a small box away)."""
    offset = 0.5 if aligned else 0.0
    r = rois.to(torch.float64)
    return [(r[:, i] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS) - offset for i in range(1, 5)]


def _box_groups(edges: list[Tensor], pooled: tuple[int, int], size: tuple[int, int], channels: int):
    x1, y1, x2, y2 = edges
    ly = (torch.ceil(y2) - torch.floor(y1) + 1).clamp(1, size[0])
    lx = (torch.ceil(x2) - torch.floor(x1) + 1).clamp(1, size[1])
    cost = 24 * (pooled[0] * ly + pooled[1] * lx) + 4 * ly * lx * channels + 4 * pooled[0] * pooled[1] * channels
    return groups(cost.long())


def prroi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                       aligned: bool) -> Tensor:
    n, c, h, w = input.shape
    out = input.new_zeros((rois.shape[0], c, pooled_height, pooled_width))
    if rois.shape[0] == 0 or input.numel() == 0:
        return out
    feat = FeatureRows(input, compute_dtype(rois))
    for sl in box_slices(rois.shape[0]):  # every per-box intermediate is bounded by the slice
        x1, y1, x2, y2 = edges = _box_edges(rois[sl], spatial_scale, aligned)
        batch = rois[sl, 0].long()
        for idx in _box_groups(edges, (pooled_height, pooled_width), (h, w), c):
            ay = _axis_weights(y1[idx], y2[idx], pooled_height, h)
            ax = _axis_weights(x1[idx], x2[idx], pooled_width, w)
            out[sl].index_copy_(0, idx, feat.read(batch[idx], ay, ax).permute(0, 3, 1, 2).to(out.dtype))
    return out


def prroi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int, aligned: bool) -> tuple[Tensor, Tensor]:
    """Gradients with respect to the features [N, C, H, W] and to the boxes [K, 5] (0 for the batch index)."""
    n, c, h, w = input.shape
    if rois.shape[0] == 0 or input.numel() == 0:
        return torch.zeros_like(input, memory_format=torch.contiguous_format), torch.zeros_like(rois)
    dtype = compute_dtype(rois)
    feat = FeatureRows(input, dtype)
    grad_input = input.new_zeros((n * h * w, c), dtype=dtype)
    grad_rois = torch.zeros(rois.shape, dtype=torch.float64, device=rois.device)
    for sl in box_slices(rois.shape[0]):
        _backward_slice(grad[sl], feat, rois[sl], spatial_scale, (pooled_height, pooled_width), aligned, grad_input,
                        grad_rois[sl])
    grad_input = grad_input.reshape(n, h, w, c).permute(0, 3, 1, 2).to(input.dtype).contiguous()
    return grad_input, grad_rois.to(rois.dtype)


def _backward_slice(grad: Tensor, feat: FeatureRows, rois: Tensor, spatial_scale: float, pooled: tuple[int, int],
                    aligned: bool, grad_input: Tensor, grad_rois: Tensor) -> None:
    n, c, h, w = feat.shape
    pooled_height, pooled_width = pooled
    dtype = feat.rows.dtype
    x1, y1, x2, y2 = edges = _box_edges(rois, spatial_scale, aligned)
    batch = rois[:, 0].long()
    for idx in _box_groups(edges, (pooled_height, pooled_width), (h, w), c):
        ay, dy1, dy2 = _axis_weights(y1[idx], y2[idx], pooled_height, h, with_grad=True)
        ax, dx1, dx2 = _axis_weights(x1[idx], x2[idx], pooled_width, w, with_grad=True)
        g = grad[idx].permute(0, 2, 3, 1).to(dtype)  # [B, PH, PW, C]
        add_back(g, grad_input, feat.shape, batch[idx], ay, ax)
        # out[p, q] = sum_lj Wy[p, l] F[l, j] Wx[q, j], so d loss / d Wy[p, l] = sum_qj grad[p, q] F[l, j] Wx[q, j]
        b, ly, lx = idx.shape[0], ay.cells.shape[1], ax.cells.shape[1]
        flat = crop_index(batch[idx], ay.cells, ax.cells, h, w)
        crop = feat.rows.index_select(0, flat.reshape(-1)).reshape(b, ly, lx, c)  # [B, Ly, Lx, C]
        wy, wx = ay.weight.to(dtype), ax.weight.to(dtype)
        gx = torch.matmul(wx.transpose(1, 2)[:, None], g)  # [B, PH, Lx, C] = sum_q grad[p, q] Wx[q, j]
        grad_wy = torch.einsum("bpjc,bljc->bpl", gx, crop).to(torch.float64)
        t = torch.einsum("bpl,bljc->bpjc", wy, crop)  # [B, PH, Lx, C] = sum_l Wy[p, l] F[l, j]
        grad_wx = torch.einsum("bpqc,bpjc->bqj", g, t).to(torch.float64)
        for column, (gw, dw) in zip((1, 2, 3, 4), ((grad_wx, dx1), (grad_wy, dy1), (grad_wx, dx2), (grad_wy, dy2))):
            grad_rois[idx, column] = (gw * dw).sum(dim=(1, 2)) * spatial_scale
