"""RoIAlign in Triton: forward (avg and max), backward with atomics, and a deterministic backward.

Bin (ph, pw) of box k takes ``gh * gw`` bilinear samples at

    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh,    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw

(torchvision's conventions: ``y1 = box_y1 * scale - 0.5`` when aligned, a box at least 1 x 1 cell when not,
``gh = sampling_ratio`` or ``ceil(bin_h)``, at most ``geometry.MAX_GRID``; box coordinates in cells clamped to
+-2^52; a sample outside ``[-1, H] x [-1, W]`` is 0, one inside is clamped to the map) and returns their mean, or
their maximum (``argmax`` = the winning sample's ``iy * gw + ix``: the first on ties, NaN never wins, -1 when
nothing beats -inf, the value then -inf; a bin with no sample is 0 with argmax -1). See
``roikit/ops/pytorch/roi_align.py``, the reference.

**Bounded work.** A bin's sample positions are monotone in the index, so the samples inside ``[-1, size]`` form one
run ``[lo, hi)`` per axis, found by bisection on the very positions the kernel reads (``_sample_run``); only the run
is read (max pooling also reads the bin's first sample outside it, a 0 that competes). So a 1e30 px box or a huge
``sampling_ratio`` costs the samples that land on the map: with adaptive sampling at most about ``2 H + 6`` rows.

One program pools one box for a block of channels and a block of bins: a [BLOCK_C, BLOCK_P] tile, with the box's
geometry computed once and every sample a vector over the bins. Features are read through their strides, so
contiguous and channels-last maps both work (channels-last gives contiguous channel vectors). Everything is
accumulated in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..geometry import MAX_CELLS, MAX_GRID
from ._deterministic import MAX_ENTRIES, entry_batches, entry_slots, gather_bins, store_tap_entries
from ._tiles import box_grid, box_tile

# the reference's bounds (roikit.ops.geometry): box coordinates in cells clamped to +-2^52, at most MAX_GRID samples
# per bin and axis (as a float32 cap, as the reference computes it for float32 boxes); sample indices are int64
_MAX_CELLS = tl.constexpr(float(MAX_CELLS))
_MAX_GRID_F = tl.constexpr(float(MAX_GRID))


@triton.jit
def _clamp_cells(v):
    # v clamped to [-2^52, 2^52]; NaN stays NaN (as torch.clamp; tl.minimum would drop it on a GPU)
    return tl.where(v > _MAX_CELLS, _MAX_CELLS, tl.where(v < -_MAX_CELLS, -_MAX_CELLS, v))


@triton.jit
def _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH: tl.constexpr, PW: tl.constexpr,
               ALIGNED: tl.constexpr):
    """Box k: batch index, start and bin size of each axis, samples per bin (torchvision's order of operations).

    Coordinates in cells are clamped to +-2^52; ``gh = ceil(bin_h)`` (adaptive) is capped at MAX_GRID, 0 for an
    empty or NaN bin; ``sampling_ratio`` comes capped from the launcher.
    """
    r = rois_ptr + k * 5
    n = tl.load(r).to(tl.float32).to(tl.int64)
    x1 = _clamp_cells(tl.load(r + 1).to(tl.float32) * spatial_scale)
    y1 = _clamp_cells(tl.load(r + 2).to(tl.float32) * spatial_scale)
    x2 = _clamp_cells(tl.load(r + 3).to(tl.float32) * spatial_scale)
    y2 = _clamp_cells(tl.load(r + 4).to(tl.float32) * spatial_scale)
    if ALIGNED:
        x1 -= 0.5
        y1 -= 0.5
        x2 -= 0.5
        y2 -= 0.5
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not ALIGNED:  # malformed boxes forced to 1 x 1 cell (NaN stays NaN)
        roi_w = tl.where(roi_w < 1.0, 1.0, roi_w)
        roi_h = tl.where(roi_h < 1.0, 1.0, roi_h)
    bin_h = tl.div_rn(roi_h, PH * 1.0)
    bin_w = tl.div_rn(roi_w, PW * 1.0)
    gh, gw = _samples_per_bin(bin_h, bin_w, sampling_ratio)
    return n, y1, x1, bin_h, bin_w, gh, gw


@triton.jit
def _samples_per_bin(bin_h, bin_w, sampling_ratio):
    """(gh, gw): ``sampling_ratio`` where > 0 (it comes capped from the launcher), else ``ceil(bin)`` capped at
    MAX_GRID, 0 for an empty or NaN bin."""
    adaptive_h = tl.where(bin_h > 0, tl.ceil(tl.minimum(bin_h, _MAX_GRID_F)), 0.0).to(tl.int64)
    adaptive_w = tl.where(bin_w > 0, tl.ceil(tl.minimum(bin_w, _MAX_GRID_F)), 0.0).to(tl.int64)
    gh = tl.where(sampling_ratio > 0, sampling_ratio, adaptive_h)
    gw = tl.where(sampling_ratio > 0, sampling_ratio, adaptive_w)
    return gh, gw


@triton.jit
def _sample_coord(start, bin_size, grid_f, i):
    # sample i of the bin that starts at `start`: start + (i + 0.5) * bin_size / grid (torchvision's order)
    return start + tl.div_rn((i + 0.5) * bin_size, grid_f)


@triton.jit
def _first_sample(start, bin_size, grid, size, steps, PAST: tl.constexpr):
    """Per bin (``start`` [BLOCK]): the first sample index in [0, grid] whose position has reached the map
    (``PAST=False``: >= -1, or <= size for a negative bin) or gone past it (``PAST=True``: > size, or < -1), grid when
    none (also for NaN positions). Positions are monotone in the index, so this is a bisection of ``steps`` rounds."""
    grid_f = tl.maximum(grid, 1).to(tl.float32)
    lo = tl.zeros_like(start).to(tl.int64)
    hi = lo + grid
    for _ in range(steps):
        mid = lo + (hi - lo) // 2
        c = _sample_coord(start, bin_size, grid_f, mid)
        if PAST:
            cond = tl.where(bin_size >= 0, c > size, c < -1.0)
        else:
            cond = tl.where(bin_size >= 0, c >= -1.0, c <= size)
        active = lo < hi
        hi = tl.where(active & cond, mid, hi)
        lo = tl.where(active, tl.where(cond, lo, mid + 1), lo)
    return hi


@triton.jit
def _sample_run(start, bin_size, grid, size):
    """The samples of every bin (``start`` [BLOCK]) inside ``[-1, size]``: the run ``[lo, hi)`` of indices.

    Only these samples can be non-zero; the run is at most about ``(size + 2) / spacing + 1`` samples (``2 size + 6``
    with adaptive sampling), whatever the box."""
    g = tl.maximum(grid, 0)
    steps = tl.ceil(tl.log2(g.to(tl.float32) + 1.0)).to(tl.int32) + 1  # one round to spare for log2's rounding
    lo = _first_sample(start, bin_size, g, size, steps, False)
    hi = _first_sample(start, bin_size, g, size, steps, True)
    return lo, hi


@triton.jit
def _visits(start, bin_size, grid, size, POOL_MAX: tl.constexpr):
    """Which samples each bin visits: slot t is sample ``first + t`` for t < count, read as sample 0 where that is
    below ``lo`` (returns lo, first, count, each [BLOCK]).

    avg: the run only (every other sample is 0). max: also the bin's first sample outside the run (value 0, it
    competes): sample 0 when the run starts after 0, else the one just past the run. With that one, the samples
    skipped are all 0 and come after a visited 0 in ``iy * gw + ix`` order, so the first maximum is the bin's."""
    lo, hi = _sample_run(start, bin_size, grid, size)
    first = lo
    count = hi - lo
    if POOL_MAX:
        extra = (lo > 0) | (hi < tl.maximum(grid, 0))
        first = tl.where(lo > 0, lo - 1, lo)
        count = tl.where(extra, count + 1, count)
    return lo, first, count


