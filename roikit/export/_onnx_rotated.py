"""ONNX translation of ``roikit::roi_align_rotated`` in standard operators (opset 18), for the dynamo exporter.

The rotated grid is not separable (a sample's row and column depend on both of its box-frame coordinates), so the
samples are laid out explicitly, as roikit's CPU path does (``roikit.ops.pytorch.roi_align_rotated``):

* sample ``(iy, ix)`` of bin ``(ph, pw)`` sits at ``yy = (-h / 2 + ph bin_h) + (iy + 0.5) bin_h / g`` (and ``xx``
  the same along the width) in the box's frame, turned by ``theta`` about the centre with ``Cos`` / ``Sin``:
  ``y = yy cos - xx sin + cy``, ``x = yy sin + xx cos + cx``;
* a sample outside ``[-1, H] x [-1, W]`` is 0; one inside is clamped to the map and read through its four bilinear
  taps (``Floor``, the last row / column taken twice with weight 0), ``Gather``ed from the map as rows of a
  channels-last ``[N H W, C]`` copy; the bin is the mean of its ``g * g`` samples. A sample that cannot read the
  map (off it, a batch index out of range, an empty map) reads an extra zero row, so ``Gather`` never fails.

**Bounded memory.** The boxes are pooled in chunks of ``B`` by an ONNX ``Scan``: ``B = max(1, CHUNK_VALUES //
(PH PW g^2 4 (C + 8)))``, so one iteration holds at most about ``CHUNK_VALUES`` values (16 MiB of float32) of
samples, taps and gathered features, whatever the number of boxes; the rest is the map's channels-last copy and
the output. Only a fixed ``sampling_ratio > 0`` exports: with adaptive sampling (``<= 0``) the count
``ceil(bin size)`` depends on each box's size, and a graph would have to lay out the largest box's count for
every box, so memory would grow with the boxes' size; the export stops with a ``ValueError`` saying so.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import onnxscript.evaluator
from onnxscript import ir
from onnxscript import opset18 as op

from ._onnx_ops import INT64, _column, _const, _dim, _like

CHUNK_VALUES = 2**22  # values of one Scan iteration's samples, taps and gathered features (16 MiB of float32)
MAX_CELLS = 2.0**52  # box coordinates in cells are clamped to +-2^52, as roikit.ops.geometry.MAX_CELLS
BOOL = ir.DataType.BOOL
_names = itertools.count()


class UnsupportedExport(ValueError):
    """A setting that roikit's ONNX translations refuse; :func:`roikit.export.onnx_export` raises it as it is."""


class _Recorder:
    """Records the ``op.*`` calls made while it is onnxscript's default evaluator as nodes of a subgraph (the body
    of a ``Scan``). Every call here passes inputs positionally and attributes by keyword; one output each."""

    def __init__(self):
        self.nodes: list[ir.Node] = []

    def eval_op(self, onnx_op, args, kwargs):
        attributes = ir.convenience.convert_attributes({k: v for k, v in kwargs.items() if v is not None})
        node = ir.Node("", onnx_op.name, list(args), attributes=attributes, num_outputs=1)
        self.nodes.append(node)
        return node.outputs[0]

    def eval_function(self, function, args, kwargs):
        raise NotImplementedError("the Scan body records ONNX operators only")


def _scan_body(build, input_type: ir.DataType, prefix: str) -> ir.Graph:
    """A ``Scan`` body: one scan input, a chunk of boxes [B, 6] of ``input_type``, and one scan output,
    ``build(chunk)``. Values of the outer graph may be used."""
    chunk = ir.Value(name=f"{prefix}_boxes", type=ir.TensorType(input_type), shape=ir.Shape([None, 6]))
    recorder = _Recorder()
    with onnxscript.evaluator.default_as(recorder):
        result = build(chunk)
    for i, node in enumerate(recorder.nodes):  # names unique in the whole model (a subgraph may not shadow)
        for j, value in enumerate(node.outputs):
            value.name = value.name or f"{prefix}_{i}_{j}"
    return ir.Graph([chunk], [result], nodes=recorder.nodes, name=prefix)


