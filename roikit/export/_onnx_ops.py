"""ONNX translations of roikit's ops for the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

Each function receives the op's ONNX values and settings (as the ``torch.ops.roikit.*`` schema gives them) and
builds the op from standard ONNX operators (opset 18), so the exported model runs in plain onnxruntime:

* ``roi_align`` (avg) is ONNX ``RoiAlign`` (``coordinate_transformation_mode`` ``half_pixel`` for ``aligned=True``,
  ``output_half_pixel`` for ``False``; ``sampling_ratio <= 0`` is its adaptive ``0``).
* ``roi_pool`` is ONNX ``MaxRoiPool``: as it is for ``rounding="torchvision"``, and for ``rounding="integer"`` on
  boxes rounded here to whole cells whose bins ``MaxRoiPool`` then cuts exactly as the integer rule does.
* ``multilevel_roi_align``: the FPN level rule, then ``RoiAlign`` per level on that level's boxes (``NonZero``,
  ``Gather``, ``ScatterND``), as torchvision's ``MultiScaleRoIAlign`` exports.
* ``roi_align`` (max), ``prroi_pool``, ``ps_roi_align``, ``ps_roi_pool``: every bin is ``Wy[p] @ F @ Wx[q]^T`` with
  a weight matrix per box and axis (bilinear taps of the samples, exact tent integrals, or 0/1 cells), two
  ``MatMul``s (see :func:`_separable`). Memory of the graph: ``K * PH * C * W`` for the first product, and for
  ``roi_align(pool="max")`` ``K * C * (PH G) * (PW G)`` with ``G`` samples per bin and axis (with adaptive
  sampling, ``G`` is the largest box's ``ceil(bin size)``: a huge box is expensive here, unlike in roikit's kernels).

``roi_align_rotated`` is in :mod:`roikit.export._onnx_rotated` (explicit rotated samples, a ``Scan`` over chunks
of boxes).

ONNX's own ``RoiAlign`` ``mode="max"`` is not used: onnxruntime takes the largest of the 4 weighted taps
``w_i * v_i`` of each sample instead of the largest interpolated sample ``sum_i w_i v_i`` (mmcv's and roikit's).
"""
from __future__ import annotations

import numpy as np
from onnxscript import ir
from onnxscript import opset18 as op

FLOAT64 = ir.DataType.DOUBLE.value
INT64 = ir.DataType.INT64.value
INT32 = ir.DataType.INT32.value


# ---------------------------------------------------------------- small helpers
def _const(values, dtype=np.int64):
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))


def _column(rois, i: int):
    """Column ``i`` of ``rois`` [K, 5] as [K]."""
    return op.Squeeze(op.Slice(rois, _const([i]), _const([i + 1]), _const([1])), _const([1]))


def _batch_index(rois):
    return op.Cast(_column(rois, 0), to=INT64)


def _dim(x, axis: int):
    """The size of ``x`` along ``axis`` as an int64 tensor of shape [1]."""
    return op.Shape(x, start=axis, end=axis + 1)


def _like(value: float, ref):
    return op.CastLike(_const(value, np.float64), ref)


def _round_half_away(x):
    """C's ``round()`` (halves away from zero), as :func:`roikit.ops.geometry.round_half_away`."""
    a = op.Abs(x)
    f = op.Floor(a)
    r = op.Where(op.GreaterOrEqual(op.Sub(a, f), _like(0.5, x)), op.Add(f, _like(1.0, x)), f)
    return op.Mul(op.Sign(x), r)


def _positions(length, ref):
    """Cell indices ``0 .. length - 1`` as a float tensor like ``ref``: [L]."""
    return op.CastLike(op.Range(_const(0), op.Squeeze(length, _const([0])), _const(1)), ref)


def _empty_argmax():
    return _const(np.zeros((0,), np.int64))


def _zero_argmax(out):
    return op.ConstantOfShape(op.Shape(out), value=ir.tensor(np.zeros((1,), np.int32)))


