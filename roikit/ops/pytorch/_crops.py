"""Box-by-box crops of a channels-last feature map, batched in memory-bounded groups.

Every region op here reads, for box k, a small set of rows ``rows[k, :Ly]`` and columns ``cols[k, :Lx]`` of image
``n_k``: a crop ``F[n_k][rows][:, cols]`` of shape ``[Ly, Lx, C]``. The ops cut boxes into groups whose crops and
weights hold at most ``CHUNK_BUDGET`` values (:func:`groups`), and read each group with two batched matrix products:
``out[k] = Wy[k] @ crop[k] @ Wx[k]^T`` (:meth:`FeatureRows.read`). Every crop index is clipped to the map first,
so what a group costs depends on the map and the budget, never on how large a box's coordinates are.

**Non-finite cells.** A product like ``Wy @ F @ Wx^T`` multiplies every crop cell, also the ones a bin never reads
(weight 0): one NaN would spread to every bin of the box. So the cells that are not finite are split off: the
finite part goes through the products with those cells set to 0, and the NaN / +inf / -inf cells are counted
separately for each bin through 0/1 "tap" matrices, which say which cells a bin reads:

* ``taps``: the cells some sample of the bin reads, even with weight 0 (a bilinear sample reads 4 cells and
  multiplies each by its weight, as torchvision's kernels do, so ``0 * inf`` is NaN there);
* ``zero``: the cells some sample reads with weight exactly 0.

A bin is then NaN when it reads a NaN, reads an infinity with weight 0, or reads both infinities; else +-inf when it
reads that infinity with a positive weight; else its finite value. For an exact integral (PrRoIPool) ``taps`` is
``weight > 0`` and there are no zero-weight reads: a cell the bin does not weigh is not read.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

CHUNK_BUDGET = 1 << 22  # values per group of crops and weights (16 MiB in float32)
BOX_SLICE = 1 << 16  # boxes whose per-box bookkeeping (edges, sample counts, costs) is held at once


def channels_last_rows(input: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, C, H, W] -> [N * H * W, C] in ``dtype`` (free when the input is already channels-last)."""
    n, c, h, w = input.shape
    return input.permute(0, 2, 3, 1).to(dtype).reshape(n * h * w, c)


def groups(cost: Tensor, budget: int | None = None) -> Iterator[Tensor]:
    """Box indices in groups of similar cost whose costs add up to at most ``budget`` (a group holds at least one
    box). ``cost`` [K] is an upper bound of the values one box needs."""
    if cost.numel() == 0:
        return
    budget = CHUNK_BUDGET if budget is None else budget
    order = torch.argsort(cost, stable=True)
    sizes = cost[order].clamp(min=1).tolist()
    start = 0
    while start < len(sizes):
        # a group is padded to its largest member, the last one (sorted): count * largest <= budget
        end = start + 1
        while end < len(sizes) and (end + 1 - start) * sizes[end] <= budget:
            end += 1
        yield order[start:end]
        start = end


def box_slices(count: int) -> Iterator[slice]:
    """Slices of at most ``BOX_SLICE`` boxes: the ops hold the bookkeeping of one slice of boxes at a time."""
    for start in range(0, count, BOX_SLICE):
        yield slice(start, min(start + BOX_SLICE, count))


def chunks(len_y: Tensor, len_x: Tensor, channels: int, budget: int | None = None) -> Iterator[tuple[Tensor, int, int]]:
    """Yield ``(box_indices, Ly, Lx)``: boxes grouped by crop area, each group padded to its largest crop."""
    area = (len_y.clamp(min=1) * len_x.clamp(min=1)) * channels
    for idx in groups(area, budget):
        yield idx, max(int(len_y[idx].max()), 1), max(int(len_x[idx].max()), 1)


