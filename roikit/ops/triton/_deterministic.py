"""Deterministic scatter-add, written as a gather: the backward kernels' alternative to floating-point atomics.

A backward pass scatters weighted output gradients onto input cells: cell ``o`` receives ``sum_e w_e * g_e`` over
the entries ``e`` whose key is ``o``. With atomics the order of that sum, hence its rounding, changes from run to
run. Here the entries are sorted by key with a stable sort (ties keep the order the entries were generated in, which
is fixed), each cell finds its run of entries by binary search, and one program per block of cells adds its runs up
in that order: the same bits on every run.

Two gathers share this: :func:`gather_bins` for entries that do not depend on the channel (a bilinear tap or an
integral weight: the entry names a bin, and every channel of that bin contributes), and :func:`segment_sum` for
entries that already name one value each (roi_pool's argmax routing).

The ops' launchers share the set-up too: :func:`entry_batches` splits the boxes' entry slots into launches and gives
each its buffers, every entry kernel finds its box and slots with :func:`entry_slots`, and the bilinear ops' entry
kernels write a sample's 4 taps with :func:`store_tap_entries`.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# entries generated per chunk of boxes: bounds the memory of the sort (about 40 bytes an entry)
MAX_ENTRIES = 1 << 22


def entry_launches(slots: Tensor, max_slots: int) -> Iterator[tuple[int, int, int, int, Tensor, int]]:
    """Split the boxes' entry slots into launches of at most ``max_slots`` slots, in box order, then slot order.

    ``slots`` [K] (CPU, int64): the slots each box needs. Yields ``(k0, kc, slot0, width, base, total)``: the launch
    covers slots ``[slot0, slot0 + width)`` of boxes ``k0 .. k0 + kc - 1`` (each up to its own count), box ``k0 + i``
    writing its slot ``j`` at entry ``base[i] + j - slot0``; ``total`` slots in all. Consecutive boxes share a launch
    while their slots fit; a box with more slots than fit gets launches of its own, one slot range after another.
    The split depends on the inputs only, so the order in which a cell's entries are added up is fixed.
    """
    max_slots = max(int(max_slots), 1)
    cum = torch.cumsum(slots, 0)
    k, start = slots.numel(), 0
    while start < k:
        count = int(slots[start])
        if count > max_slots:  # one box, several launches
            for slot0 in range(0, count, max_slots):
                width = min(max_slots, count - slot0)
                yield start, 1, slot0, width, torch.zeros(1, dtype=torch.int64), width
            start += 1
            continue
        before = int(cum[start - 1]) if start else 0
        end = max(int(torch.searchsorted(cum, before + max_slots, right=True)), start + 1)
        chunk = slots[start:end]
        total = int(chunk.sum())
        if total:
            base = torch.cumsum(chunk, 0) - chunk
            yield start, end - start, 0, int(chunk.max()), base, total
        start = end


class EntryBatch(NamedTuple):
    """One launch of an entry kernel: boxes ``k0 .. k0 + kc - 1``, slots ``[slot0, slot0 + width)`` (as
    :func:`entry_launches`), ``base`` [kc] on the device, the buffers of its entries, grid and block, and whether it
    is the first launch (its gather writes ``out`` instead of adding to it)."""
    k0: int
    kc: int
    slot0: int
    width: int
    base: Tensor
    keys: Tensor
    src: Tensor
    weight: Tensor
    tag: Tensor | None
    grid: tuple[int, int]
    block: int
    first: bool


def entry_batches(window: Tensor, bins: int, max_entries: int, taps: int, device: torch.device,
                  tag: bool = False) -> Iterator[EntryBatch]:
    """The launches of a deterministic backward, in a fixed order, each with fresh buffers.

    ``window`` [K, 2] (int64): the rows and columns of slots each bin of box k gets, so the box has
    ``bins * WY * WX`` slots (read on the host: one sync) of ``taps`` entries each. The slots are split by
    :func:`entry_launches` into launches of at most ``max_entries`` entries; each gets keys and src (int64), weight
    (float32) and, with ``tag``, tag (int64) buffers of its ``total * taps`` entries, and the grid
    ``(kc, cdiv(width, block))`` of its entry kernel (up to 256 slots a program).
    """
    slots = bins * window.cpu().prod(dim=1)  # [K]
    for i, (k0, kc, slot0, width, base, total) in enumerate(entry_launches(slots, max_entries // taps)):
        keys = torch.empty((total * taps,), dtype=torch.int64, device=device)
        src = torch.empty_like(keys)
        weight = torch.empty(keys.shape, dtype=torch.float32, device=device)
        tags = torch.empty_like(keys) if tag else None
        block = min(triton.next_power_of_2(width), 256)
        yield EntryBatch(k0, kc, slot0, width, base.to(device), keys, src, weight, tags,
                         (kc, triton.cdiv(width, block)), block, i == 0)


@triton.jit
def entry_slots(win_ptr, base_ptr, k0, slot0, width, PH: tl.constexpr, PW: tl.constexpr, BLOCK: tl.constexpr):
    """This program's slots in a launch of :func:`entry_batches` (grid ``(kc, cdiv(width, BLOCK))``).

    Box ``k = k0 + program_id(0)`` with window ``(WY, WX) = win[k]`` has ``PH * PW * WY * WX`` slots, slot
    ``j = (p * WY + ty) * WX + tx``; this program takes ``BLOCK`` of them from ``slot0 + program_id(1) * BLOCK``.
    Returns ``k``, and per slot [BLOCK]: bin ``p`` (0 where not ``ok``), row ``ty`` and column ``tx`` of the bin's
    window, ``ok`` (the slot is the box's and in ``[slot0, slot0 + width)``), and ``slot``, its index in the launch's
    buffers (``base[program_id(0)] + j - slot0``).
    """
    kl = tl.program_id(0).to(tl.int64)
    k = k0 + kl
    wy = tl.load(win_ptr + k * 2)
    wx = tl.load(win_ptr + k * 2 + 1)
    per_bin = wy * wx
    j = slot0 + tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = (j < PH * PW * per_bin) & (j < slot0 + width)
    p = j // tl.maximum(per_bin, 1)
    s = j - p * per_bin
    ty = s // tl.maximum(wx, 1)
    tx = s - ty * wx
    p = tl.where(ok, p, 0)
    slot = tl.load(base_ptr + kl) + j - slot0
    return k, p, ty, tx, ok, slot


@triton.jit
def store_tap_entries(key_ptr, src_ptr, w_ptr, e, mask, ok, cell0, W, num_cells, src, scale,
                      y_lo, y_hi, x_lo, x_hi, hy, ly, hx, lx, tag_ptr=None, tag=None):
    """A bilinear sample's 4 taps as the entries ``e + t``, written where ``mask``: taps (y_lo, x_lo), (y_lo, x_hi),
    (y_hi, x_lo), (y_hi, x_hi) with weights hy hx, hy lx, ly hx, ly lx. Entry: key ``cell0 + y * W + x`` (the
    unused key ``num_cells`` where not ``ok`` or the tap's weight is 0), ``src`` (its bin), ``weight * scale`` and,
    given ``tag_ptr``, ``tag``. Every argument a [BLOCK] vector or a scalar."""
    for t in tl.static_range(4):
        if t == 0:
            ry, rx, w = y_lo, x_lo, hy * hx
        elif t == 1:
            ry, rx, w = y_lo, x_hi, hy * lx
        elif t == 2:
            ry, rx, w = y_hi, x_lo, ly * hx
        else:
            ry, rx, w = y_hi, x_hi, ly * lx
        used = ok & (w != 0.0)
        tl.store(key_ptr + e + t, tl.where(used, cell0 + ry * W + rx, num_cells), mask=mask)
        tl.store(src_ptr + e + t, src, mask=mask)
        tl.store(w_ptr + e + t, w * scale, mask=mask)
        if tag_ptr is not None:
            tl.store(tag_ptr + e + t, tag, mask=mask)


def sort_entries(keys: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    """The entries in key order (stable) and where each key's run starts: ``bounds`` [num_keys + 1].

    Keys equal to ``num_keys`` mark unused entries; they sort last and belong to no run.
    """
    sorted_keys, order = torch.sort(keys, stable=True)
    cells = torch.arange(num_keys + 1, device=keys.device, dtype=keys.dtype)
    return order, torch.searchsorted(sorted_keys, cells)


@triton.jit
def _gather_bins_kernel(
    out_ptr, bounds_ptr, order_ptr, src_ptr, w_ptr, tag_ptr, grad_ptr, arg_ptr,
    num_cells, C, P, HW, o_sn, o_sc, o_sp,
    HAS_TAG: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_CELLS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[cell, c] (+)= sum over the cell's entries e, in sorted order, of
    #     w[e] * grad[k, c, p] * (argmax[k, c, p] == tag[e] if HAS_TAG),   with src[e] = k * P + p.
    # cell = n * HW + pixel; out is addressed through (o_sn, o_sc, o_sp), so any layout works.
    cells = tl.program_id(0).to(tl.int64) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cell_ok = cells < num_cells
    c_ok = cs < C
    lo = tl.load(bounds_ptr + cells, mask=cell_ok, other=0)
    count = tl.load(bounds_ptr + cells + 1, mask=cell_ok, other=0) - lo
    cs64 = cs.to(tl.int64)
    acc = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=tl.float32)
    for j in range(tl.max(count)):
        ok = j < count
        e = tl.load(order_ptr + lo + j, mask=ok, other=0)
        src = tl.load(src_ptr + e, mask=ok, other=0)
        w = tl.load(w_ptr + e, mask=ok, other=0.0)
        k = src // P
        g_off = (k * C)[:, None] * P + cs64[None, :] * P + (src - k * P)[:, None]
        m = ok[:, None] & c_ok[None, :]
        g = tl.load(grad_ptr + g_off, mask=m, other=0.0).to(tl.float32)
        if HAS_TAG:
            tag = tl.load(tag_ptr + e, mask=ok, other=-1)
            a = tl.load(arg_ptr + g_off, mask=m, other=-2)
            g = tl.where(a == tag[:, None], g, 0.0)
        acc += w[:, None] * g
    n = cells // HW
    o_off = (n * o_sn + (cells - n * HW) * o_sp)[:, None] + cs64[None, :] * o_sc
    m = cell_ok[:, None] & c_ok[None, :]
    if ACCUMULATE:
        acc = tl.load(out_ptr + o_off, mask=m, other=0.0) + acc
    tl.store(out_ptr + o_off, acc, mask=m)


def gather_bins(out: Tensor, keys: Tensor, src: Tensor, weight: Tensor, tag: Tensor | None, grad: Tensor,
                argmax: Tensor | None, accumulate: bool) -> None:
    """Add the entries into ``out`` [N, C, H, W] (float32, any strides) without atomics.

    keys [E] (int64): cell ``n * H * W + y * W + x`` of each entry, ``N * H * W`` for an unused one;
    src [E] (int64): ``k * P + p``, the bin whose gradient it carries; weight [E] (float32);
    tag [E] (int64) with argmax: the entry counts only for channels whose ``argmax[k, c, p]`` equals it.
    grad and argmax: contiguous [K, C, PH, PW].
    """
    n, c, h, w = out.shape
    num_cells = n * h * w
    order, bounds = sort_entries(keys, num_cells)
    p = grad.shape[2] * grad.shape[3]
    block_c = min(triton.next_power_of_2(c), 16)  # 32 x 16 tile: 4 values a thread
    block_cells = 32
    has_tag = tag is not None
    grid = (triton.cdiv(num_cells, block_cells), triton.cdiv(c, block_c))
    _gather_bins_kernel[grid](
        out, bounds, order, src, weight, tag if has_tag else weight, grad, argmax if has_tag else grad,
        num_cells, c, p, h * w, out.stride(0), out.stride(1), out.stride(3),
        HAS_TAG=has_tag, ACCUMULATE=accumulate, BLOCK_CELLS=block_cells, BLOCK_C=block_c,
    )


@triton.jit
def _segment_sum_kernel(out_ptr, bounds_ptr, order_ptr, vals_ptr, num_out, ACCUMULATE: tl.constexpr,
                        BLOCK: tl.constexpr):
    # out[o] (+)= sum over o's entries e, in sorted order, of vals[e]
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_ok = o < num_out
    lo = tl.load(bounds_ptr + o, mask=o_ok, other=0)
    count = tl.load(bounds_ptr + o + 1, mask=o_ok, other=0) - lo
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(tl.max(count)):
        ok = j < count
        e = tl.load(order_ptr + lo + j, mask=ok, other=0)
        acc += tl.load(vals_ptr + e, mask=ok, other=0.0).to(tl.float32)
    if ACCUMULATE:
        acc = tl.load(out_ptr + o, mask=o_ok, other=0.0) + acc
    tl.store(out_ptr + o, acc, mask=o_ok)


def segment_sum(out: Tensor, keys: Tensor, vals: Tensor, accumulate: bool) -> None:
    """``out.view(-1)[keys[e]] += vals[e]`` for every entry (keys equal to ``out.numel()`` are skipped), in a fixed
    order. out: contiguous float32; keys [E] int64; vals [E]."""
    num_out = out.numel()
    order, bounds = sort_entries(keys, num_out)
    block = 128
    _segment_sum_kernel[(triton.cdiv(num_out, block),)](out, bounds, order, vals, num_out, ACCUMULATE=accumulate,
                                                         BLOCK=block)
