"""The tile every region kernel works on: one box, a block of its channels and a block of its output bins.

A launch grid ``(K, cdiv(C, BLOCK_C), cdiv(PH * PW, BLOCK_P))`` (:func:`box_grid`) gives each program a
``[BLOCK_C, BLOCK_P]`` tile (:func:`box_tile`), so the box's geometry is computed once per program and every sample
is a vector over the bins. :func:`load_box` reads the program's box, :func:`store_box_grad` writes a box's gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def box_tile(C, PH: tl.constexpr, PW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's box ``k``, channels ``cs`` [BLOCK_C], bins ``ps`` [BLOCK_P] (``ph * PW + pw``), the tile's
    offsets ``offs`` [BLOCK_C, BLOCK_P] in a contiguous [K, C, PH, PW] tensor, and its in-range mask."""
    k = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs = (k * C + cs.to(tl.int64))[:, None] * (PH * PW) + ps[None, :]
    m = (cs < C)[:, None] & (ps < PH * PW)[None, :]
    return k, cs, ps, offs, m


@triton.jit
def load_box(rois_ptr, k):
    """Box k of ``rois`` [K, 5] (``(n, x1, y1, x2, y2)`` in image pixels): its batch index (int64) and corners
    (float32), as read by every kernel: ``n, x1, y1, x2, y2``."""
    r = rois_ptr + k * 5
    n = tl.load(r).to(tl.float32).to(tl.int64)
    x1 = tl.load(r + 1).to(tl.float32)
    y1 = tl.load(r + 2).to(tl.float32)
    x2 = tl.load(r + 3).to(tl.float32)
    y2 = tl.load(r + 4).to(tl.float32)
    return n, x1, y1, x2, y2


@triton.jit
def store_box_grad(grois_ptr, k, t_x1, t_y1, t_x2, t_y2, scale):
    """Row k of a box gradient [K, 5]: 0 for the batch index, then for x1, y1, x2, y2 the sum of its terms
    [BLOCK_C, BLOCK_P] (over the bins, then the channels) times ``scale``."""
    out = grois_ptr + k * 5
    tl.store(out, 0.0)
    tl.store(out + 1, tl.sum(tl.sum(t_x1, axis=1), axis=0) * scale)
    tl.store(out + 2, tl.sum(tl.sum(t_y1, axis=1), axis=0) * scale)
    tl.store(out + 3, tl.sum(tl.sum(t_x2, axis=1), axis=0) * scale)
    tl.store(out + 4, tl.sum(tl.sum(t_y2, axis=1), axis=0) * scale)


def blocks(channels: int, bins: int, tile: int = 512) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)``: all the bins (up to 128), and as many channels as fill ``tile`` outputs."""
    # a tile of 512 keeps 4 outputs a thread (4 warps): about 70 registers on sm_90, no spills
    block_p = min(triton.next_power_of_2(max(bins, 1)), 128)
    block_c = max(1, min(triton.next_power_of_2(max(channels, 1)), tile // block_p))
    return block_c, block_p


def box_grid(boxes: int, channels: int, bins: int) -> tuple[tuple[int, int, int], dict[str, int]]:
    """The launch grid of a :func:`box_tile` kernel, ``(K, cdiv(C, BLOCK_C), cdiv(P, BLOCK_P))``, and its block sizes
    as kernel arguments ``{"BLOCK_C": ..., "BLOCK_P": ...}`` (:func:`blocks`)."""
    block_c, block_p = blocks(channels, bins)
    return (boxes, triton.cdiv(channels, block_c), triton.cdiv(bins, block_p)), dict(BLOCK_C=block_c, BLOCK_P=block_p)
