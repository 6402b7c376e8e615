"""The tile every region kernel works on: one box, a block of its channels and a block of its output bins.

A launch grid ``(K, cdiv(C, BLOCK_C), cdiv(PH * PW, BLOCK_P))`` gives each program a ``[BLOCK_C, BLOCK_P]`` tile,
so the box's geometry is computed once per program and every sample is a vector over the bins.
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


def blocks(channels: int, bins: int, tile: int = 512) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)``: all the bins (up to 128), and as many channels as fill ``tile`` outputs."""
    # a tile of 512 keeps 4 outputs a thread (4 warps): about 70 registers on sm_90, no spills
    block_p = min(triton.next_power_of_2(max(bins, 1)), 128)
    block_c = max(1, min(triton.next_power_of_2(max(channels, 1)), tile // block_p))
    return block_c, block_p
