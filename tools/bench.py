"""Time roikit against torchvision and print the ratios.

    python tools/bench.py                 # CPU: the fixed workload (2 x 256 x 50 x 68, 512 boxes, 7 x 7)
    python tools/bench.py --device cuda   # GPU: the GPU workloads, with a correctness check first
"""
from __future__ import annotations

import argparse
import sys


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    return parser


def main(args: argparse.Namespace) -> int:
    import torch

    if args.repeat <= 0:
        print("bench: --repeat must be positive", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads <= 0:
            print("bench: --threads must be positive", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench: --device cuda needs a CUDA GPU and none is visible", file=sys.stderr)
            return 2
        from roikit.analysis.bench_cuda import main as cuda_main

        return cuda_main(args.repeat)
    from roikit.analysis.bench import format_rows, machine, run_cpu_benchmark

    print(f"CPU benchmark on {machine()}")
    print("torchvision's CPU kernels use one thread; roikit's use torch's thread pool.")
    print(format_rows(run_cpu_benchmark(args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