@triton.jit
def _axis_taps(y, size):
    """torchvision's bilinear_interpolate along one axis: the two cells, their weights, and whether y counts.

    y outside [-1, size] gives nothing; inside it is clamped to [0, size - 1].
    """
    inside = (y >= -1.0) & (y <= size)
    y = tl.minimum(tl.maximum(y, 0.0), size * 1.0)  # the upper clamp only guards the int conversion
    lo = y.to(tl.int32)
    at_end = lo >= size - 1
    lo = tl.where(at_end, size - 1, lo)
    hi = tl.where(at_end, size - 1, lo + 1)
    frac = tl.where(at_end, 0.0, y - lo.to(tl.float32))
    return lo.to(tl.int64), hi.to(tl.int64), 1.0 - frac, frac, inside


@triton.jit
def _load_taps(chan, r_lo, r_hi, x_lo, x_hi, s_w, m):
    """The 4 taps (y_lo, x_lo), (y_lo, x_hi), (y_hi, x_lo), (y_hi, x_hi) of a sample in float32, 0 where not ``m``
    [BLOCK_C, BLOCK_P]: ``chan`` [BLOCK_C, 1] the channels' planes, ``r_lo``, ``r_hi`` the rows' offsets and
    ``x_lo``, ``x_hi`` the columns [BLOCK_P]."""
    c_lo = x_lo * s_w
    c_hi = x_hi * s_w
    v1 = tl.load(chan + (r_lo + c_lo)[None, :], mask=m, other=0.0).to(tl.float32)
    v2 = tl.load(chan + (r_lo + c_hi)[None, :], mask=m, other=0.0).to(tl.float32)
    v3 = tl.load(chan + (r_hi + c_lo)[None, :], mask=m, other=0.0).to(tl.float32)
    v4 = tl.load(chan + (r_hi + c_hi)[None, :], mask=m, other=0.0).to(tl.float32)
    return v1, v2, v3, v4


