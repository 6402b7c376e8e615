"""roikit against torchvision on the CPU, in one run, on a fixed workload (the fixed CPU workload of docs/benchmarks.md).

Workload: 2 images of 256 x 50 x 68 features (stride 16), 512 boxes of 16 to 316 px, 7 x 7 bins,
sampling_ratio 2, aligned=True; roi_align and roi_pool; forward alone and forward + backward.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch
import torchvision

from ..ops import roi_align, roi_pool


def make_workload(num_boxes: int = 512, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 256, 50, 68, generator=g, dtype=dtype)
    image_w, image_h = 68 * 16, 50 * 16
    wh = torch.rand(num_boxes, 2, generator=g, dtype=dtype) * 300 + 16  # 16 to 316 px
    xy = torch.rand(num_boxes, 2, generator=g, dtype=dtype) * (torch.tensor([image_w, image_h], dtype=dtype) - wh)
    batch = torch.randint(0, 2, (num_boxes, 1), generator=g).to(dtype)
    return features, torch.cat([batch, xy, xy + wh], dim=1)


def time_ms(fn: Callable[[], object], repeat: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _cases(features, rois):
    grad = torch.randn(rois.shape[0], features.shape[1], 7, 7)
    x = features.clone().requires_grad_()
    align = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    pool = dict(output_size=7, spatial_scale=1 / 16)

    def fwd(f, kwargs):
        def run():
            with torch.no_grad():
                f(features, rois, **kwargs)
        return run

    def fwd_bwd(f, kwargs):
        def run():
            x.grad = None
            f(x, rois, **kwargs).backward(grad)
        return run

    yield "roi_align", "forward", fwd(roi_align, align), fwd(torchvision.ops.roi_align, align)
    yield "roi_align", "forward+backward", fwd_bwd(roi_align, align), fwd_bwd(torchvision.ops.roi_align, align)
    yield "roi_pool", "forward", fwd(roi_pool, pool), fwd(torchvision.ops.roi_pool, pool)
    yield "roi_pool", "forward+backward", fwd_bwd(roi_pool, pool), fwd_bwd(torchvision.ops.roi_pool, pool)


def run_cpu_benchmark(repeat: int = 10, num_boxes: int = 512) -> list[dict]:
    features, rois = make_workload(num_boxes)
    rows = []
    for op, mode, ours, theirs in _cases(features, rois):
        t_ours, t_tv = time_ms(ours, repeat), time_ms(theirs, repeat)
        rows.append(dict(op=op, mode=mode, roikit_ms=t_ours, torchvision_ms=t_tv, speedup=t_tv / t_ours))
    return rows


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}")


def format_rows(rows: list[dict]) -> str:
    lines = ["| op | pass | roikit (ms) | torchvision (ms) | speed-up |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['mode']} | {r['roikit_ms']:.1f} | {r['torchvision_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)
