"""Naive float64 loops that read like the papers: the expected functions of the op tests.

Slow on purpose: one Python loop per box, bin and sample, no vectorisation and nothing shared with roikit.
"""
from __future__ import annotations

import math

import torch


def bilinear(f, y, x):
    """torchvision's bilinear_interpolate on one channel map f [H, W]; returns (value, [(i, j, weight)])."""
    h, w = f.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0, []
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    taps = [(y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx), (y1, x0, ly * (1 - lx)), (y1, x1, ly * lx)]
    return sum(wt * float(f[i, j]) for i, j, wt in taps), taps


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
