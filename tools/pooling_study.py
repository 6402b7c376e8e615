"""Classify ground-truth crops of the synthetic shapes with max, average, stochastic and bilinear pooling heads.

    python tools/pooling_study.py                                   # ~3,000 train / 1,000 val crops, a few minutes
    python tools/pooling_study.py --epochs 2 --train-crops 500 --val-crops 200 --output-dir outputs/quick

Writes ``results.json`` and ``pooling_study.png`` to ``--output-dir`` and prints a Markdown table.
The data set is generated once into ``--data-root`` (kept for later runs).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

from roikit.analysis.pooling_study import HEADS, StudyConfig, format_table, plot_results, run_study
from roikit.data import CocoDetection, ensure_shapes_dataset
from roikit.io import atomic_save_json, output_dir
from roikit.utils.threads import add_threads_argument, torch_threads


def get_args_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="data/shapes_study",
                        help="synthetic shapes folder (default: %(default)s)")
    parser.add_argument("--num-train-images", type=int, default=1000,
                        help="training images to generate, about 3.5 boxes each (default: %(default)s)")
    parser.add_argument("--num-val-images", type=int, default=320, help="validation images (default: %(default)s)")
    parser.add_argument("--train-crops", type=int, default=d.train_crops,
                        help="ground-truth boxes cut out of the training images to train on, at most "
                             "(default: %(default)s)")
    parser.add_argument("--val-crops", type=int, default=d.val_crops,
                        help="ground-truth boxes cut out of the validation images to score, at most "
                             "(default: %(default)s)")
    parser.add_argument("--crop-size", type=int, default=d.crop_size, help="crop side in pixels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs,
                        help="passes over the training crops, for each head (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="training crops per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr,
                        help="Adam learning rate, cosine decay (default: %(default)s)")
    parser.add_argument("--width", type=int, default=d.width, help="trunk width; the map has 4x (default: %(default)s)")
    parser.add_argument("--compact-dim", type=int, default=d.compact_dim,
                        help="compact bilinear output dimension (default: %(default)s)")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS,
                        help="heads to compare (default: all)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="data set, batch order and initial weights (default: %(default)s)")
    add_threads_argument(parser, "on a shared machine one thread is much faster than two")
    parser.add_argument("--output-dir", default="outputs/pooling_study",
                        help="folder for results.json and pooling_study.png, made if missing (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        config = StudyConfig(
            train_crops=args.train_crops, val_crops=args.val_crops, crop_size=args.crop_size, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, width=args.width, compact_dim=args.compact_dim,
            seed=args.seed, heads=args.heads,
        )
        out = output_dir(args.output_dir, "--output-dir")  # a file there is an error before the study, not after
        with torch_threads(args.threads):  # restored after: main() may run inside another program (the tests)
            start = time.perf_counter()
            paths = ensure_shapes_dataset(args.data_root, num_train=args.num_train_images,
                                          num_val=args.num_val_images, seed=args.seed, progress=not args.no_progress)
            data_s = time.perf_counter() - start
            train_set = CocoDetection(paths["train_images"], paths["train_annotations"])
            val_set = CocoDetection(paths["val_images"], paths["val_annotations"])
            start = time.perf_counter()
            results = run_study(train_set, val_set, config, progress=not args.no_progress)
            study_s = time.perf_counter() - start
    except (ValueError, OSError) as e:
        print(f"pooling_study: error: {e}", file=sys.stderr)
        return 2
    results["data"]["root"] = paths["root"]
    results["data"]["dataset_s"] = data_s  # generation, or 0-ish when the folder was already there
    results["study_s"] = study_s
    results["command"] = " ".join(["python", "tools/pooling_study.py", *sys.argv[1:]])
    results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    atomic_save_json(out / "results.json", results)
    plot_results(results, out / "pooling_study.png")
    print(format_table(results), end="")
    print(f"study: {study_s:.1f} s (data set: {data_s:.1f} s); wrote {out / 'results.json'}, "
          f"{out / 'pooling_study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