# ---------------------------------------------------------------- the separable form
def _batch_blocks(wy, batch, n):
    """``wy`` [K, P, H] placed in the block of each box's image: [K, P, N, H] (zeros in the other blocks)."""
    images = op.Range(_const(0), op.Squeeze(n, _const([0])), _const(1))
    onehot = op.CastLike(op.Equal(op.Unsqueeze(batch, _const([1])), images), wy)  # [K, N]
    return op.Mul(op.Unsqueeze(onehot, _const([1, 3])), op.Unsqueeze(wy, _const([2])))


def _separable(features, batch, wy, wx):
    """``out[k, c, p, q] = sum_ij wy[k, p, i] F[b_k, c, i, j] wx[k, q, j]``: [K, C, P, Q].

    ``wy`` [K, P, H], ``wx`` [K, Q, W] in the features' dtype, ``batch`` [K] int64. The image of each box is
    picked by a one-hot block of ``wy`` over the batch (``[K P, N H] @ [N H, C W]``), so no per-box copy of the map
    is made."""
    n, c, h, w = (_dim(features, i) for i in range(4))
    k, p = _dim(wy, 0), _dim(wy, 1)
    wy_full = op.Reshape(_batch_blocks(wy, batch, n), op.Concat(op.Mul(k, p), op.Mul(n, h), axis=0))
    f2 = op.Reshape(op.Transpose(features, perm=[0, 2, 1, 3]), op.Concat(op.Mul(n, h), op.Mul(c, w), axis=0))
    rows = op.Reshape(op.MatMul(wy_full, f2), op.Concat(k, p, c, w, axis=0))  # [K, P, C, W]
    out = op.MatMul(rows, op.Unsqueeze(op.Transpose(wx, perm=[0, 2, 1]), _const([1])))  # [K, P, C, Q]
    return op.Transpose(out, perm=[0, 2, 1, 3])


def _separable_ps(features, batch, wy, wx):
    """Position-sensitive :func:`_separable`: bin (p, q) of channel c reads input channel ``(c P + p) Q + q``
    only. ``features`` [N, C' P Q, H, W] -> [K, C', P, Q]."""
    n, c, h, w = (_dim(features, i) for i in range(4))
    k, p, q = _dim(wy, 0), _dim(wy, 1), _dim(wx, 1)
    c_out = op.Div(c, op.Mul(p, q))
    f6 = op.Reshape(features, op.Concat(n, c_out, p, q, h, w, axis=0))
    f3 = op.Reshape(op.Transpose(f6, perm=[2, 0, 4, 1, 3, 5]),  # [P, N, H, C', Q, W]
                    op.Concat(p, op.Mul(n, h), op.Mul(op.Mul(c_out, q), w), axis=0))
    wy_full = op.Transpose(_batch_blocks(wy, batch, n), perm=[1, 0, 2, 3])  # [P, K, N, H]
    wy_full = op.Reshape(wy_full, op.Concat(p, k, op.Mul(n, h), axis=0))
    rows = op.Reshape(op.MatMul(wy_full, f3), op.Concat(p, k, c_out, q, w, axis=0))  # [P, K, C', Q, W]
    out = op.ReduceSum(op.Mul(rows, op.Unsqueeze(wx, _const([0, 2]))), _const([4]), keepdims=0)  # [P, K, C', Q]
    return op.Transpose(out, perm=[1, 2, 0, 3])


# ---------------------------------------------------------------- axis weights
def _sample_grid(rois, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool):
    """:func:`roikit.ops.geometry.sampling_grid` in ONNX: per axis (y, x) the start [K], bin size [K] and samples
    per bin [K] (int64)."""
    axes = []
    for pooled_n, (lo, hi) in zip(pooled, ((2, 4), (1, 3))):
        start = op.Mul(_column(rois, lo), _like(spatial_scale, rois))
        end = op.Mul(_column(rois, hi), _like(spatial_scale, rois))
        if aligned:
            start, end = op.Sub(start, _like(0.5, rois)), op.Sub(end, _like(0.5, rois))
        size = op.Sub(end, start)
        if not aligned:
            size = op.Max(size, _like(1.0, rois))
        bin_size = op.Div(size, _like(float(pooled_n), rois))
        if sampling_ratio > 0:
            grid = op.Expand(_const([sampling_ratio]), op.Shape(start))
        else:
            grid = op.Max(op.Cast(op.Ceil(bin_size), to=INT64), _const([0]))
        axes.append((start, bin_size, grid))
    return axes


