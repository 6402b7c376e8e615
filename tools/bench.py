"""Time roikit against torchvision and print the ratios.

    python tools/bench.py                 # CPU: the fixed workload (2 x 256 x 50 x 68, 512 boxes, 7 x 7)
    python tools/bench.py --device cuda   # GPU: the GPU workloads, with a correctness check first
    python tools/bench.py --sweep         # CPU: every op (roi_align, roi_pool, ps_roi_align, ps_roi_pool,
                                          # the FPN pyramid) x box count x box size x output x dtype x threads,
                                          # as a table, and a plot of the speed-up (--output-dir); 64 and 512
                                          # boxes (measured: 160 s for both thread settings on 2 idle
                                          # cores, most of it torchvision's time);
                                          # --full: 64 256 1024 4096 (about 30 min);
                                          # --ops roi_pool pyramid: only those ops
    python tools/bench.py --zoo           # CPU: rotated, deformable and box-gradient RoIAlign against the
                                          # torchvision op each equals at angle 0 / offset 0
"""
from __future__ import annotations

import argparse
import sys


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--sweep", action="store_true",
                        help="CPU: the sweep (box counts of --boxes, three box sizes, 7x7 and 14x14, float32 and "
                             "bfloat16, one thread and all threads, or only --threads). By default the quick sweep, "
                             "64 and 512 boxes (measured: 160 s on 2 idle cores for both thread settings, most of it "
                             "torchvision's time); "
                             "--full for 64, 256, 1024 and 4096 boxes (about 30 min)")
    parser.add_argument("--full", action="store_true", help="--sweep over 64, 256, 1024 and 4096 boxes")
    parser.add_argument("--detector", action="store_true",
                        help="CPU inference time per image of roikit's base_shapes detector and torchvision's "
                             "fasterrcnn_mobilenet_v3_large_fpn with roikit's pooler (random weights), 1 and 2 threads")
    parser.add_argument("--zoo", action="store_true",
                        help="CPU: roi_align_rotated, deform_roi_pool and roi_align(box_grad=True) against the "
                             "torchvision op each equals at angle 0 / offset 0 (512 boxes, 7x7, float32)")
    parser.add_argument("--boxes", type=int, nargs="+", default=None,
                        help="box counts of the sweep (default: 64 512; with --full 64 256 1024 4096)")
    parser.add_argument("--channels", type=int, default=256,
                        help="feature channels of the sweep (default: 256); the position-sensitive ops take the "
                             "multiple of PH*PW nearest to it (245 for 7x7, 196 for 14x14 at 256)")
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help="ops of the sweep (default: all: roi_align roi_pool ps_roi_align ps_roi_pool pyramid)")
    parser.add_argument("--output-dir", default="outputs/bench",
                        help="where --sweep writes sweep.md, sweep.json and sweep.png (default: outputs/bench)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(args: argparse.Namespace) -> int:
    import torch

    if args.boxes is None:
        args.boxes = [64, 256, 1024, 4096] if args.full else [64, 512]
    if args.repeat <= 0 or args.channels <= 0 or min(args.boxes) <= 0:
        print("bench.py: error: --repeat, --channels and --boxes must be positive", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads <= 0:
            print("bench.py: error: --threads must be positive", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench.py: error: --device cuda needs a CUDA GPU and none is visible", file=sys.stderr)
            return 2
        from roikit.analysis.bench_cuda import main as cuda_main

        return cuda_main(args.repeat)
    from roikit.analysis.bench import format_rows, format_sweep, machine, plot_sweep, run_cpu_benchmark, run_sweep

    if args.sweep:
        return _sweep(args, run_sweep, format_sweep, plot_sweep, machine)
    if args.detector or args.zoo:
        import os

        if args.zoo:
            from roikit.analysis.bench_zoo import format_zoo, time_zoo

            print(f"Zoo ops on {machine()}, load average {os.getloadavg()[0]:.2f}")
            print(format_zoo(time_zoo(min(args.repeat, 5))))
            print(f"load average after: {os.getloadavg()[0]:.2f}")
            return 0

        from roikit.analysis.bench import format_detectors, time_detectors

        print(f"Detectors on {machine()}, load average {os.getloadavg()[0]:.2f}")
        print(format_detectors(time_detectors(args.repeat)))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0
    print(f"CPU benchmark on {machine()}")
    print("torchvision's CPU kernels use one thread; roikit's use torch's thread pool.")
    print(format_rows(run_cpu_benchmark(args.repeat)))
    return 0


def _sweep(args, run_sweep, format_sweep, plot_sweep, machine) -> int:
    from pathlib import Path

    from roikit.io import atomic_save_json, atomic_write_text

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        print(f"bench.py: error: --output-dir {out} is a file, not a folder", file=sys.stderr)
        return 2
    threads = None if args.threads is None else (args.threads,)
    from roikit.analysis.bench import SWEEP_OPS

    unknown = sorted(set(args.ops or ()) - set(SWEEP_OPS))
    if unknown:
        print(f"bench.py: error: --ops {' '.join(unknown)}: not a sweep op (choose from {' '.join(SWEEP_OPS)})",
              file=sys.stderr)
        return 2
    import os
    import time

    load_before, start = os.getloadavg(), time.time()
    rows = run_sweep(counts=args.boxes, channels=args.channels, threads=threads, ops=args.ops or SWEEP_OPS,
                     progress=not args.no_progress)
    load_after = os.getloadavg()
    loads = ", ".join(f"{a:.2f}" for a in load_before) + " before; " + ", ".join(f"{a:.2f}" for a in load_after)
    table = (f"CPU sweep on {machine()}; {time.time() - start:.0f} s; load average (1, 5, 15 min) {loads} after\n\n"
             f"{format_sweep(rows)}\n")
    print(table)
    atomic_write_text(out / "sweep.md", table)
    atomic_save_json(out / "sweep.json", {"machine": machine(), "load_before": load_before, "load_after": load_after,
                                          "rows": rows})
    plot_sweep(rows, out / "sweep.png")
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