@triton.jit
def _align_bins(base, C, H, W, s_c, s_h, s_w, y1, x1, bin_h, bin_w, gh, gw, cs, ps,
                PH: tl.constexpr, PW: tl.constexpr, POOL_MAX: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pool bins ``ps`` x channels ``cs`` of one box from the image at ``base``: (value, argmax) [BLOCK_C, BLOCK_P].

    avg: value = (1 / max(gh * gw, 1)) * sum_{iy, ix} f(y, x);  max: value = max_{iy, ix} f(y, x) (the first in
    ``iy * gw + ix`` order on ties, NaN never wins, -inf with argmax -1 when nothing beats -inf; 0 with argmax -1
    for a bin with no sample), with f(y, x) = sum of the 4 taps' weight * feature, 0 for a sample outside the map.
    Only the samples of ``_visits`` are read: the work is bounded by the map, not by the box.
    """
    c_ok = cs < C
    p_ok = ps < PH * PW
    y0 = y1 + (ps // PW).to(tl.float32) * bin_h
    x0 = x1 + (ps % PW).to(tl.float32) * bin_w
    gh_f = tl.maximum(gh, 1).to(tl.float32)  # a box with no sample divides nothing
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    lo_y, first_y, count_y = _visits(y0, bin_h, gh, H, POOL_MAX)
    lo_x, first_x, count_x = _visits(x0, bin_w, gw, W, POOL_MAX)
    count_y = tl.where(p_ok, count_y, 0)
    count_x = tl.where(p_ok, count_x, 0)
    chan = base + cs.to(tl.int64)[:, None] * s_c
    if POOL_MAX:
        acc = tl.full([BLOCK_C, BLOCK_P], float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    arg = tl.full([BLOCK_C, BLOCK_P], -1, dtype=tl.int64)
    for ty in range(tl.max(count_y)):  # the tile's longest visit list; shorter ones are masked
        iy = first_y + ty
        iy = tl.where(iy < lo_y, 0, iy)
        y = _sample_coord(y0, bin_h, gh_f, iy)
        y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
        y_ok = ty < count_y
        r_lo = y_lo * s_h
        r_hi = y_hi * s_h
        for tx in range(tl.max(count_x)):
            ix = first_x + tx
            ix = tl.where(ix < lo_x, 0, ix)
            x = _sample_coord(x0, bin_w, gw_f, ix)
            x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
            slot = y_ok & (tx < count_x)
            m = c_ok[:, None] & (slot & y_in & x_in)[None, :]
            v1, v2, v3, v4 = _load_taps(chan, r_lo, r_hi, x_lo, x_hi, s_w, m)
            val = (hy * hx)[None, :] * v1 + (hy * lx)[None, :] * v2 + (ly * hx)[None, :] * v3 + (ly * lx)[None, :] * v4
            if POOL_MAX:
                # strictly larger wins: the first maximum stays, NaN never wins, -inf never beats the start
                win = slot[None, :] & (val > acc)
                acc = tl.where(win, val, acc)
                arg = tl.where(win, (iy * gw + ix)[None, :], arg)
            else:
                acc += val
    if POOL_MAX:
        no_sample = (gh <= 0) | (gw <= 0)
        acc = tl.where(no_sample, 0.0, acc)
    else:
        acc = tl.div_rn(acc, gh_f * gw_f)
    return acc, arg


@triton.jit
def _roi_align_fwd_kernel(
    feat_ptr, rois_ptr, out_ptr, arg_ptr, C, H, W, s_n, s_c, s_h, s_w, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, POOL_MAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out[k, c, ph, pw] = pool over the bin's samples (see _align_bins); argmax too for max pooling
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    val, arg = _align_bins(feat_ptr + n * s_n, C, H, W, s_c, s_h, s_w, y1, x1, bin_h, bin_w, gh, gw, cs, ps,
                           PH, PW, POOL_MAX, BLOCK_C, BLOCK_P)
    tl.store(out_ptr + offs, val, mask=m)
    if POOL_MAX:
        tl.store(arg_ptr + offs, arg, mask=m)


@triton.jit
def _align_scatter(gin, C, H, W, g_sc, g_sh, g_sw, y1, x1, bin_h, bin_w, gh, gw, cs, ps, g, a,
                   PH: tl.constexpr, PW: tl.constexpr, POOL_MAX: tl.constexpr):
    """Atomically add the gradient tile g [BLOCK_C, BLOCK_P] of one box onto its image's taps at ``gin``.

    avg: every sample's 4 taps get weight * g / count (only the samples on the map: the others have no taps);
    max: only the winning sample a (iy * gw + ix) does.
    """
    c_ok = cs < C
    p_ok = ps < PH * PW
    y0 = y1 + (ps // PW).to(tl.float32) * bin_h
    x0 = x1 + (ps % PW).to(tl.float32) * bin_w
    gh_f = tl.maximum(gh, 1).to(tl.float32)  # a box with no sample divides nothing
    gw_f = tl.maximum(gw, 1).to(tl.float32)
    chan = gin + cs.to(tl.int64)[:, None] * g_sc
    if POOL_MAX:
        iy = a // tl.maximum(gw, 1)
        ix = a - iy * gw
        y = _sample_coord(y0[None, :], bin_h, gh_f, iy)
        x = _sample_coord(x0[None, :], bin_w, gw_f, ix)
        y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
        x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
        m = c_ok[:, None] & p_ok[None, :] & y_in & x_in & (a >= 0)
        tl.atomic_add(chan + y_lo * g_sh + x_lo * g_sw, hy * hx * g, mask=m, sem="relaxed")
        tl.atomic_add(chan + y_lo * g_sh + x_hi * g_sw, hy * lx * g, mask=m, sem="relaxed")
        tl.atomic_add(chan + y_hi * g_sh + x_lo * g_sw, ly * hx * g, mask=m, sem="relaxed")
        tl.atomic_add(chan + y_hi * g_sh + x_hi * g_sw, ly * lx * g, mask=m, sem="relaxed")
    else:
        g = tl.div_rn(g, gh_f * gw_f)
        lo_y, hi_y = _sample_run(y0, bin_h, gh, H)
        lo_x, hi_x = _sample_run(x0, bin_w, gw, W)
        count_y = tl.where(p_ok, hi_y - lo_y, 0)
        count_x = tl.where(p_ok, hi_x - lo_x, 0)
        for ty in range(tl.max(count_y)):
            y = _sample_coord(y0, bin_h, gh_f, lo_y + ty)
            y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
            y_ok = y_in & (ty < count_y)
            for tx in range(tl.max(count_x)):
                x = _sample_coord(x0, bin_w, gw_f, lo_x + tx)
                x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
                m = c_ok[:, None] & (y_ok & x_in & (tx < count_x))[None, :]
                tl.atomic_add(chan + (y_lo * g_sh + x_lo * g_sw)[None, :], (hy * hx)[None, :] * g, mask=m,
                              sem="relaxed")
                tl.atomic_add(chan + (y_lo * g_sh + x_hi * g_sw)[None, :], (hy * lx)[None, :] * g, mask=m,
                              sem="relaxed")
                tl.atomic_add(chan + (y_hi * g_sh + x_lo * g_sw)[None, :], (ly * hx)[None, :] * g, mask=m,
                              sem="relaxed")
                tl.atomic_add(chan + (y_hi * g_sh + x_hi * g_sw)[None, :], (ly * lx)[None, :] * g, mask=m,
                              sem="relaxed")


@triton.jit
def _roi_align_bwd_kernel(
    grad_ptr, arg_ptr, rois_ptr, gin_ptr, C, H, W, g_sn, g_sc, g_sh, g_sw, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, POOL_MAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_input[n_k, c, taps] += weight * grad[k, c, ph, pw], with float32 atomics
    k, cs, ps, offs, m = box_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = offs  # unused for avg
    if POOL_MAX:
        a = tl.load(arg_ptr + offs, mask=m, other=-1)
    _align_scatter(gin_ptr + n * g_sn, C, H, W, g_sc, g_sh, g_sw, y1, x1, bin_h, bin_w, gh, gw, cs, ps, g, a,
                   PH, PW, POOL_MAX)


@triton.jit
def _roi_align_runs_kernel(
    rois_ptr, lo_y_ptr, lo_x_ptr, win_ptr, H, W, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # For box k: lo_y[k, ph] (lo_x[k, pw]), where each bin's run of samples on the map starts, and the window
    # win[k] = (max_ph (hi - lo), max_pw (hi - lo)): the sample slots the deterministic backward gives the box.
    k = tl.program_id(0).to(tl.int64)
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    ph = tl.arange(0, BLOCK_H)
    pw = tl.arange(0, BLOCK_W)
    lo_y, hi_y = _sample_run(y1 + ph.to(tl.float32) * bin_h, bin_h, gh, H)
    lo_x, hi_x = _sample_run(x1 + pw.to(tl.float32) * bin_w, bin_w, gw, W)
    tl.store(lo_y_ptr + k * PH + ph, lo_y, mask=ph < PH)
    tl.store(lo_x_ptr + k * PW + pw, lo_x, mask=pw < PW)
    tl.store(win_ptr + k * 2, tl.max(tl.where(ph < PH, hi_y - lo_y, 0)))
    tl.store(win_ptr + k * 2 + 1, tl.max(tl.where(pw < PW, hi_x - lo_x, 0)))


@triton.jit
def _roi_align_entries_kernel(
    rois_ptr, lo_y_ptr, lo_x_ptr, win_ptr, base_ptr, key_ptr, src_ptr, w_ptr, tag_ptr, k0, slot0, width,
    num_cells, H, W, spatial_scale, sampling_ratio,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, POOL_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    # For box k = k0 + pid0 with window (WY, WX) and its slots j = (p * WY + ty) * WX + tx in [slot0, slot0 + width):
    # sample (iy, ix) = (lo_y[p] + ty, lo_x[p] + tx)'s 4 taps as entries (cell n * H * W + y * W + x, bin k * P + p,
    # weight [/ count for avg], tag iy * gw + ix) at 4 (base[pid0] + j - slot0) + t. A slot past the bin's own
    # grid, a tap off the map or of weight 0 gets the key num_cells = N * H * W (unused).
    k, p, ty, tx, j_ok, slot = entry_slots(win_ptr, base_ptr, k0, slot0, width, PH, PW, BLOCK)
    n, y1, x1, bin_h, bin_w, gh, gw = _align_box(rois_ptr, k, spatial_scale, sampling_ratio, PH, PW, ALIGNED)
    iy = tl.load(lo_y_ptr + k * PH + p // PW, mask=j_ok, other=0) + ty
    ix = tl.load(lo_x_ptr + k * PW + p % PW, mask=j_ok, other=0) + tx
    y = _sample_coord(y1 + (p // PW).to(tl.float32) * bin_h, bin_h, tl.maximum(gh, 1).to(tl.float32), iy)
    x = _sample_coord(x1 + (p % PW).to(tl.float32) * bin_w, bin_w, tl.maximum(gw, 1).to(tl.float32), ix)
    y_lo, y_hi, hy, ly, y_in = _axis_taps(y, H)
    x_lo, x_hi, hx, lx, x_in = _axis_taps(x, W)
    ok = j_ok & (iy < gh) & (ix < gw) & y_in & x_in
    scale = 1.0
    if not POOL_MAX:
        scale = tl.div_rn(1.0, tl.maximum(gh, 1).to(tl.float32) * tl.maximum(gw, 1).to(tl.float32))
    cell0 = n * H * W
    src = k * (PH * PW) + p
    tag = iy * gw.to(tl.int64) + ix
    store_tap_entries(key_ptr, src_ptr, w_ptr, slot * 4, j_ok, ok, cell0, W, num_cells, src, scale,
                      y_lo, y_hi, x_lo, x_hi, hy, ly, hx, lx, tag_ptr, tag)


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                      sampling_ratio: int, aligned: bool, pool_max: bool) -> tuple[Tensor, Tensor]:
    """Same contract as ``roikit.ops.pytorch.roi_align.roi_align_forward``."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_empty((k, c, pooled_height, pooled_width))
    argmax = torch.empty((k, c, pooled_height, pooled_width) if pool_max else (0,), dtype=torch.int64,
                         device=input.device)
    if k == 0 or c == 0:
        return out, argmax
    rois = rois.contiguous()
    grid, tile = box_grid(k, c, pooled_height * pooled_width)
    _roi_align_fwd_kernel[grid](
        input, rois, out, argmax, c, h, w, *input.stride(), float(spatial_scale), _grid_arg(sampling_ratio),
        PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), POOL_MAX=bool(pool_max), **tile,
    )
    return out, argmax