def _sample_weights(start, bin_size, grid, pooled: int, length, slots):
    """Bilinear tap weights of every sample along one axis: [K, P, G, L] (0 for a sample outside ``[-1, L]`` or a
    slot past the box's ``grid`` samples), with ``slots`` = G, the samples per bin to lay out ([1] int64).

    A sample at ``y`` (``-1 <= y <= L``) gives cell ``i`` the weight ``hat(clamp(y, 0, L - 1) - i)``, torchvision's
    two taps."""
    p = op.CastLike(op.Range(_const(0), _const(pooled), _const(1)), start)  # [P]
    i = op.Range(_const(0), op.Squeeze(slots, _const([0])), _const(1))  # [G] int64
    g = op.CastLike(op.Max(grid, _const([1])), start)
    s = op.Unsqueeze(start, _const([1, 2]))
    b = op.Unsqueeze(bin_size, _const([1, 2]))
    coord = op.Add(op.Add(s, op.Mul(op.Unsqueeze(p, _const([0, 2])), b)),
                   op.Div(op.Mul(op.Add(op.CastLike(op.Unsqueeze(i, _const([0, 1])), start), _like(0.5, start)), b),
                          op.Unsqueeze(g, _const([1, 2]))))  # [K, P, G]
    length_f = op.CastLike(length, start)
    valid = op.And(op.GreaterOrEqual(coord, _like(-1.0, start)), op.LessOrEqual(coord, length_f))
    valid = op.And(valid, op.Less(op.Unsqueeze(i, _const([0, 1])), op.Unsqueeze(grid, _const([1, 2]))))
    y = op.Min(op.Max(coord, _like(0.0, start)), op.Sub(length_f, _like(1.0, start)))
    cells = _positions(length, start)  # [L]
    weight = op.Relu(op.Sub(_like(1.0, start), op.Abs(op.Sub(op.Unsqueeze(y, _const([3])), cells))))
    return op.Mul(weight, op.CastLike(op.Unsqueeze(valid, _const([3])), start)), valid  # [K, P, G, L], [K, P, G]


def _mean_weights(start, bin_size, grid, pooled: int, length):
    """Each bin's mean over its samples: [K, P, L] (RoIAlign's average, :func:`_sample_weights` summed / g)."""
    slots = op.Max(op.ReduceMax(op.Concat(grid, _const([1]), axis=0), keepdims=1), _const([1]))
    weight, _ = _sample_weights(start, bin_size, grid, pooled, length, slots)
    g = op.CastLike(op.Max(grid, _const([1])), start)
    return op.Div(op.ReduceSum(weight, _const([2]), keepdims=0), op.Unsqueeze(g, _const([1, 2])))


def _hat(t):
    return op.Relu(op.Sub(_like(1.0, t), op.Abs(t)))


def _hat_mean(t0, t1):
    """:func:`roikit.ops.geometry.hat_mean`'s mean: the tent's pieces between its kinks -1, 0, 1."""
    edges = [t0] + [op.Min(op.Max(_like(k, t0), t0), t1) for k in (-1.0, 0.0, 1.0)] + [t1]
    total = None
    for a, b in zip(edges[:-1], edges[1:]):
        piece = op.Mul(op.Sub(b, a), _hat(op.Mul(_like(0.5, t0), op.Add(a, b))))
        total = piece if total is None else op.Add(total, piece)
    width = op.Sub(t1, t0)
    positive = op.Greater(width, _like(0.0, t0))
    return op.Where(positive, op.Div(total, op.Where(positive, width, _like(1.0, t0))), _hat(t0))


