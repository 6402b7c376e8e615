"""The geometry of every pooling rule: which cells a bin reads, where a sample lands, how a tent is averaged.

One place for the arithmetic the ops, ``explain``, the demo's pooling view and the misalignment study share:

* RoIPool (:func:`box_cells`, :func:`bin_edges`): the box's first cell, its extent and each bin's cell range
  under ``rounding="torchvision"`` (corners rounded half away from zero, :func:`round_half_away`; size
  ``end - start + 1``; bin ``p`` reads ``[floor(p b), ceil((p + 1) b))``) or ``rounding="integer"`` (start
  floored, size floored, bin size floored and at least 1).
* RoIAlign (:func:`sampling_grid`, :func:`sample_coord`, :func:`sample_taps`): the sample grid of each bin and
  the two cells (and weights) each sample reads along an axis, in torchvision's order of operations.
* PrRoIPool (:func:`hat`, :func:`hat_mean`): the bilinear tent of one cell and its exact mean over an interval.

Box coordinates in cells are clamped to +-2^52 (``MAX_CELLS``) before they become integers, and a bin has at most
``MAX_GRID`` samples per axis, so no box, however large its numbers, overflows.

Example: the 665 px box at stride 32, 7 bins, ``rounding="integer"``: 665 / 32 = 20.78 cells, floored to 20;
20 / 7 = 2.86, floored to 2 cells per bin; bin 6 reads cells [12, 14)::

    >>> rois = torch.tensor([[0.0, 0.0, 0.0, 665.0, 665.0]])
    >>> (hs, he), (ws, we) = bin_edges(rois, 1 / 32, (7, 7), "integer", (21, 21))
    >>> ws.tolist(), we.tolist()
    ([[0, 2, 4, 6, 8, 10, 12]], [[2, 4, 6, 8, 10, 12, 14]])
"""
from __future__ import annotations

import torch
from torch import Tensor

MAX_CELLS = 2.0**52  # box coordinates in cells are clamped to +-2^52 (exact integers in float64)
MAX_GRID = 2**31 - 1  # samples per bin and axis, at most (torchvision counts them in an int)

__all__ = ["MAX_CELLS", "MAX_GRID", "compute_dtype", "round_half_away", "box_cells", "clip_edges", "bin_edges",
           "ps_roi_pool_edges",
           "sampling_grid", "sample_coord", "sample_taps", "hat", "hat_mean"]


def compute_dtype(rois: Tensor) -> torch.dtype:
    """Coordinates and sums are computed in float64 for float64 boxes, in float32 otherwise (also for half types)."""
    return torch.float64 if rois.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- RoIPool
def round_half_away(x: Tensor) -> Tensor:
    """C's ``round()``: halves away from zero (``torch.round`` rounds half to even, and ``floor(x + 0.5)`` is wrong
    just below 0.5 in float32). RoIPool's "torchvision" rule rounds box corners this way."""
    t = torch.trunc(x)
    return torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t)


def box_cells(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], rounding: str):
    """Per axis (y, then x): the box's first cell [K], its extent in cells [K], and its bins' edges relative to
    the first cell ``(b0, b1)`` [K, P], not yet clipped to the map."""
    dtype = compute_dtype(rois)
    r = rois.to(dtype)
    axes = []
    for axis, (lo, hi) in enumerate(((2, 4), (1, 3))):
        p = torch.arange(pooled[axis], device=rois.device)
        if rounding == "torchvision":
            start = round_half_away((r[:, lo] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS)).long()
            end = round_half_away((r[:, hi] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS)).long()
            extent = (end - start + 1).clamp(min=1)  # [K]
            bin_size = extent.to(dtype) / pooled[axis]  # float bin
            b0 = torch.floor(p.to(dtype)[None, :] * bin_size[:, None]).long()  # [K, P]
            b1 = torch.ceil((p + 1).to(dtype)[None, :] * bin_size[:, None]).long()
        else:  # "integer"
            start = torch.floor((r[:, lo] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS)).long()
            extent = torch.floor(((r[:, hi] - r[:, lo]) * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS)).long()
            bin_size = torch.div(extent, pooled[axis], rounding_mode="floor").clamp(min=1)  # cells per bin, floored
            b0 = p[None, :] * bin_size[:, None]
            b1 = b0 + bin_size[:, None]
            extent = pooled[axis] * bin_size  # the cells the bins cover
        axes.append((start, extent, b0, b1))
    return axes


def clip_edges(axes, size: tuple[int, int]):
    """The bins of :func:`box_cells` as absolute cell ranges, clipped to the map."""
    return tuple(((b0 + start[:, None]).clamp(0, length), (b1 + start[:, None]).clamp(0, length))
                 for (start, _, b0, b1), length in zip(axes, size))


def bin_edges(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], rounding: str, size: tuple[int, int]):
    """Cell ranges of every bin: ``(hstart, hend)`` [K, PH] and ``(wstart, wend)`` [K, PW], clipped to the map."""
    return clip_edges(box_cells(rois, spatial_scale, pooled, rounding), size)


