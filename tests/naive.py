"""Naive float64 loops that read like the papers: the expected functions of the op tests.

Slow on purpose: one Python loop per box, bin and sample, no vectorisation and nothing shared with roikit. One
bilinear sample (:func:`bilinear_slopes`) serves every loop here and the deform_roi_pool tests.
"""
from __future__ import annotations

import math

import torch


def bilinear_slopes(f, y, x):
    """The bilinear sample of torchvision's and mmcv's ``bilinear_interpolate`` on one channel map ``f`` ([H, W]: a
    tensor, an array or a list of rows) at (y, x), with its slopes.

    A sample outside ``[-1, H] x [-1, W]`` is 0 (no taps); one inside is clamped to the map. Returns (value, d/dy,
    d/dx, [(i, j, weight)] of the 4 taps); a slope is 0 along an axis where the sample is clamped (the value does
    not move with it there).
    """
    if hasattr(f, "shape"):
        h, w = f.shape

        def at(i, j):
            return float(f[i, j])
    else:
        h, w = len(f), len(f[0])

        def at(i, j):
            return f[i][j]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0, 0.0, 0.0, []
    moves_y, moves_x = float(y >= 0), float(x >= 0)  # clamped to the first centre: does not move
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y, moves_y = float(y0), 0.0
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x, moves_x = float(x0), 0.0
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    f00, f01, f10, f11 = at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1)
    value = hy * hx * f00 + hy * lx * f01 + ly * hx * f10 + ly * lx * f11
    d_y = moves_y * (hx * (f10 - f00) + lx * (f11 - f01))
    d_x = moves_x * (hy * (f01 - f00) + ly * (f11 - f10))
    return value, d_y, d_x, [(y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)]


def bilinear(f, y, x):
    """:func:`bilinear_slopes` without the slopes: (value, [(i, j, weight)])."""
    value, _, _, taps = bilinear_slopes(f, y, x)
    return value, taps


def roi_align(x, rois, out, scale, sampling_ratio, aligned, pool="avg"):
    """Returns output [K, C, PH, PW] and the gradient map function's weights: taps[k][c][ph][pw] list."""
    n, c, h, w = x.shape
    ph_n, pw_n = out
    k_n = rois.shape[0]
    y = torch.zeros(k_n, c, ph_n, pw_n, dtype=torch.float64)
    weights = {}  # (k, ph, pw) -> list of (i, j, weight) for avg; per channel winner for max
    for k in range(k_n):
        b = int(rois[k, 0])
        off = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (float(v) * scale - off for v in rois[k, 1:])
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_n)
        count = max(gh * gw, 1)
        for p in range(ph_n):
            for q in range(pw_n):
                pts = [(y1 + p * bh + (iy + 0.5) * bh / gh, x1 + q * bw + (ix + 0.5) * bw / gw)
                       for iy in range(max(gh, 0)) for ix in range(max(gw, 0))]
                for ch in range(c):
                    f = x[b, ch]
                    vals = [bilinear(f, yy, xx) for yy, xx in pts]
                    if pool == "avg":
                        y[k, ch, p, q] = sum(v for v, _ in vals) / count
                        weights[(k, ch, p, q)] = [(b, i, j, wt / count) for _, taps in vals for i, j, wt in taps]
                    else:
                        best, taps_best = 0.0, []
                        if vals:
                            best, taps_best = -math.inf, []
                            for v, taps in vals:
                                if v > best:
                                    best, taps_best = v, taps
                        y[k, ch, p, q] = best
                        weights[(k, ch, p, q)] = [(b, i, j, wt) for i, j, wt in taps_best]
    return y, weights