def _prroi_weights(start, end, pooled: int, length):
    """PrRoIPool's exact tent means of one axis: [K, P, L] (float64), as ``roikit.ops.pytorch.prroi_pool``."""
    size = op.Max(op.Sub(end, start), _like(0.0, start))
    bin_size = op.Div(size, _like(float(pooled), start))
    real = op.Greater(bin_size, _like(0.0, start))
    b = op.Unsqueeze(op.Where(real, bin_size, _like(1.0, start)), _const([1, 2]))
    p = op.Unsqueeze(op.CastLike(op.Range(_const(0), _const(pooled), _const(1)), start), _const([0, 2]))
    lo = op.Add(op.Unsqueeze(start, _const([1, 2])), op.Mul(p, b))  # [K, P, 1]
    hi = op.Min(op.Add(lo, b), op.Max(op.Unsqueeze(end, _const([1, 2])), lo))
    cells = _positions(length, start)
    weight = _hat_mean(op.Sub(lo, cells), op.Sub(hi, cells))  # [K, P, L]
    return op.Where(op.Unsqueeze(real, _const([1, 2])), weight, _like(0.0, start))


def _cell_weights(first, last, length, ref):
    """1 / (cells in the bin) on the cells ``[first, last)`` of each bin, else 0: [K, P, L]."""
    cells = op.Range(_const(0), op.Squeeze(length, _const([0])), _const(1))
    inside = op.And(op.GreaterOrEqual(cells, op.Unsqueeze(first, _const([2]))),
                    op.Less(cells, op.Unsqueeze(last, _const([2]))))
    count = op.CastLike(op.Max(op.Sub(last, first), _const([1])), ref)
    return op.Div(op.CastLike(inside, ref), op.Unsqueeze(count, _const([2])))


# ---------------------------------------------------------------- the ops
def roi_align(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
              aligned: bool, pool_max: bool):
    """``roikit::roi_align`` -> (out [K, C, PH, PW], argmax: empty for avg, zeros for max (inference only))."""
    rois = op.CastLike(rois, input)
    if not pool_max:
        out = op.RoiAlign(input, op.Slice(rois, _const([1]), _const([5]), _const([1])), _batch_index(rois),
                          coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
                          mode="avg", output_height=pooled_height, output_width=pooled_width,
                          sampling_ratio=max(sampling_ratio, 0), spatial_scale=spatial_scale)
        return out, _empty_argmax()
    (y0, bh, gh), (x0, bw, gw) = _sample_grid(rois, spatial_scale, (pooled_height, pooled_width), sampling_ratio,
                                              aligned)
    slots_h = op.Max(op.ReduceMax(op.Concat(gh, _const([1]), axis=0), keepdims=1), _const([1]))
    slots_w = op.Max(op.ReduceMax(op.Concat(gw, _const([1]), axis=0), keepdims=1), _const([1]))
    wy, _ = _sample_weights(y0, bh, gh, pooled_height, _dim(input, 2), slots_h)  # [K, PH, GH, H]
    wx, _ = _sample_weights(x0, bw, gw, pooled_width, _dim(input, 3), slots_w)
    k = _dim(rois, 0)
    # [K, PH GH, H] and [K, PW GW, W] (sizes given, not -1: K may be 0)
    flat_y = op.Reshape(wy, op.Concat(k, op.Mul(_const([pooled_height]), slots_h), _dim(input, 2), axis=0))
    flat_x = op.Reshape(wx, op.Concat(k, op.Mul(_const([pooled_width]), slots_w), _dim(input, 3), axis=0))
    values = _separable(input, _batch_index(rois), flat_y, flat_x)  # [K, C, PH GH, PW GW]: every sample
    shape = op.Concat(k, _dim(input, 1), _const([pooled_height]), slots_h, _const([pooled_width]), slots_w, axis=0)
    values = op.Reshape(values, shape)
    # slots past a box's own samples are left out; a sample outside the map is 0 and competes
    in_grid_y = op.Less(op.Range(_const(0), op.Squeeze(slots_h, _const([0])), _const(1)), op.Unsqueeze(gh, _const([1])))
    in_grid_x = op.Less(op.Range(_const(0), op.Squeeze(slots_w, _const([0])), _const(1)), op.Unsqueeze(gw, _const([1])))
    mask = op.And(op.Unsqueeze(in_grid_y, _const([1, 2, 4, 5])), op.Unsqueeze(in_grid_x, _const([1, 2, 3, 4])))
    lowest = _like(float("-inf"), input)
    best = op.ReduceMax(op.Where(mask, values, lowest), _const([3, 5]), keepdims=0)
    any_sample = op.And(op.Greater(gh, _const([0])), op.Greater(gw, _const([0])))  # an empty grid gives 0
    out = op.Where(op.Unsqueeze(any_sample, _const([1, 2, 3])), best, _like(0.0, input))
    return out, _zero_argmax(out)


