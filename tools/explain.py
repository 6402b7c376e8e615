"""Print what each pooling rule does to a box: the rounding arithmetic, the cells each bin reads, the bin-centre errors.

    python tools/explain.py                       # the 665 px box at stride 32, 7 x 7 bins
    python tools/explain.py --box 10 20 300 180 --stride 16
    python tools/explain.py --rules ps_roi_pool ps_roi_align roi_align_rotated deform_roi_pool   # the zoo's ops
    python tools/explain.py --rules roi_align_rotated --angle 90 --box 100 0 300 400
    python tools/explain.py --rules deform_roi_pool --offset 0.5 -1
"""
from __future__ import annotations

import argparse
import sys

from roikit.analysis.explain import NAMES, RULES, explain_box, format_explanation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=float, nargs=4, default=(0, 0, 665, 665), metavar=("X1", "Y1", "X2", "Y2"),
                        help="box in image pixels (default: 0 0 665 665)")
    parser.add_argument("--stride", type=int, default=32, help="feature stride in pixels (default: 32)")
    parser.add_argument("--output-size", type=int, default=7, help="bins per side (default: 7)")
    parser.add_argument("--sampling-ratio", type=int, default=2,
                        help="samples per bin and axis of the bilinear ops (default: 2)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=NAMES, metavar="RULE",
                        help=f"rules to explain, from: {', '.join(NAMES)} (default: {' '.join(RULES)})")
    parser.add_argument("--angle", type=float, default=0.0, metavar="DEG",
                        help="roi_align_rotated: the box's angle in degrees, counterclockwise on the image "
                             "(default: 0)")
    parser.add_argument("--offset", type=float, nargs=2, default=(0.0, 0.0), metavar=("DX", "DY"),
                        help="deform_roi_pool: every bin's offset, in units of gamma (0.1) times the box's width "
                             "and height (default: 0 0)")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        items = explain_box(args.box, args.stride, args.output_size, args.sampling_ratio, args.rules, args.angle,
                            args.offset)
    except ValueError as e:
        print(f"explain: error: {e}", file=sys.stderr)
        return 2
    print(format_explanation(items, args.box, args.stride, args.output_size), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