def _grid_arg(sampling_ratio: int) -> int:
    """``sampling_ratio`` capped at MAX_GRID, as the reference (<= 0 means adaptive)."""
    return max(min(int(sampling_ratio), MAX_GRID), 0)


def roi_align_backward(grad: Tensor, rois: Tensor, argmax: Tensor, spatial_scale: float, pooled_height: int,
                       pooled_width: int, batch_size: int, channels: int, height: int, width: int,
                       sampling_ratio: int, aligned: bool, pool_max: bool, deterministic: bool) -> Tensor:
    """Gradient with respect to the features, [N, C, H, W] in grad's dtype (float32 accumulation).

    ``deterministic=False``: float32 atomics. ``True``: the taps of every sample become sorted entries that
    each cell adds up in a fixed order (see ``_deterministic.py``): the same bits on every run.
    """
    gin = torch.zeros((batch_size, channels, height, width), dtype=torch.float32, device=grad.device)
    k = rois.shape[0]
    if k == 0 or gin.numel() == 0:
        return gin.to(grad.dtype)
    grad = grad.contiguous()
    rois = rois.contiguous()
    pooled = pooled_height * pooled_width
    if not deterministic:
        grid, tile = box_grid(k, channels, pooled)
        _roi_align_bwd_kernel[grid](
            grad, argmax if pool_max else grad, rois, gin, channels, height, width, *gin.stride(),
            float(spatial_scale), _grid_arg(sampling_ratio), PH=pooled_height, PW=pooled_width,
            ALIGNED=bool(aligned), POOL_MAX=bool(pool_max), **tile,
        )
        return gin.to(grad.dtype)
    deterministic_backward_into(gin, grad, rois, argmax, spatial_scale, pooled_height, pooled_width,
                                sampling_ratio, aligned, pool_max)
    return gin.to(grad.dtype)