def crop_index(batch: Tensor, rows: Tensor, cols: Tensor, height: int, width: int) -> Tensor:
    """Flat row index into the [N * H * W, C] map for each crop cell: [B, Ly, Lx]."""
    return (batch[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]


class Axis(NamedTuple):
    """What the output rows (bins or samples) of a group of boxes read along one axis.

    cells [B, L]: the map rows (or columns) of the crop; weight [B, R, L]: each output row's weight on them;
    taps, zero [B, R, L] (0/1, or None for "weight > 0" and "none"): see the module docstring.
    """
    cells: Tensor
    weight: Tensor
    taps: Tensor | None = None
    zero: Tensor | None = None


def _product(values: Tensor, index: Tensor, wy: Tensor, wx: Tensor, ps: tuple[int, int] | None = None) -> Tensor:
    """``wy @ crop @ wx^T`` for every box: values [M, C], index [B, Ly, Lx], wy [B, R, Ly], wx [B, S, Lx] ->
    [B, R, S, C].

    Position-sensitive (``ps = (PH, PW)``, R = PH, S = PW): channel ``(c, p, q)`` of ``C = C' PH PW`` feeds only bin
    (p, q): -> [B, PH, PW, C']."""
    b, ly, lx = index.shape
    c = values.shape[1]
    crop = values.index_select(0, index.reshape(-1)).reshape(b, ly, lx * c)
    wy, wx = wy.to(values.dtype), wx.to(values.dtype)
    if ps is not None:
        crop = crop.reshape(b, ly, lx, c // (ps[0] * ps[1]), ps[0], ps[1])
        t = torch.einsum("bpl,blmcpq->bpmcq", wy, crop)  # [B, PH, Lx, C', PW]
        return torch.einsum("bqm,bpmcq->bpqc", wx, t)  # [B, PH, PW, C']
    t = torch.bmm(wy, crop).reshape(b, wy.shape[1], lx, c)  # [B, R, Lx, C]
    return torch.matmul(wx[:, None], t)  # [B, R, S, C]


class FeatureRows:
    """A [N, C, H, W] map as channels-last rows [N * H * W, C] in ``dtype``, its non-finite cells kept apart."""

    def __init__(self, input: Tensor, dtype: torch.dtype) -> None:
        self.shape = tuple(input.shape)
        rows = channels_last_rows(input, dtype)
        self.raw = rows  # as they are, non-finite cells included
        self.finite = bool(torch.isfinite(rows).all())
        if not self.finite:
            self.nan = torch.isnan(rows).to(dtype)
            self.pos_inf = (rows == float("inf")).to(dtype)
            self.neg_inf = (rows == float("-inf")).to(dtype)
            rows = torch.where(torch.isfinite(rows), rows, 0.0)
        self.rows = rows

    def read(self, batch: Tensor, y: Axis, x: Axis, ps: tuple[int, int] | None = None) -> Tensor:
        """Every box's ``Wy @ F[n] @ Wx^T``: [B, R, S, C] (position-sensitive: see :func:`_product`), non-finite
        cells counted by the tap rules."""
        _, _, height, width = self.shape
        index = crop_index(batch, y.cells, x.cells, height, width)
        product = functools.partial(_product, index=index, ps=ps)
        out = product(self.rows, wy=y.weight, wx=x.weight)
        if self.finite:
            return out
        ty = (y.weight > 0) if y.taps is None else y.taps
        tx = (x.weight > 0) if x.taps is None else x.taps
        bad = product(self.nan, wy=ty, wx=tx) > 0
        if y.zero is not None:
            inf = self.pos_inf + self.neg_inf
            bad |= (product(inf, wy=y.zero, wx=tx) + product(inf, wy=ty, wx=x.zero)) > 0
        pos = product(self.pos_inf, wy=y.weight > 0, wx=x.weight > 0) > 0
        neg = product(self.neg_inf, wy=y.weight > 0, wx=x.weight > 0) > 0
        out = torch.where(pos, float("inf"), torch.where(neg, float("-inf"), out))
        return torch.where(bad | (pos & neg), float("nan"), out)


def add_back(grad: Tensor, out: Tensor, shape: tuple[int, int, int, int], batch: Tensor, y: Axis, x: Axis,
             ps: tuple[int, int] | None = None) -> None:
    """The adjoint of :meth:`FeatureRows.read` (the weights only): adds ``Wy^T @ grad @ Wx`` of every box of ``grad``
    [B, R, S, C] (position-sensitive: [B, PH, PW, C']) into ``out`` [N * H * W, C]. ``index_add_`` runs in a fixed
    order on the CPU: the same bits on every run."""
    _, channels, height, width = shape
    b, r = grad.shape[:2]
    wy, wx = y.weight.to(grad.dtype), x.weight.to(grad.dtype)
    ly, lx = y.cells.shape[1], x.cells.shape[1]
    if ps is not None:
        crop = torch.einsum("bpl,bqm,bpqc->blmcpq", wy, wx, grad).reshape(b, ly, lx, channels)
    else:
        t = torch.matmul(wx.transpose(1, 2)[:, None], grad)  # [B, R, Lx, C]
        crop = torch.bmm(wy.transpose(1, 2), t.reshape(b, r, lx * channels))  # [B, Ly, Lx * C]
    index = crop_index(batch, y.cells, x.cells, height, width)
    out.index_add_(0, index.reshape(-1), crop.reshape(-1, channels))