def _taps(coord, valid, length):
    """:func:`roikit.ops.geometry.sample_taps` in ONNX: low and high cells (float, whole numbers) and their
    weights (0 for an invalid sample); ``coord`` inside ``[-1, length]`` is clamped to the map."""
    zero, one = _like(0.0, coord), _like(1.0, coord)
    y = op.Where(valid, op.Max(coord, zero), zero)
    last = op.Sub(op.CastLike(length, coord), one)
    low = op.Floor(y)
    at_end = op.GreaterOrEqual(low, last)
    low = op.Where(at_end, last, low)
    high = op.Where(at_end, low, op.Add(low, one))
    frac = op.Where(op.Or(at_end, op.Not(valid)), zero, op.Sub(y, low))
    return low, high, op.Where(valid, op.Sub(one, frac), zero), op.Where(valid, frac, zero)


def _bin_samples(start, bin_size, pooled: int, grid: int):
    """Box-frame positions of every sample along one axis: [B, P, G] (``sample_coord``'s order of operations)."""
    p = op.Unsqueeze(op.CastLike(op.Range(_const(0), _const(pooled), _const(1)), start), _const([0, 2]))
    i = op.Unsqueeze(op.CastLike(op.Range(_const(0), _const(grid), _const(1)), start), _const([0, 1]))
    s, b = op.Unsqueeze(start, _const([1, 2])), op.Unsqueeze(bin_size, _const([1, 2]))
    return op.Add(op.Add(s, op.Mul(p, b)), op.Div(op.Mul(op.Add(i, _like(0.5, start)), b), _like(float(grid), start)))


def _pool_chunk(rois, values, size, spatial_scale: float, pooled: tuple[int, int], grid: int, aligned: bool,
                clockwise: bool, radians: bool):
    """Rotated RoIAlign of the boxes ``rois`` [B, 6] (compute dtype) on ``values`` [N H W + 1, C] (the map's cells,
    then a row of zeros), ``size`` = (N, H, W) ([1] int64 each): [B, C, PH, PW]."""
    n, height, width = size
    scale, limit = _like(spatial_scale, rois), _like(MAX_CELLS, rois)
    offset = _like(0.5 if aligned else 0.0, rois)
    cx, cy, w, h = (op.Clip(op.Mul(_column(rois, i), scale), op.Neg(limit), limit) for i in (1, 2, 3, 4))
    cx, cy = op.Sub(cx, offset), op.Sub(cy, offset)
    if not aligned:  # mmcv's legacy rule: at least 1 x 1 cell
        w, h = op.Max(w, _like(1.0, rois)), op.Max(h, _like(1.0, rois))
    theta = op.Cast(_column(rois, 5), to=ir.DataType.DOUBLE.value)  # degrees * pi / 180 in float64, as detectron2
    if not radians:
        theta = op.Div(op.Mul(theta, _const(math.pi, np.float64)), _const(180.0, np.float64))
    if clockwise:
        theta = op.Neg(theta)
    theta = op.Cast(op.CastLike(theta, rois), to=ir.DataType.DOUBLE.value)  # rounded to the compute dtype
    two = _like(2.0, rois)
    yy = _bin_samples(op.Div(op.Neg(h), two), op.Div(h, _like(float(pooled[0]), rois)), pooled[0], grid)
    xx = _bin_samples(op.Div(op.Neg(w), two), op.Div(w, _like(float(pooled[1]), rois)), pooled[1], grid)
    yy, xx = op.Unsqueeze(yy, _const([3, 4])), op.Unsqueeze(xx, _const([1, 2]))  # -> [B, PH, G, PW, G]
    per_box = _const([1, 2, 3, 4])
    # Cos / Sin in float64, rounded: closer to torch's float32 cos / sin than onnxruntime's float32 ones
    cos, sin = (op.Unsqueeze(op.CastLike(f(theta), rois), per_box) for f in (op.Cos, op.Sin))
    y = op.Add(op.Sub(op.Mul(yy, cos), op.Mul(xx, sin)), op.Unsqueeze(cy, per_box))
    x = op.Add(op.Add(op.Mul(yy, sin), op.Mul(xx, cos)), op.Unsqueeze(cx, per_box))
    minus_one = _like(-1.0, rois)
    valid = op.And(op.And(op.GreaterOrEqual(y, minus_one), op.LessOrEqual(y, op.CastLike(height, rois))),
                   op.And(op.GreaterOrEqual(x, minus_one), op.LessOrEqual(x, op.CastLike(width, rois))))
    y_low, y_high, wy_low, wy_high = _taps(y, valid, height)
    x_low, x_high, wx_low, wx_high = _taps(x, valid, width)
    batch = op.Unsqueeze(op.Cast(_column(rois, 0), to=INT64), per_box)
    # samples that read the map; the others (off the map, a batch index out of range, an empty map) read the zero
    # row, so Gather never fails
    zero = _const([0])
    reads = op.And(op.And(valid, op.And(op.GreaterOrEqual(batch, zero), op.Less(batch, n))),
                   op.And(op.Greater(height, zero), op.Greater(width, zero)))
    zero_row = op.Mul(op.Mul(n, height), width)
    base = op.Mul(batch, height)  # image n's first row
    total = None
    for row, wr in ((y_low, wy_low), (y_high, wy_high)):
        row_start = op.Mul(op.Add(base, op.Cast(row, to=INT64)), width)
        for col, wc in ((x_low, wx_low), (x_high, wx_high)):
            index = op.Where(reads, op.Add(row_start, op.Cast(col, to=INT64)), zero_row)
            read = op.Gather(values, index, axis=0)  # [B, PH, G, PW, G, C]
            tap = op.Mul(read, op.Unsqueeze(op.Mul(wr, wc), _const([5])))
            total = tap if total is None else op.Add(total, tap)
    # an off-map sample reads nothing (its cell may hold NaN); bins: the mean of g * g samples
    total = op.Where(op.Unsqueeze(valid, _const([5])), total, _like(0.0, rois))
    mean = op.Div(op.ReduceSum(total, _const([2, 4]), keepdims=0), _like(float(grid * grid), rois))  # [B, PH, PW, C]
    return op.Transpose(mean, perm=[0, 3, 1, 2])


