"""The CPU fast path: numba kernels for RoIAlign (average) and RoIPool, with the plain path as the reference.

``roi_align_forward`` / ``roi_pool_forward`` (and their backwards) in this package call these launchers first on
CPU tensors; a launcher returns ``None`` for what it does not take (numba missing, the path switched off, max
pooling, more than ``MAX_SAMPLES`` samples per bin and axis, RoIAlign on fewer than ``MIN_CHANNELS`` channels, a
map with 2^31 cells or more per plane), and the plain path runs instead. The launchers' box tables are numba ports
of :mod:`roikit.ops.geometry` (the plain path's code: the same operations in the boxes' dtype; tests compare them),
so both paths sample the same points with the same weights. They are built in numba, not with torch ops, because
torch 2.14 runs ``trunc``, ``floor``, ``ceil`` (and ``log2``, ``sqrt``, ``exp``) in an OpenMP parallel region even
on a few hundred values: on 2 busy cores each such op waited about 8 ms for torch's OpenMP worker (spinning, then
descheduled), 8 of them per RoIPool call (60 ms of a 75 ms call, against 14 ms of kernels).

Results: RoIPool and RoIAlign forward and backward give torchvision's bits (kernels in ``_numba_kernels`` and
``_numba_pool_kernels``; tests/test_jit_kernels.py, test_jit_roi_pool.py); the plain
path's RoIAlign (matrix products) agrees to rounding.

Costs (see docs/benchmarks.md): ``import numba`` about 0.3 s, on the first call of an op; the first call of each
kernel and dtype compiles it (a few seconds) into numba's cache (``cache=True``: ``__pycache__`` beside this file,
or ``NUMBA_CACHE_DIR``), and later processes load it from there in well under a second.

Switch: ``ROIKIT_JIT=0`` in the environment, or ``with jit.disabled():`` (the tests use it to run the plain
path). Threads: pieces of the boxes (forward) or channels (backward), taken in turn by the calling thread and a
small thread pool of this module, ``torch.get_num_threads()`` threads in all (:func:`_run`); the kernels
are serial and release the GIL. (numba's ``parallel=True``
was tried first: its ``prange`` loops ran about 2x slower on one thread, and its OpenMP layer spun between kernels,
slowing the torch ops around them 3-10x on 2 cores.)
"""
from __future__ import annotations

import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from ...utils.switches import ThreadSwitch
from .._utils import numba_module
from ..geometry import compute_dtype, sample_coord, sample_taps
from ._crops import CHUNK_BUDGET

MAX_SAMPLES = 64  # samples per bin and axis the kernels take (sampling_ratio, or the adaptive ceil(bin))
MIN_CHANNELS = 8  # RoIAlign with fewer channels runs the plain path: its sample tables, built with torch ops per
# box and sample, then cost more than the kernels save (a million boxes on one channel: 22 s against 4 s)
CHANNEL_BLOCK = 32  # channels per scratch block of the per-box forward kernels
TRANSPOSED_BLOCK = 64  # channels per channels-last block of the map, at most (64 ran 1.4x faster than 16)
BACKWARD_BLOCK = 16  # channels the RoIAlign backward adds at once (one vector per tap)
POOL_BACKWARD_BLOCK = 4  # channels the RoIPool backward adds at once (a box's rows of them read together; 512 boxes,
# 7 x 7, C=256, one thread: 24 ms in 1 channel, 12-13 ms in 2-8 on 25x34 to 100x136 maps, 4 the best on 200x272)
ALIGN_COPY_COST = 3  # a cell the per-box RoIAlign forward copies costs about 3 map cells made channels-last
# (fitted on 96 cases: pyramid levels of strides 4-32 x 8-512 boxes x 3 sizes x 7/14 bins; 3 lost 1.5% of the best
# time, 1 lost 7%)
ALIGN_BLOCK_VALUES = 1 << 18  # values of the RoIAlign forward's channels-last blocks at least allowed (1 MiB float32)
_plain = ThreadSwitch()  # on inside disabled(): the plain path, this thread


def _kernels():
    """RoIAlign's numba kernels (``_numba_kernels``), or None when numba cannot be imported."""
    return numba_module("pytorch._numba_kernels")