def roi_pool(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, rounding: str):
    """``roikit::roi_pool`` -> (out, argmax zeros (inference only)) through ONNX ``MaxRoiPool``."""
    rois = op.CastLike(rois, input)
    if rounding == "torchvision":
        out = op.MaxRoiPool(input, rois, pooled_shape=[pooled_height, pooled_width], spatial_scale=spatial_scale)
        return out, _zero_argmax(out)
    # "integer": start floor(x1 s), extent floor((x2 - x1) s), bin b = max(floor(extent / P), 1); a box of whole
    # cells [start, start + P b - 1] makes MaxRoiPool's bins [start + i b, start + (i + 1) b), the integer rule's
    limit = _like(2.0**52, rois)
    columns = [_column(rois, 0)]
    corners = {}
    for pooled_n, (lo, hi) in zip((pooled_height, pooled_width), ((2, 4), (1, 3))):
        r_lo, r_hi = _column(rois, lo), _column(rois, hi)
        start = op.Floor(op.Clip(op.Mul(r_lo, _like(spatial_scale, rois)), op.Neg(limit), limit))
        extent = op.Floor(op.Clip(op.Mul(op.Sub(r_hi, r_lo), _like(spatial_scale, rois)), op.Neg(limit), limit))
        bin_size = op.Max(op.Floor(op.Div(extent, _like(float(pooled_n), rois))), _like(1.0, rois))
        corners[lo] = start
        corners[hi] = op.Sub(op.Add(start, op.Mul(bin_size, _like(float(pooled_n), rois))), _like(1.0, rois))
    columns += [corners[i] for i in (1, 2, 3, 4)]
    cell_rois = op.Concat(*[op.Unsqueeze(c, _const([1])) for c in columns], axis=1)
    out = op.MaxRoiPool(input, cell_rois, pooled_shape=[pooled_height, pooled_width], spatial_scale=1.0)
    return out, _zero_argmax(out)


def prroi_pool(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, aligned: bool):
    """``roikit::prroi_pool``: tent integrals computed in float64, as roikit computes them."""
    r = op.Cast(rois, to=FLOAT64)
    offset = 0.5 if aligned else 0.0
    limit = _const(2.0**52, np.float64)

    def edge(i):
        return op.Sub(op.Clip(op.Mul(_column(r, i), _const(spatial_scale, np.float64)), op.Neg(limit), limit),
                      _const(offset, np.float64))

    x1, y1, x2, y2 = (edge(i) for i in range(1, 5))
    wy = op.CastLike(_prroi_weights(y1, y2, pooled_height, _dim(input, 2)), input)
    wx = op.CastLike(_prroi_weights(x1, x2, pooled_width, _dim(input, 3)), input)
    return _separable(input, _batch_index(rois), wy, wx)


def ps_roi_align(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int):
    """``roikit::ps_roi_align``: RoIAlign's samples (aligned geometry), one channel per bin."""
    rois = op.CastLike(rois, input)
    (y0, bh, gh), (x0, bw, gw) = _sample_grid(rois, spatial_scale, (pooled_height, pooled_width), sampling_ratio,
                                              True)
    wy = _mean_weights(y0, bh, gh, pooled_height, _dim(input, 2))
    wx = _mean_weights(x0, bw, gw, pooled_width, _dim(input, 3))
    return _separable_ps(input, _batch_index(rois), wy, wx)


