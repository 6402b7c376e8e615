"""Generate the synthetic shapes data set (COCO format).

    python tools/make_shapes.py --root data/shapes --num-train 2000 --num-val 500
"""
from __future__ import annotations

import argparse
import sys

from roikit.data.shapes import make_shapes_dataset
from roikit.io import output_dir


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/shapes", help="output folder (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=2000, help="training images (default: %(default)s)")
    parser.add_argument("--num-val", type=int, default=500, help="validation images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=320, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        paths = make_shapes_dataset(
            output_dir(args.root, "--root"),
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as e:
        print(f"make_shapes: error: {e}", file=sys.stderr)
        return 2
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