def roi_pool(x, rois, out, scale, rounding):
    """Quantized max pooling; returns output and argmax (h * W + w, -1 for empty), as torchvision."""
    n, c, h, w = x.shape
    ph_n, pw_n = out
    k_n = rois.shape[0]
    y = torch.zeros(k_n, c, ph_n, pw_n, dtype=torch.float64)
    arg = torch.full((k_n, c, ph_n, pw_n), -1, dtype=torch.int64)

    def c_round(v):
        return math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)

    for k in range(k_n):
        b = int(rois[k, 0])
        x1, y1, x2, y2 = (float(v) for v in rois[k, 1:])
        edges = []
        for lo, hi, p_n, size in ((y1, y2, ph_n, h), (x1, x2, pw_n, w)):
            if rounding == "torchvision":
                start, end = c_round(lo * scale), c_round(hi * scale)
                length = max(end - start + 1, 1)
                bin_size = length / p_n
                e = [(math.floor(p * bin_size) + start, math.ceil((p + 1) * bin_size) + start) for p in range(p_n)]
            else:
                start = math.floor(lo * scale)
                length = math.floor((hi - lo) * scale)
                bin_size = max(length // p_n, 1)
                e = [(start + p * bin_size, start + (p + 1) * bin_size) for p in range(p_n)]
            edges.append([(min(max(a, 0), size), min(max(bb, 0), size)) for a, bb in e])
        for p, (hs, he) in enumerate(edges[0]):
            for q, (ws, we) in enumerate(edges[1]):
                for ch in range(c):
                    if he <= hs or we <= ws:
                        continue
                    best, where = -3.4028234663852886e38, -1
                    for i in range(hs, he):
                        for j in range(ws, we):
                            if float(x[b, ch, i, j]) > best:
                                best, where = float(x[b, ch, i, j]), i * w + j
                    y[k, ch, p, q], arg[k, ch, p, q] = best, where
    return y, arg


def prroi_pool(x, rois, out, scale, aligned, steps=200):
    """Midpoint-rule integral of the zero-padded bilinear surface over each bin, divided by the bin's area."""
    n, c, h, w = x.shape
    ph_n, pw_n = out
    k_n = rois.shape[0]
    y = torch.zeros(k_n, c, ph_n, pw_n, dtype=torch.float64)
    pad = torch.zeros(n, c, h + 2, w + 2, dtype=torch.float64)
    pad[:, :, 1:-1, 1:-1] = x

    def surface(b, yy, xx):  # yy, xx: tensors of points; cell (i, j) sits at (i, j)
        yy, xx = (yy + 1).clamp(0, h + 1), (xx + 1).clamp(0, w + 1)
        i0, j0 = yy.floor().long().clamp(max=h), xx.floor().long().clamp(max=w)
        ly, lx = yy - i0, xx - j0
        f = pad[b]
        return (f[:, i0, j0] * (1 - ly) * (1 - lx) + f[:, i0, j0 + 1] * (1 - ly) * lx
                + f[:, i0 + 1, j0] * ly * (1 - lx) + f[:, i0 + 1, j0 + 1] * ly * lx)

    for k in range(k_n):
        b = int(rois[k, 0])
        off = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (float(v) * scale - off for v in rois[k, 1:])
        bh, bw = max(y2 - y1, 0) / ph_n, max(x2 - x1, 0) / pw_n
        if bh == 0 or bw == 0:
            continue
        t = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
        for p in range(ph_n):
            for q in range(pw_n):
                yy, xx = torch.meshgrid(y1 + (p + t) * bh, x1 + (q + t) * bw, indexing="ij")
                y[k, :, p, q] = surface(b, yy.flatten(), xx.flatten()).mean(dim=1)
    return y


def roi_align_rotated(x, rois, pooled, scale, sampling_ratio, aligned=True, clockwise=False, radians=False):
    """RoIAlignRotated from the formulas of detectron2's and mmcv's kernels: rois [K, 6] (n, cx, cy, w, h, angle).
    Returns output [K, C, PH, PW] (float64) and the gradient weights {(k, c, ph, pw): [(n, i, j, weight)]}."""
    _, channels, _, _ = x.shape
    ph_n, pw_n = pooled
    out = torch.zeros(rois.shape[0], channels, ph_n, pw_n, dtype=torch.float64)
    weights = {}
    for k, roi in enumerate(rois.tolist()):
        n, cx, cy, w, h, angle = roi
        n = int(n)
        off = 0.5 if aligned else 0.0
        # coordinates in cells are clamped to +-2^52 (roikit's documented bound, as for roi_align)
        cx, cy, w, h = (min(max(v * scale, -2.0**52), 2.0**52) for v in (cx, cy, w, h))
        cx, cy = cx - off, cy - off
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        theta = angle if radians else angle * math.pi / 180
        theta = -theta if clockwise else theta
        c, s = math.cos(theta), math.sin(theta)
        bh, bw = h / ph_n, w / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bh)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bw)
        count = max(gh * gw, 1)
        for p in range(ph_n):
            for q in range(pw_n):
                points = []
                for iy in range(max(gh, 0)):
                    yy = -h / 2 + p * bh + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        xx = -w / 2 + q * bw + (ix + 0.5) * bw / gw
                        points.append((yy * c - xx * s + cy, yy * s + xx * c + cx))
                for ch in range(channels):
                    samples = [bilinear(x[n, ch], y, xp) for y, xp in points]
                    out[k, ch, p, q] = sum(v for v, _ in samples) / count
                    weights[(k, ch, p, q)] = [(n, i, j, wt / count) for _, taps in samples for i, j, wt in taps]
    return out, weights


def grad_from_taps(x, weights, grad):
    """The input gradient [N, C, H, W] of ``(out * grad).sum()`` from the weights of :func:`roi_align` (avg) or
    :func:`roi_align_rotated`: each output's gradient times each of its taps' weights."""
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for (k, c, p, q), taps in weights.items():
        for n, i, j, wt in taps:
            expected[n, c, i, j] += wt * float(grad[k, c, p, q])
    return expected


def _hat_integral(t):
    """The integral of max(0, 1 - |u|) from -inf to t."""
    if t <= -1:
        return 0.0
    if t <= 0:
        return 0.5 * (t + 1) ** 2
    if t < 1:
        return 1.0 - 0.5 * (1 - t) ** 2
    return 1.0


def prroi_bins(start, end, pooled):
    """Edges (lo, hi) of each PrRoI bin of one axis, in feature units; None for a box of no width."""
    b = max(end - start, 0.0) / pooled
    return [(start + p * b, start + p * b + b) for p in range(pooled)] if b > 0 else None


def prroi_pool_exact(x, rois, pooled, scale, aligned):
    """The exact integral of the zero-padded bilinear surface over each bin / the bin's area, float64, plain Python
    per axis: cell i's tent max(0, 1 - |t - i|) integrated over [lo, hi], so bin (p, q) = Wy[p] @ F @ Wx[q]^T."""
    n, c, h, w = x.shape
    out = torch.zeros(len(rois), c, *pooled, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for k, row in enumerate(rois.double().tolist()):
        x1, y1, x2, y2 = (v * scale - off for v in row[1:])
        weights = []
        for (lo_box, hi_box), p_n, length in (((y1, y2), pooled[0], h), ((x1, x2), pooled[1], w)):
            bins = prroi_bins(lo_box, hi_box, p_n)
            wt = torch.zeros(p_n, length, dtype=torch.float64)
            for p, (lo, hi) in enumerate(bins or []):
                for i in range(length):
                    wt[p, i] = (_hat_integral(hi - i) - _hat_integral(lo - i)) / (hi - lo)
            weights.append(wt)
        out[k] = torch.einsum("pi,cij,qj->cpq", weights[0], x[int(row[0])].double(), weights[1])
    return out
