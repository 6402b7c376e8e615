"""Print what each pooling rule does to a box: the rounding arithmetic, the cells each bin reads, the bin-centre errors.

    python tools/explain.py                       # the 665 px box at stride 32, 7 x 7 bins
    python tools/explain.py --box 10 20 300 180 --stride 16
"""
from __future__ import annotations

import argparse
import sys

from roikit.analysis.explain import RULES, explain_box, format_explanation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=float, nargs=4, default=(0, 0, 665, 665), metavar=("X1", "Y1", "X2", "Y2"),
                        help="box in image pixels (default: 0 0 665 665)")
    parser.add_argument("--stride", type=int, default=32, help="feature stride in pixels (default: 32)")
    parser.add_argument("--output-size", type=int, default=7, help="bins per side (default: 7)")
    parser.add_argument("--sampling-ratio", type=int, default=2, help="RoIAlign samples per bin and axis (default: 2)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES, help="rules to explain")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        items = explain_box(args.box, args.stride, args.output_size, args.sampling_ratio, args.rules)
    except ValueError as e:
        print(f"explain: {e}", file=sys.stderr)
        return 2
    print(format_explanation(items, args.box, args.stride, args.output_size), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