def deterministic_backward_into(gin: Tensor, grad: Tensor, rois: Tensor, argmax: Tensor, spatial_scale: float,
                                pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
                                pool_max: bool) -> None:
    """Add the gradient of ``rois`` (contiguous grad [K, C, PH, PW]) into ``gin`` [N, C, H, W] float32, in an
    order fixed by the boxes: launch by launch (``_deterministic.entry_batches``), each cell's entries in generation
    order.

    Box k gets ``PH * PW * WY * WX`` sample slots, its window ``(WY, WX)`` the longest run of samples on the map of
    any of its bins (one sync with the host): bounded by the map (about ``2 H + 6`` rows with adaptive sampling),
    not by the box or ``sampling_ratio``. Memory: at most ``MAX_ENTRIES`` entries at a time.
    """
    n, c, h, w = gin.shape
    pooled = pooled_height * pooled_width
    ratio = _grid_arg(sampling_ratio)
    lo_y, lo_x, window = sample_runs(rois, h, w, spatial_scale, pooled_height, pooled_width, ratio, aligned)
    for b in entry_batches(window, pooled, MAX_ENTRIES, 4, gin.device, tag=True):  # 4 taps a sample slot
        _roi_align_entries_kernel[b.grid](
            rois, lo_y, lo_x, window, b.base, b.keys, b.src, b.weight, b.tag, b.k0, b.slot0, b.width, n * h * w, h, w,
            float(spatial_scale), ratio, PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned),
            POOL_MAX=bool(pool_max), BLOCK=b.block,
        )
        gather_bins(gin, b.keys, b.src, b.weight, b.tag if pool_max else None, grad, argmax if pool_max else None,
                    accumulate=not b.first)


def sample_runs(rois: Tensor, height: int, width: int, spatial_scale: float, pooled_height: int, pooled_width: int,
                ratio: int, aligned: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Where each bin row's (column's) run of samples on a ``height x width`` map starts, ``lo_y`` [K, PH]
    (``lo_x`` [K, PW]), and each box's window ``[K, 2]``: the longest run of any of its bins along y and x
    (``_roi_align_runs_kernel``); ``ratio`` as ``_grid_arg`` gives it."""
    k = rois.shape[0]
    lo_y = torch.empty((k, pooled_height), dtype=torch.int64, device=rois.device)
    lo_x = torch.empty((k, pooled_width), dtype=torch.int64, device=rois.device)
    window = torch.empty((k, 2), dtype=torch.int64, device=rois.device)
    _roi_align_runs_kernel[(k,)](
        rois, lo_y, lo_x, window, height, width, float(spatial_scale), ratio, PH=pooled_height, PW=pooled_width,
        ALIGNED=bool(aligned), BLOCK_H=triton.next_power_of_2(pooled_height),
        BLOCK_W=triton.next_power_of_2(pooled_width),
    )
    return lo_y, lo_x, window
