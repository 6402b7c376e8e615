"""Compare training runs: scores, training time, loss and AP curves, as a markdown table and a chart.

The chart has the COCO scores and training times as bars, the training loss and AP over the iterations as curves.

    python tools/compare_runs.py runs/default_s16 runs/shapes_head_global_avg --labels flatten global_avg \
        --plot docs/img/head_pools.png

Each argument is a folder written by tools/train.py (metrics.jsonl and eval_final_metrics.json; older runs'
eval_final.json is read too).
"""
from __future__ import annotations

import argparse
import sys


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders written by tools/train.py")
    parser.add_argument("--labels", nargs="+", default=None, help="a name per run (default: the folder names)")
    parser.add_argument("--plot", default=None,
                        help="write a chart to this PNG file: the scores and training times as bars, the training "
                             "loss and AP over the iterations as curves")
    parser.add_argument("--title", default="", help="the chart's title")
    return parser


def main(args: argparse.Namespace) -> int:
    from roikit.analysis.runs import format_runs, load_run, plot_runs

    try:
        if args.labels is not None and len(args.labels) != len(args.runs):
            raise ValueError(f"--labels: {len(args.labels)} label(s) for {len(args.runs)} run(s)")
        labels = args.labels or [None] * len(args.runs)
        runs = [load_run(path, label) for path, label in zip(args.runs, labels)]
        print(format_runs(runs), end="")
        if args.plot:
            plot_runs(runs, args.plot, args.title)
            print(f"chart: {args.plot}")
    except (ValueError, OSError) as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