def _pool_kernels():
    """RoIPool's numba kernels (``_numba_pool_kernels``), or None when numba cannot be imported."""
    return numba_module("pytorch._numba_pool_kernels")


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads (one for each torch thread but the caller's; threads start as work comes)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roikit-jit")


def enabled() -> bool:
    """True when the numba path is on: numba importable, ``ROIKIT_JIT`` not ``0``, not inside :func:`disabled`."""
    if _plain.on or os.environ.get("ROIKIT_JIT", "1") == "0":
        return False
    return _kernels() is not None


def disabled():
    """Run the plain-PyTorch path inside a ``with`` block (this thread)."""
    return _plain.set(True)


def _takes(*tensors: Tensor) -> bool:
    """Whether the numba path is on (:func:`enabled`) for these tensors: all on the CPU."""
    for t in tensors:
        if not t.is_cpu:  # (is_cpu: device.type costs 0.5 us)
            return False
    return enabled()


def _channel_chunks(input: Tensor, dtype: torch.dtype):
    """``(c0, c1, map)``: the map's channels as contiguous [N, c, H, W] arrays in ``dtype``; one chunk when it already
    is one, else chunks of at most CHUNK_BUDGET values (a converted copy never exceeds that)."""
    n, c, h, w = input.shape
    if input.dtype == dtype and input.is_contiguous():
        yield 0, c, input
        return
    step = max(1, CHUNK_BUDGET // max(n * h * w, 1))
    for c0 in range(0, c, step):
        c1 = min(c0 + step, c)
        yield c0, c1, input[:, c0:c1].to(dtype).contiguous()


def _box_slices(count: int, per_box: int):
    """Slices of boxes whose tables hold at most CHUNK_BUDGET entries together."""
    step = max(1, CHUNK_BUDGET // max(per_box, 1))
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


_NUMPY_TYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "int16",
               torch.int32: "int32"}
FRESH_DTYPES = tuple(_NUMPY_TYPES)  # the dtypes fresh_tensor makes


def fresh_tensor(shape, dtype: torch.dtype, zeros: bool = True) -> Tensor:
    """A new CPU tensor (zeros, or uninitialized) whose memory comes from numpy: the OS hands it out zero-filled on
    first touch, and on Linux numpy asks for transparent huge pages from 4 MiB up (``madvise``). ``torch.zeros``
    writes every 4 KiB page up front: on this project's VM (2 cores, costly page faults) the 4 gradient maps of an
    FPN pyramid (2 x 256 channels, 150 MB) took 90-110 ms that way against 15-30 ms this way; pages never written
    stay the kernel's shared zero page. bfloat16 is numpy's int16 viewed as bfloat16."""
    import numpy as np

    array = (np.zeros if zeros else np.empty)(tuple(shape), dtype=_NUMPY_TYPES[dtype])
    out = torch.from_numpy(array)
    return out if out.dtype == dtype else out.view(dtype)


# ---------------------------------------------------------------- RoIAlign
def _axis_table(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, most: int, length: int):
    """Sample taps of one axis, [K, P, G] each: low, high (int32), w_low, w_high, valid (see ``sample_taps``)."""
    p = torch.arange(pooled)[None, :, None]
    i = torch.arange(most)[None, None, :]
    coord = sample_coord(start[:, None, None], bin_size[:, None, None], grid[:, None, None], p, i)
    valid = (i < grid[:, None, None]) & (coord >= -1.0) & (coord <= length)
    low, high, w_low, w_high = sample_taps(coord, valid, length)
    return low.int(), high.int(), w_low.contiguous(), w_high.contiguous(), valid


class _Declined(Exception):
    """A box this path does not take: the plain path runs the call."""


def _align_parts(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool,
                 height: int, width: int):
    """Yield, a slice of boxes at a time, numpy tables ``(slice, batch, y tables, x tables, gh * gw, cells)`` of at
    most CHUNK_BUDGET entries together (so only one slice's tables are held), built box by box by the kernels'
    ``roi_align_tables`` (geometry's arithmetic, as the plain path); ``cells``: what the per-box forward copies for
    the slice. Raises :class:`_Declined` for a box with more than MAX_SAMPLES samples per bin and axis, or a negative
    count (a reversed aligned box, adaptive)."""
    import numpy as np

    kernels = _kernels()
    boxes = rois.to(compute_dtype(rois)).contiguous().numpy()
    scale = boxes.dtype.type(spatial_scale)  # rounded to the boxes' dtype, as torch does
    least, most_y, most_x = kernels.roi_align_samples(boxes, scale, *pooled, sampling_ratio, aligned)
    if not (0 <= least and max(most_y, most_x) <= MAX_SAMPLES):
        raise _Declined
    for sl in _box_slices(len(boxes), 4 * (pooled[0] * most_y + pooled[1] * most_x)):
        k = sl.stop - sl.start
        y, x = ([np.empty((k, p, most), t) for t in (np.int32, np.int32, boxes.dtype, boxes.dtype, np.bool_)]
                for p, most in zip(pooled, (most_y, most_x)))
        batch, count = np.empty(k, np.int64), np.empty(k, np.int64)
        cells = kernels.roi_align_tables(boxes, sl.start, scale, sampling_ratio, aligned, height, width, batch, *y,
                                         *x, count)
        yield sl, batch, y, x, count, cells


def _transposed_step(input: Tensor) -> int:
    """Channels per channels-last block: TRANSPOSED_BLOCK, fewer (at least 16) where a block would exceed
    CHUNK_BUDGET / 4 values; each thread holds one block."""
    n, _, h, w = input.shape
    return max(16, min(TRANSPOSED_BLOCK, CHUNK_BUDGET // 4 // max(n * h * w, 1)))


def _align_step(input: Tensor, output_values: int) -> int:
    """Channels per channels-last block of the RoIAlign forward: the largest multiple of 8 up to TRANSPOSED_BLOCK
    (at least 8) whose blocks, one per thread, hold at most ALIGN_BLOCK_VALUES or a quarter of the output's values
    together. Small blocks stay in cache and keep the peak memory near the output's (a fine level: 8-16 channels
    ran 2x faster than 64 for a few dozen boxes); a large output (much work per map cell) takes up to 64 channels,
    whose longer vectors then pay (measured on 72 level x box-set cases: 3% over the best step of each)."""
    n, _, h, w = input.shape
    budget = max(ALIGN_BLOCK_VALUES, output_values // 4) // max(1, torch.get_num_threads())
    return max(8, min(TRANSPOSED_BLOCK, budget // max(n * h * w, 1)) // 8 * 8)


def _use_channels_last(cells: int, input: Tensor) -> bool:
    """Read channels-last blocks of the whole map (each thread transposes its own block, TRANSPOSED_BLOCK channels
    at a time) rather than a copy of each box's cells: when the boxes' copies cost more than the map has cells.
    ``cells``: the cells the boxes copy, in units of one map cell made channels-last (RoIAlign weighs each copied
    cell ALIGN_COPY_COST; RoIPool 1). Decided per call: per pyramid level, each level by its own boxes."""
    n, _, h, w = input.shape
    return cells > n * h * w


def _align_chunks(input: Tensor, dtype: torch.dtype):
    """``(c0, c1, array)``: the map for the RoIAlign forward kernels, as :func:`_channel_chunks` in ``dtype``; but a
    bfloat16 map with float32 sums as its bits (uint16; the kernels widen each value they read, exactly), so the
    kernels read only the cells they need instead of a float32 copy of the whole map."""
    if input.dtype == torch.bfloat16 and dtype == torch.float32:
        for c0, c1, chunk in _channel_chunks(input, torch.bfloat16):
            yield c0, c1, chunk.view(torch.uint16).numpy()
        return
    for c0, c1, chunk in _channel_chunks(input, dtype):
        yield c0, c1, chunk.numpy()


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                      sampling_ratio: int, aligned: bool) -> Tensor | None:
    """Average RoIAlign [K, C, PH, PW] in the map's dtype, or None when this path does not take the call."""
    n, c, h, w = input.shape
    if not _takes(input, rois) or h * w >= 2**31 or c < MIN_CHANNELS:
        return None
    dtype = compute_dtype(rois)
    pooled = (pooled_height, pooled_width)
    out = fresh_tensor((rois.shape[0], c, pooled_height, pooled_width), dtype, zeros=False)
    kernels = _kernels()
    try:
        for sl, batch, y, x, count, cells in _align_parts(rois, spatial_scale, pooled, sampling_ratio, aligned, h, w):
            tables = (batch, *y, *x, count.clip(min=1).astype(y[2].dtype))
            transposed = _use_channels_last(ALIGN_COPY_COST * cells, input)
            step = _align_step(input, (sl.stop - sl.start) * c * pooled_height * pooled_width)
            for c0, c1, feat in _align_chunks(input, dtype):
                if transposed:  # channel blocks in parallel, each made channels-last by its thread
                    _run(kernels.roi_align_forward_blocks, -(-(c1 - c0) // step), feat, step, *tables,
                         out[sl, c0:c1].numpy())
                    continue
                whole = (c0, c1) == (0, c)
                part = out[sl] if whole else torch.empty((sl.stop - sl.start, c1 - c0, *pooled), dtype=dtype)
                _run(kernels.roi_align_forward, len(batch), feat, *tables, part.numpy(), CHANNEL_BLOCK)
                if not whole:
                    out[sl, c0:c1] = part
    except _Declined:
        return None
    return out.to(input.dtype)


def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                       shape: tuple[int, int, int, int], sampling_ratio: int, aligned: bool) -> Tensor | None:
    """Gradient of average RoIAlign with respect to the map, [N, C, H, W] in ``grad``'s dtype, or None."""
    n, c, h, w = shape
    if not _takes(grad, rois) or h * w >= 2**31 or c < MIN_CHANNELS:
        return None
    dtype = compute_dtype(rois)
    pooled = (pooled_height, pooled_width)
    kernels = _kernels()
    try:
        if grad.dtype == torch.bfloat16 and dtype == torch.float32:
            parts = list(itertools.islice(_align_parts(rois, spatial_scale, pooled, sampling_ratio, aligned, h, w), 2))
            if len(parts) == 1:  # one slice of boxes: a block of channels is added up whole in float32, then rounded
                _, batch, y, x, count, _ = parts[0]
                out = fresh_tensor(shape, grad.dtype, zeros=False)
                _run(kernels.roi_align_backward_bits, c, grad.float().contiguous().numpy(), batch, *y, *x,
                     count.astype(y[2].dtype), out.view(torch.uint16).numpy(), BACKWARD_BLOCK)
                return out
        out = fresh_tensor(shape, grad.dtype)
        for c0, c1, g in _channel_chunks(grad, dtype):
            part = out if grad.dtype == dtype and (c0, c1) == (0, c) else fresh_tensor((n, c1 - c0, h, w), dtype)
            for sl, batch, y, x, count, _ in _align_parts(rois, spatial_scale, pooled, sampling_ratio, aligned, h, w):
                _run(kernels.roi_align_backward, c1 - c0, g[sl].contiguous().numpy(), batch, *y, *x,
                     count.astype(y[2].dtype), part.numpy(), BACKWARD_BLOCK)
            if part is not out:
                out[:, c0:c1] = part
    except _Declined:
        return None
    return out


# ---------------------------------------------------------------- RoIPool
_POOL_TYPES = (torch.float32, torch.float64, torch.bfloat16)  # read as they are (bfloat16 as its bits, compared in
# float32: exact); other dtypes as float32 copies


def _pool_array(t: Tensor):
    """The numpy array the RoIPool kernels read or write for ``t``: bfloat16 as its bits (uint16)."""
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _pool_chunks(x: Tensor):
    """``(c0, c1, array)``: the channels (dim 1) of ``x`` as contiguous arrays for the RoIPool kernels (see
    :func:`_pool_array`); one chunk when ``x`` already is one, else chunks of at most CHUNK_BUDGET values."""
    kind = x.dtype if x.dtype in _POOL_TYPES else torch.float32
    c = x.shape[1]
    if x.dtype == kind and x.is_contiguous():
        yield 0, c, _pool_array(x)
        return
    step = max(1, CHUNK_BUDGET // max(x.numel() // max(c, 1), 1))
    for c0 in range(0, c, step):
        c1 = min(c0 + step, c)
        yield c0, c1, _pool_array(x[:, c0:c1].to(kind).contiguous())


def _run(kernel, count: int, *args, per_thread: int = 8) -> None:
    """``kernel(begin, end, *args)`` over ``0 .. count`` in ``per_thread`` pieces per torch thread, which the calling
    thread and up to ``torch.get_num_threads() - 1`` pool threads take in turn (any piece, its own bits: boxes or
    channels are independent). The caller never waits for a pool thread that has not started: one the OS runs late
    leaves its share to the others, and once the caller has run out of pieces, a pool task still queued is
    cancelled rather than waited for (only pieces already under way are). On 2 busy cores the pool's thread started
    0.1-18 ms late (median 2.7 ms after torch ops that leave torch's OpenMP worker spinning); two fixed halves made
    512 small boxes at 7 x 7 take 40-150 ms against 10 ms on one thread."""
    threads = max(1, min(torch.get_num_threads(), count))
    if threads == 1:
        kernel(0, count, *args)
        return
    pieces = min(count, threads * per_thread)
    bounds = [count * i // pieces for i in range(pieces + 1)]
    left = iter(range(pieces))  # shared: each next() is atomic under the GIL

    def work():
        for i in left:
            kernel(bounds[i], bounds[i + 1], *args)

    pool = _pool(max(1, torch.get_num_threads() - 1))  # sized by the torch threads, not the CPUs
    futures = [pool.submit(work) for _ in range(threads - 1)]
    work()
    for f in futures:
        if not f.cancel():  # started: it may be running a piece, which must end before the call returns
            f.result()


def _compute_type(dtype: torch.dtype):
    import numpy as np

    return np.float64 if dtype == torch.float64 else np.float32


def roi_pool_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                     rounding: str, with_argmax: bool = True) -> tuple[Tensor, Tensor | None] | None:
    """RoIPool's output [K, C, PH, PW] in the map's dtype and argmax (int32; None when not ``with_argmax``: the
    kernels then only take maxima, for inference), or None when this path does not take the call."""
    import numpy as np

    n, c, h, w = input.shape
    if not _takes(input, rois) or h * w >= 2**31:
        return None
    k = rois.shape[0]
    bins = pooled_height * pooled_width
    dtype = input.dtype if input.dtype in _POOL_TYPES else torch.float32
    compute = _compute_type(dtype)
    out = fresh_tensor((k, c, bins), dtype, zeros=False)
    argmax = fresh_tensor((k, c, bins), torch.int32, zeros=False) if with_argmax else None
    no_argmax = np.empty((0, 0, 0), np.int32)
    kernels = _pool_kernels()
    boxes = rois.to(compute_dtype(rois)).contiguous().numpy()
    scale = boxes.dtype.type(spatial_scale)  # rounded to the boxes' dtype, as torch does
    for sl in _box_slices(k, 4 * (pooled_height + pooled_width)):
        rows = sl.stop - sl.start
        tables = (np.empty(rows, np.int64), *(np.empty((rows, p), np.int64) for p in (pooled_height,) * 2 +
                                              (pooled_width,) * 2))
        cells = kernels.roi_pool_tables(boxes, sl.start, scale, rounding == "torchvision", h, w, *tables)
        transposed, step = _use_channels_last(cells, input), _transposed_step(input)
        for c0, c1, feat in _pool_chunks(input):
            whole = (c0, c1) == (0, c)
            part = out[sl] if whole else torch.empty((sl.stop - sl.start, c1 - c0, bins), dtype=dtype)
            arg = None if argmax is None else argmax[sl] if whole else torch.empty(part.shape, dtype=torch.int32)
            arrays = (_pool_array(part), no_argmax if arg is None else arg.numpy())
            if transposed:  # channel blocks in parallel, each made channels-last by its thread
                _run(kernels.roi_pool_forward_blocks, -(-(c1 - c0) // step), feat, step, *tables, *arrays,
                            compute)
            else:
                _run(kernels.roi_pool_forward, len(tables[0]), feat, *tables, *arrays, CHANNEL_BLOCK, compute)
            if not whole:
                out[sl, c0:c1] = part
                if arg is not None:
                    argmax[sl, c0:c1] = arg
    shape = (k, c, pooled_height, pooled_width)
    return out.view(shape).to(input.dtype), None if argmax is None else argmax.view(shape)


def roi_pool_backward(grad: Tensor, rois: Tensor, argmax: Tensor, shape: tuple[int, int, int, int]) -> Tensor | None:
    """RoIPool's gradient with respect to the map, [N, C, H, W] in ``grad``'s dtype, or None. bfloat16 adds in
    float32 (one channel's planes at a time, in the kernel) and rounds once at the end; float16 the same through
    float32 chunks."""
    n, c, h, w = shape
    if not _takes(grad, rois):
        return None
    k = grad.shape[0]
    dtype = grad.dtype if grad.dtype in _POOL_TYPES else torch.float32
    out = fresh_tensor((n, c, h * w), grad.dtype, zeros=False)  # every cell written by the kernel
    batch = rois[:, 0].long().contiguous().numpy()
    for c0, c1, g in _pool_chunks(grad.reshape(k, c, -1)):
        whole = (c0, c1) == (0, c) and dtype == grad.dtype
        part = out if whole else torch.empty((n, c1 - c0, h * w), dtype=dtype)
        arg = argmax[:, c0:c1].reshape(k, c1 - c0, -1).contiguous().numpy()
        _run(_pool_kernels().roi_pool_backward, c1 - c0, g, batch, arg, _pool_array(part), _compute_type(dtype),
                    POOL_BACKWARD_BLOCK)
        if part is not out:
            out[:, c0:c1] = part
    return out.reshape(shape)