def ps_roi_pool_edges(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], size: tuple[int, int]):
    """PSRoIPool's bins as torchvision computes them: corners rounded half away from zero, extent
    ``max(end - start, 1)`` cells (no ``+ 1``, unlike RoIPool), float bin ``b``, bin ``p`` reads
    ``[floor(p b), ceil((p + 1) b))`` from the start, clipped to ``[0, size - 1]``: torchvision's forward never reads
    the map's last row and column (its backward clips to ``size``; roikit's backward follows its forward).
    Returns ``(hstart, hend)`` [K, PH] and ``(wstart, wend)`` [K, PW]."""
    r = rois.to(compute_dtype(rois))
    edges = []
    for axis, (lo, hi) in enumerate(((2, 4), (1, 3))):
        start = round_half_away((r[:, lo] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS)).long()
        end = round_half_away((r[:, hi] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS)).long()
        bin_size = (end - start).clamp(min=1).to(r.dtype) / pooled[axis]
        p = torch.arange(pooled[axis], device=rois.device).to(r.dtype)[None, :]
        b0 = torch.floor(p * bin_size[:, None]).long() + start[:, None]
        b1 = torch.ceil((p + 1) * bin_size[:, None]).long() + start[:, None]
        last = max(size[axis] - 1, 0)
        edges.append((b0.clamp(0, last), b1.clamp(0, last)))
    return tuple(edges)


# ---------------------------------------------------------------- RoIAlign
def sampling_grid(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool):
    """Per box and axis (y, then x): the start, the bin size and the samples per bin, each [K], computed in
    torchvision's order of operations. Sample ``i`` of bin ``p`` lies at ``start + p * bin + (i + 0.5) * bin / g``."""
    r = rois.to(compute_dtype(rois))
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = ((r[:, i] * spatial_scale).clamp(-MAX_CELLS, MAX_CELLS) - offset for i in range(1, 5))
    width, height = x2 - x1, y2 - y1
    if not aligned:  # force malformed boxes to 1 x 1 (torchvision's legacy rule)
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    bin_h, bin_w = height / pooled[0], width / pooled[1]
    if sampling_ratio > 0:
        gh = torch.full_like(bin_h, min(sampling_ratio, MAX_GRID), dtype=torch.int64)
        gw = torch.full_like(bin_w, min(sampling_ratio, MAX_GRID), dtype=torch.int64)
    else:
        gh, gw = (torch.ceil(b).clamp(max=MAX_GRID).long() for b in (bin_h, bin_w))
    return (y1, bin_h, gh), (x1, bin_w, gw)


def sample_coord(start: Tensor, bin_size: Tensor, grid: Tensor, p: Tensor, i: Tensor) -> Tensor:
    """Position of sample ``i`` of bin ``p`` (broadcast), in torchvision's order of operations."""
    g = grid.clamp(min=1).to(start.dtype)
    return (start + p.to(start.dtype) * bin_size) + ((i.to(start.dtype) + 0.5) * bin_size) / g


def sample_taps(coord: Tensor, valid: Tensor, length: int):
    """torchvision's bilinear taps along one axis: ``low, high`` cells and ``w_low, w_high`` weights (0 for an
    invalid sample). ``coord`` inside ``[-1, length]`` is clamped to the map."""
    y = coord.clamp(min=0.0)
    low = torch.where(valid, y, 0.0).long()  # truncation, as (int) in C; y >= 0 here
    at_end = low >= length - 1
    low = torch.where(at_end, length - 1, low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end | ~valid, 0.0, y - low.to(y.dtype))
    w_low = torch.where(valid, 1.0 - frac, 0.0)
    w_high = torch.where(valid, frac, 0.0)
    return low, high, w_low, w_high


# ---------------------------------------------------------------- PrRoIPool
def hat(t: Tensor) -> Tensor:
    """The bilinear "tent" of one cell: ``max(0, 1 - |t|)``."""
    return (1.0 - t.abs()).clamp(min=0.0)


def hat_mean(t0: Tensor, t1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mean of :func:`hat` over ``[t0, t1]`` and its derivatives with respect to ``t0`` and ``t1``.

    The tent is linear between its kinks (-1, 0, 1), and a linear function's mean over an interval is its value at
    the interval's middle: so the mean is a sum of (piece length x value at the piece's middle) over the pieces
    between the kinks, divided by ``t1 - t0``. Unlike ``(HAT(t1) - HAT(t0)) / (t1 - t0)`` with the integral
    ``HAT``, this does not cancel for a tiny interval (a 1e-7-cell bin, or ``spatial_scale=1e-30``).
    The derivatives: ``(hat(t1) - mean) / (t1 - t0)`` and ``(mean - hat(t0)) / (t1 - t0)``, which are
    ``hat'(middle) / 2`` each when no kink lies inside (the form used there, stable for tiny intervals).
    """
    edges = [t0] + [torch.minimum(torch.maximum(torch.full_like(t0, k), t0), t1) for k in (-1.0, 0.0, 1.0)] + [t1]
    width = t1 - t0
    total = sum((b - a) * hat(0.5 * (a + b)) for a, b in zip(edges[:-1], edges[1:]))
    safe = torch.where(width > 0, width, 1.0)
    mean = torch.where(width > 0, total / safe, hat(t0))
    middle = 0.5 * (t0 + t1)
    half_slope = torch.where(middle.abs() < 1, -0.5 * torch.sign(middle), 0.0)
    kink_inside = ((t0 < -1) & (t1 > -1)) | ((t0 < 0) & (t1 > 0)) | ((t0 < 1) & (t1 > 1))
    d_t0 = torch.where(kink_inside, (mean - hat(t0)) / safe, half_slope)
    d_t1 = torch.where(kink_inside, (hat(t1) - mean) / safe, half_slope)
    return mean, d_t0, d_t1