def ps_roi_pool(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
    """``roikit::ps_roi_pool``: the mean of whole cells (:func:`roikit.ops.geometry.ps_roi_pool_edges`)."""
    rois = op.CastLike(rois, input)
    limit = _like(2.0**52, rois)
    weights = []
    for pooled_n, (lo, hi), axis in zip((pooled_height, pooled_width), ((2, 4), (1, 3)), (2, 3)):
        start = _round_half_away(op.Clip(op.Mul(_column(rois, lo), _like(spatial_scale, rois)), op.Neg(limit), limit))
        end = _round_half_away(op.Clip(op.Mul(_column(rois, hi), _like(spatial_scale, rois)), op.Neg(limit), limit))
        bin_size = op.Div(op.Max(op.Sub(end, start), _like(1.0, rois)), _like(float(pooled_n), rois))
        p = op.Unsqueeze(op.CastLike(op.Range(_const(0), _const(pooled_n), _const(1)), rois), _const([0]))
        b = op.Unsqueeze(bin_size, _const([1]))
        s = op.Unsqueeze(op.Cast(start, to=INT64), _const([1]))
        last = op.Sub(_dim(input, axis), _const([1]))
        zero = _const([0])
        first = op.Min(op.Max(op.Add(op.Cast(op.Floor(op.Mul(p, b)), to=INT64), s), zero), op.Max(last, zero))
        stop = op.Min(op.Max(op.Add(op.Cast(op.Ceil(op.Mul(op.Add(p, _like(1.0, rois)), b)), to=INT64), s), zero),
                      op.Max(last, zero))
        weights.append(_cell_weights(first, stop, _dim(input, axis), input))
    return _separable_ps(input, _batch_index(rois), *weights)


def multilevel_roi_align(features, rois, spatial_scales, pooled_height: int, pooled_width: int, sampling_ratio: int,
                         aligned: bool, canonical_scale: int, canonical_level: int):
    """``roikit::multilevel_roi_align``: the level rule of :func:`roikit.ops.pyramid_levels`, then ``RoiAlign``
    per level."""
    features = list(features)
    first = features[0]
    rois = op.CastLike(rois, first)
    k = _dim(rois, 0)
    shape = op.Concat(k, _dim(first, 1), _const([pooled_height]), _const([pooled_width]), axis=0)
    out = op.CastLike(op.ConstantOfShape(shape, value=ir.tensor(np.zeros((1,), np.float32))), first)
    if len(features) == 1:
        levels = op.ConstantOfShape(k, value=ir.tensor(np.zeros((1,), np.int64)))
    else:
        k_min, k_max = (int(-np.log2(np.float32(s))) for s in (spatial_scales[0], spatial_scales[-1]))
        width = op.Sub(_column(rois, 3), _column(rois, 1))
        height = op.Sub(_column(rois, 4), _column(rois, 2))
        s = op.Sqrt(op.Mul(width, height))
        level = op.Floor(op.Add(op.Add(_like(float(canonical_level), s),
                                       op.Div(op.Log(op.Div(s, _like(float(canonical_scale), s))),
                                              _like(float(np.log(2.0)), s))),
                                _like(1e-6, s)))
        level = op.Clip(level, _like(float(k_min), s), _like(float(k_max), s))
        levels = op.Where(op.IsNaN(level), _const([-1]), op.Sub(op.Cast(level, to=INT64), _const([k_min])))
    batch = _batch_index(rois)
    coords = op.Slice(rois, _const([1]), _const([5]), _const([1]))
    for level_index, (feature, scale) in enumerate(zip(features, spatial_scales)):
        idx = op.NonZero(op.Equal(levels, _const([level_index])))  # [1, M]
        pooled = op.RoiAlign(feature, op.Gather(coords, op.Squeeze(idx, _const([0])), axis=0),
                             op.Gather(batch, op.Squeeze(idx, _const([0])), axis=0),
                             coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
                             mode="avg", output_height=pooled_height, output_width=pooled_width,
                             sampling_ratio=max(sampling_ratio, 0), spatial_scale=float(scale))
        out = op.ScatterND(out, op.Transpose(idx, perm=[1, 0]), pooled)
    return out


def deform_roi_pool(input, rois, offset, spatial_scale: float, pooled_height: int, pooled_width: int,
                    sampling_ratio: int, gamma: float):
    """``roikit::deform_roi_pool`` (mmcv's geometry, see ``roikit.ops.pytorch.deform_roi_pool``): every bin a box of
    one bin moved by its offset, so the weights are per bin: ``out[k, c, p, q] = Wy[k, pq] @ F @ Wx[k, pq]^T``.
    Without an offset it is ``roi_align(aligned=True)``, ONNX ``RoiAlign``."""
    if offset is None:
        return roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, True, False)[0]
    rois = op.CastLike(rois, input)
    offset = op.CastLike(offset, input)
    pooled = (pooled_height, pooled_width)
    axes = _sample_grid(rois, spatial_scale, pooled, sampling_ratio, True)
    k = _dim(rois, 0)
    bins = _const([pooled_height * pooled_width])
    limit = _like(2.0**60, input)
    weights = []
    for axis, ((start, bin_size, grid), channel) in enumerate(zip(axes, (1, 0))):
        roi_size = op.Mul(bin_size, _like(float(pooled[axis]), input))  # the box's extent in cells
        shift = op.Squeeze(op.Slice(offset, _const([channel]), _const([channel + 1]), _const([1])), _const([1]))
        corner = op.Add(op.Unsqueeze(start, _const([1, 2])),
                        op.Mul(op.Unsqueeze(op.Mul(_like(gamma, input), roi_size), _const([1, 2])), shift))
        corner = op.Clip(corner, op.Neg(limit), limit)  # [K, PH, PW]
        index = op.CastLike(op.Range(_const(0), _const(pooled[axis]), _const(1)), input)
        index = op.Unsqueeze(index, _const([0, 2] if axis == 0 else [0, 1]))
        bin_start = op.Add(corner, op.Mul(index, op.Unsqueeze(bin_size, _const([1, 2]))))
        flat = op.Reshape(bin_start, _const([-1]))  # [K PH PW]: each bin a box of one bin
        repeat = op.Concat(k, bins, axis=0)
        size = op.Reshape(op.Expand(op.Unsqueeze(bin_size, _const([1])), repeat), _const([-1]))
        count = op.Reshape(op.Expand(op.Unsqueeze(grid, _const([1])), repeat), _const([-1]))
        w = _mean_weights(flat, size, count, 1, _dim(input, 2 + axis))  # [K PH PW, 1, L]
        weights.append(op.Reshape(w, op.Concat(k, bins, _dim(input, 2 + axis), axis=0)))  # [K, PH PW, L]
    wy, wx = weights
    n, c, h, w = (_dim(input, i) for i in range(4))
    wy_full = op.Reshape(_batch_blocks(wy, _batch_index(rois), n), op.Concat(op.Mul(k, bins), op.Mul(n, h), axis=0))
    f2 = op.Reshape(op.Transpose(input, perm=[0, 2, 1, 3]), op.Concat(op.Mul(n, h), op.Mul(c, w), axis=0))
    rows = op.Reshape(op.MatMul(wy_full, f2), op.Concat(k, bins, c, w, axis=0))  # [K, PH PW, C, W]
    out = op.ReduceSum(op.Mul(rows, op.Unsqueeze(wx, _const([2]))), _const([3]), keepdims=0)  # [K, PH PW, C]
    out = op.Reshape(out, op.Concat(k, _const([pooled_height, pooled_width]), c, axis=0))
    return op.Transpose(out, perm=[0, 3, 1, 2])
