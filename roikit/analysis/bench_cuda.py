"""roikit's Triton kernels against torchvision's CUDA ops, in one run on one GPU (the GPU workloads of
docs/benchmarks.md).

    python -m roikit.analysis.bench_cuda          (or: python tools/bench.py --device cuda)

First a correctness check against torchvision's CUDA ops (outputs and gradients; the deterministic backward equal
to the atomic one and the same bits twice), then timings with CUDA events after warm-up, median of ``repeat``
runs, for the GPU workloads:

* single level: 2 images of 256 x 200 x 272 float32 features (stride 4), 1000 and 4000 boxes, 7 x 7 bins,
  ``sampling_ratio=2``, ``aligned=True``: roi_align and roi_pool, forward and forward + backward;
* pyramid: the same images at strides 4 / 8 / 16 / 32, 1000 boxes per image, ``multilevel_roi_align`` against
  ``torchvision.ops.MultiScaleRoIAlign`` (``sampling_ratio=2``, ``aligned=False``, as torchvision's pooler).

Boxes are log-uniform from 16 to 800 px, so that every pyramid level gets some.

Bandwidth is a traffic model, not a counter: every feature cell some box reads, read once; every output (and
argmax) written once; for the backward, the output gradient read once, the input gradient written once (both
libraries zero the whole map) and every read cell's gradient read and written once more. Bytes / roikit's time,
next to the GPU's peak DRAM bandwidth (from its name: H100, H200, A100; otherwise "unknown").
"""
from __future__ import annotations

import datetime
import math
import statistics
import sys
from collections.abc import Callable

import torch
from torch import Tensor

SIZES = [(200, 272), (100, 136), (50, 68), (25, 34)]  # strides 4, 8, 16, 32 of an 800 x 1088 image
STRIDES = [4, 8, 16, 32]
CHANNELS = 256

# peak DRAM bandwidth in GB/s, by a substring test on torch.cuda.get_device_name() (first match wins)
PEAK_GBS = [
    (("H200",), 4800.0),
    (("H100", "NVL"), 3900.0),
    (("H100", "PCIe"), 2000.0),
    (("H100",), 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
    (("A100", "80GB", "PCIe"), 1935.0),
    (("A100", "80GB"), 2039.0),
    (("A100",), 1555.0),  # 40 GB
]


def peak_bandwidth(name: str) -> float | None:
    for keys, gbs in PEAK_GBS:
        if all(k.lower() in name.lower() for k in keys):
            return gbs
    return None


def make_boxes(num_per_image: int, images: int = 2, seed: int = 0, device="cuda") -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    image_h, image_w = SIZES[0][0] * STRIDES[0], SIZES[0][1] * STRIDES[0]
    boxes = []
    for _ in range(images):
        size = torch.exp(torch.empty(num_per_image, 2).uniform_(math.log(16.0), math.log(800.0), generator=g))
        size = torch.minimum(size, torch.tensor([image_w - 1.0, image_h - 1.0]))
        xy = torch.rand(num_per_image, 2, generator=g) * (torch.tensor([image_w, image_h]) - size)
        boxes.append(torch.cat([xy, xy + size], dim=1).to(device))
    return boxes


def to_rois(boxes: list[Tensor]) -> Tensor:
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])


def time_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median time of ``fn`` on the GPU in milliseconds, with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def covered_cells(rois: Tensor, scale: float, height: int, width: int, images: int) -> int:
    """Cells of the map that at least one box reads (its rectangle, one cell of bilinear margin), all images."""
    r = rois.float()
    n = r[:, 0].long()
    y0 = torch.floor(r[:, 2] * scale - 1).long().clamp(0, height)
    x0 = torch.floor(r[:, 1] * scale - 1).long().clamp(0, width)
    y1 = (torch.ceil(r[:, 4] * scale) + 1).long().clamp(0, height)
    x1 = (torch.ceil(r[:, 3] * scale) + 1).long().clamp(0, width)
    diff = torch.zeros(images, height + 1, width + 1, device=rois.device)
    one = torch.ones_like(r[:, 0])
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        diff.index_put_((n, ys, xs), sign * one, accumulate=True)
    return int((diff.cumsum(1).cumsum(2)[:, :height, :width] > 0).sum().item())


