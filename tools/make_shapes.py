"""Generate the synthetic shapes data set (COCO format).

    python tools/make_shapes.py --data-root data/shapes --num-train-images 2000 --num-val-images 500

The options are the config's data.shapes settings (root, num_train, num_val, image_size, seed), named as in the
other tools; tools/train.py makes the set itself on first use, so this is only needed to make it ahead.
"""
from __future__ import annotations

import argparse
import sys

from roikit.data.shapes import make_shapes_dataset
from roikit.io import output_dir
from roikit.utils.threads import add_threads_argument, torch_threads


def get_args_parser() -> argparse.ArgumentParser:
    # no abbreviations: the old names --num-train and --num-val would still be taken as prefixes of the new ones
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--data-root", default="data/shapes",
                        help="output folder, the config's data.shapes.root (default: %(default)s)")
    parser.add_argument("--num-train-images", type=int, default=2000,
                        help="training images, data.shapes.num_train (default: %(default)s)")
    parser.add_argument("--num-val-images", type=int, default=500,
                        help="validation images, data.shapes.num_val (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=320,
                        help="image side in pixels, data.shapes.image_size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, data.shapes.seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser, "the drawing itself is NumPy and OpenCV on one thread")
    return parser


def main(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        try:
            paths = make_shapes_dataset(
                output_dir(args.data_root, "--data-root"),
                num_train=args.num_train_images,
                num_val=args.num_val_images,
                image_size=args.image_size,
                seed=args.seed,
                progress=not args.no_progress,
            )
        except (ValueError, OSError) as e:
            print(f"make_shapes.py: error: {e}", file=sys.stderr)
            return 2
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