def roi_align_rotated(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                      aligned: bool, clockwise: bool, radians: bool):
    """``roikit::roi_align_rotated`` -> [K, C, PH, PW], the boxes pooled ``B`` at a time by a ``Scan``."""
    if sampling_ratio <= 0:
        raise UnsupportedExport(
            f"roi_align_rotated with sampling_ratio={sampling_ratio} (adaptive: ceil(bin size) samples per box) cannot "
            "be exported to ONNX with bounded memory, as the sample count depends on each box's size; export with a "
            "fixed sampling_ratio > 0 (e.g. sampling_ratio=2, RoIPooler(..., sampling_ratio=2))")
    grid = sampling_ratio
    compute = ir.DataType.DOUBLE if rois.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    r = op.Cast(rois, to=compute.value)
    n, c, height, width = (_dim(input, i) for i in range(4))
    values = op.Reshape(op.Transpose(op.Cast(input, to=compute.value), perm=[0, 2, 3, 1]),
                        op.Concat(op.Mul(op.Mul(n, height), width), c, axis=0))  # [N H W, C]
    zeros = op.ConstantOfShape(op.Concat(_const([1]), c, axis=0), value=ir.tensor(np.zeros((1,), np.float32)))
    values = op.Concat(values, op.CastLike(zeros, values), axis=0)  # [N H W + 1, C]: the last row reads 0
    per_box = _const([pooled_height * pooled_width * grid * grid * 4])
    chunk = op.Max(op.Div(_const([CHUNK_VALUES]), op.Mul(per_box, op.Add(c, _const([8])))), _const([1]))  # [1]
    k = _dim(rois, 0)
    trips = op.Max(op.Div(op.Sub(op.Add(k, chunk), _const([1])), chunk), _const([1]))  # ceil(K / B), at least 1
    padded = op.Pad(r, op.Concat(_const([0, 0]), op.Sub(op.Mul(trips, chunk), k), _const([0]), axis=0))
    chunks = op.Reshape(padded, op.Concat(trips, chunk, _const([6]), axis=0))  # [T, B, 6]

    def body(boxes):
        return _pool_chunk(boxes, values, (n, height, width), spatial_scale, (pooled_height, pooled_width), grid,
                           aligned, clockwise, radians)

    stacked = op.Scan(chunks, body=_scan_body(body, compute, f"roi_align_rotated{next(_names)}"), num_scan_inputs=1)
    shape = op.Concat(op.Mul(trips, chunk), c, _const([pooled_height, pooled_width]), axis=0)
    out = op.Slice(op.Reshape(stacked, shape), _const([0]), k, _const([0]))  # [K, C, PH, PW]
    return op.CastLike(out, input)