def _fwd(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def _fwd_bwd(fn, leaves, grad):
    def run():
        for leaf in leaves:
            leaf.grad = None
        fn().backward(grad)
    return run


def check_correctness(device="cuda") -> list[str]:
    """Differences from torchvision's CUDA ops on a small workload: a list of failures (empty when all pass)."""
    from collections import OrderedDict

    import torchvision

    from ..ops import deterministic_backward, multilevel_roi_align, roi_align, roi_pool

    failures = []

    def check(name, ours, theirs, atol=1e-4, rtol=1e-4):
        if not torch.allclose(ours.float(), theirs.float(), atol=atol, rtol=rtol):
            failures.append(f"{name}: max |diff| {(ours.float() - theirs.float()).abs().max().item():.3g}")

    g = torch.Generator(device=device).manual_seed(0)
    feats = [torch.randn(2, 64, h // 4, w // 4, device=device, generator=g) for h, w in SIZES]
    boxes = [b / 4 for b in make_boxes(200, device=device)]
    rois = to_rois(boxes)
    for channels_last in (False, True):
        x0 = feats[0].contiguous(memory_format=torch.channels_last) if channels_last else feats[0]
        tag = " channels_last" if channels_last else ""
        for op, ours_fn, theirs_fn in (
            ("roi_align", lambda x: roi_align(x, rois, 7, 1 / 4, 2, True),
             lambda x: torchvision.ops.roi_align(x, rois, 7, 1 / 4, 2, True)),
            ("roi_pool", lambda x: roi_pool(x, rois, 7, 1 / 4),
             lambda x: torchvision.ops.roi_pool(x, rois, 7, 1 / 4)),
        ):
            xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
            ours, theirs = ours_fn(xa), theirs_fn(xb)
            grad = torch.randn_like(theirs)
            ours.backward(grad)
            theirs.backward(grad)
            check(f"{op}{tag} output", ours, theirs, atol=1e-5, rtol=1e-5)
            check(f"{op}{tag} gradient", xa.grad, xb.grad)
            runs = []
            for _ in range(2):
                xd = x0.clone().requires_grad_()
                with deterministic_backward():
                    ours_fn(xd).backward(grad)
                runs.append(xd.grad)
            check(f"{op}{tag} deterministic gradient", runs[0], xb.grad)
            if not torch.equal(runs[0], runs[1]):
                failures.append(f"{op}{tag} deterministic gradient differs between two runs")
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    leaves_tv = [f.clone().requires_grad_() for f in feats]
    leaves = [f.clone().requires_grad_() for f in feats]
    theirs = pooler(OrderedDict((str(i), f) for i, f in enumerate(leaves_tv)), boxes,
                    [(SIZES[0][0], SIZES[0][1])])
    ours = multilevel_roi_align(leaves, rois, 7, pooler.scales, 2)
    grad = torch.randn_like(theirs)
    ours.backward(grad)
    theirs.backward(grad)
    check("multilevel_roi_align output", ours, theirs, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(leaves, leaves_tv)):
        check(f"multilevel_roi_align gradient, level {i}", a.grad, b.grad)
    return failures


def run_cuda_benchmark(repeat: int = 20, device="cuda", channels: int = CHANNELS,
                       timer: Callable[[Callable[[], object], int], float] = time_ms) -> list[dict]:
    """Time every GPU case; one row per (workload, op, pass).

    ``device``, ``channels`` and ``timer`` are there so that the script itself can be run on the CPU with a
    wall-clock timer and few channels (the test suite does, as a smoke test); the figures mean something only on
    a GPU with the defaults.
    """
    from collections import OrderedDict

    import torchvision

    from ..ops import deterministic_backward, multilevel_roi_align, roi_align, roi_pool

    peak = peak_bandwidth(torch.cuda.get_device_name()) if torch.device(device).type == "cuda" else None
    g = torch.Generator(device=device).manual_seed(0)
    feats = [torch.randn(2, channels, h, w, device=device, generator=g) for h, w in SIZES]
    rows = []

    def add(workload, op, mode, ours, theirs, bytes_moved):
        t_ours, t_tv = timer(ours, repeat), timer(theirs, repeat)
        gbs = bytes_moved / (t_ours * 1e-3) / 1e9
        rows.append(dict(workload=workload, op=op, mode=mode, roikit_ms=t_ours, torchvision_ms=t_tv,
                         speedup=t_tv / t_ours, roikit_gbs=gbs, peak_gbs=peak))

    x = feats[0]
    leaf_a, leaf_b = x.clone().requires_grad_(), x.clone().requires_grad_()
    c, (h, w) = channels, SIZES[0]
    for num_boxes in (1000, 4000):
        rois = to_rois(make_boxes(num_boxes // 2, device=device))
        workload = f"1 level, {num_boxes} boxes"
        grad = torch.randn(num_boxes, c, 7, 7, device=device)
        cells = covered_cells(rois, 1 / 4, h, w, 2)
        out_bytes = num_boxes * c * 49 * 4
        fwd_bytes = cells * c * 4 + out_bytes
        bwd_bytes = out_bytes + 2 * c * h * w * 4 + 2 * cells * c * 4
        align = dict(output_size=7, spatial_scale=1 / 4, sampling_ratio=2, aligned=True)
        ours = lambda xx: roi_align(xx, rois, **align)  # noqa: E731
        theirs = lambda xx: torchvision.ops.roi_align(xx, rois, **align)  # noqa: E731
        add(workload, "roi_align", "forward", _fwd(lambda: ours(x)), _fwd(lambda: theirs(x)), fwd_bytes)
        add(workload, "roi_align", "forward+backward", _fwd_bwd(lambda: ours(leaf_a), [leaf_a], grad),
            _fwd_bwd(lambda: theirs(leaf_b), [leaf_b], grad), fwd_bytes + bwd_bytes)
        with deterministic_backward():  # torchvision has no deterministic backward: its atomic one is the baseline
            add(workload, "roi_align", "forward+backward, deterministic",
                _fwd_bwd(lambda: ours(leaf_a), [leaf_a], grad), _fwd_bwd(lambda: theirs(leaf_b), [leaf_b], grad),
                fwd_bytes + bwd_bytes)
        pool_ours = lambda xx: roi_pool(xx, rois, 7, 1 / 4)  # noqa: E731
        pool_theirs = lambda xx: torchvision.ops.roi_pool(xx, rois, 7, 1 / 4)  # noqa: E731
        arg_bytes = num_boxes * c * 49 * 4  # int32 argmax, in both libraries
        add(workload, "roi_pool", "forward", _fwd(lambda: pool_ours(x)), _fwd(lambda: pool_theirs(x)),
            fwd_bytes + arg_bytes)
        add(workload, "roi_pool", "forward+backward", _fwd_bwd(lambda: pool_ours(leaf_a), [leaf_a], grad),
            _fwd_bwd(lambda: pool_theirs(leaf_b), [leaf_b], grad), fwd_bytes + bwd_bytes + 2 * arg_bytes)

    boxes = make_boxes(1000, device=device)
    rois = to_rois(boxes)
    pooler = torchvision.ops.MultiScaleRoIAlign([str(i) for i in range(4)], 7, 2)
    image_sizes = [(SIZES[0][0] * 4, SIZES[0][1] * 4)] * 2
    leaves_a = [f.clone().requires_grad_() for f in feats]
    leaves_b = [f.clone().requires_grad_() for f in feats]
    pooler(OrderedDict((str(i), f) for i, f in enumerate(feats)), boxes, image_sizes)  # sets pooler.scales
    scales = pooler.scales
    levels = pooler.map_levels(boxes)
    fwd_bytes = rois.shape[0] * c * 49 * 4
    bwd_bytes = fwd_bytes
    for level, ((lh, lw), scale) in enumerate(zip(SIZES, scales)):
        cells = covered_cells(rois[levels == level], scale, lh, lw, 2)
        fwd_bytes += cells * c * 4
        bwd_bytes += 2 * c * lh * lw * 4 + 2 * cells * c * 4
    grad = torch.randn(rois.shape[0], c, 7, 7, device=device)
    ours = lambda fs: multilevel_roi_align(fs, rois, 7, scales, 2)  # noqa: E731
    theirs = lambda fs: pooler(OrderedDict((str(i), f) for i, f in enumerate(fs)), boxes, image_sizes)  # noqa: E731
    workload = "pyramid 4/8/16/32, 1000 boxes/image"
    add(workload, "multilevel_roi_align", "forward", _fwd(lambda: ours(feats)), _fwd(lambda: theirs(feats)),
        fwd_bytes)
    add(workload, "multilevel_roi_align", "forward+backward", _fwd_bwd(lambda: ours(leaves_a), leaves_a, grad),
        _fwd_bwd(lambda: theirs(leaves_b), leaves_b, grad), fwd_bytes + bwd_bytes)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| workload | op | pass | roikit (ms) | torchvision (ms) | speed-up | roikit GB/s | peak GB/s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "unknown" if r["peak_gbs"] is None else f"{r['peak_gbs']:.0f}"
        lines.append(f"| {r['workload']} | {r['op']} | {r['mode']} | {r['roikit_ms']:.3f} | {r['torchvision_ms']:.3f} "
                     f"| {r['speedup']:.2f}x | {r['roikit_gbs']:.0f} | {peak} |")
    return "\n".join(lines)


def main(repeat: int = 20) -> int:
    if not torch.cuda.is_available():
        print("bench_cuda: needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_cuda: needs triton (pip install triton); without it roikit's CUDA path is plain PyTorch",
              file=sys.stderr)
        return 2
    import torchvision

    name = torch.cuda.get_device_name()
    print(f"GPU benchmark on {name}, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, triton {triton.__version__}")
    failures = check_correctness()
    if failures:
        print("correctness check against torchvision's CUDA ops FAILED:")
        for f in failures:
            print(f"  {f}")
        return 1
    print("correctness check against torchvision's CUDA ops: passed")
    print(format_rows(run_cuda_benchmark(repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
