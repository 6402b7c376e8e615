"""Measure box misalignment: what each pooling rule does to the boxes of a COCO annotation file.

    python tools/misalignment.py                                  # the synthetic shapes val set, with its images
    python tools/misalignment.py --annotations instances_val2017.json --images val2017 --strides 16 32
    python tools/misalignment.py --rules roi_pool_torchvision ps_roi_pool roi_align_aligned   # R-FCN's rounding too
    python tools/misalignment.py --annotations ../shared/data/coco-mini/annotations/instances_val2017.json \
        --images ../shared/data/coco-mini/val2017      # real photographs: coco-mini's val boxes

Per rule, stride and COCO size bucket: the bin-centre error (px and as a fraction of the box side), the IoU of the
box with the cells the rule reads and, with images, the crop error. Writes tables.md, results.json, plots and
pictures to --output-dir. See roikit/analysis/misalignment.py for the definitions and docs/misalignment.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from roikit.analysis import misalignment as mis
from roikit.analysis import misalignment_report as report
from roikit.analysis.rules import DEFAULT_RULES, STUDY_RULES, make_rules
from roikit.io import atomic_save_json, atomic_write_text, output_dir
from roikit.utils.threads import add_threads_argument, torch_threads


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", default=None,
                        help="COCO instances JSON (default: the synthetic shapes val set under --data-root)")
    parser.add_argument("--images", default=None,
                        help="images folder for the crop error (default: the synthetic val images when "
                             "--annotations is not given; none otherwise)")
    parser.add_argument("--no-images", action="store_true", help="skip the crop error even for the default set")
    parser.add_argument("--data-root", default="data/shapes", help="synthetic data set folder (default: %(default)s)")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), metavar="RULE",
                        help=f"rules to compare, from: {', '.join(STUDY_RULES)} (ps_roi_pool: R-FCN's position-"
                             "sensitive pooling, its own rounding; default: %(default)s)")
    parser.add_argument("--sampling-ratio", type=int, default=2,
                        help="roi_align samples per bin and axis, <= 0 adaptive (default: %(default)s)")
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16, 32], metavar="S",
                        help="feature-map strides to measure at, pixels per cell (FPN levels P2-P5: 4 8 16 32; "
                             "default: %(default)s)")
    parser.add_argument("--output-size", type=int, default=7, help="bins per side (default: %(default)s)")
    parser.add_argument("--max-boxes", type=int, default=None, help="measure at most this many boxes, evenly "
                        "spread over the file (default: all)")
    parser.add_argument("--output-dir", default="outputs/misalignment",
                        help="folder for tables.md, results.json and the PNG plots and pictures, made if missing "
                             "(default: %(default)s)")
    parser.add_argument("--picture-boxes", type=int, default=3,
                        help="boxes in each boxes_stride<S>.png: the median-sized box of each COCO size bucket "
                             "(default: %(default)s)")
    parser.add_argument("--picture-annotations", type=int, nargs="+", default=None, metavar="ID",
                        help="draw these annotation ids in the pictures instead (boxes that are measured)")
    add_threads_argument(parser, "one thread is often faster: the work is many small ops, which extra threads "
                                 "slow down on a busy machine")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    mis.check_output_size(args.output_size, "--output-size")
    if args.picture_boxes < 0:
        raise ValueError(f"--picture-boxes must be >= 0, got {args.picture_boxes}")
    if any(s <= 0 for s in args.strides):
        raise ValueError(f"--strides must be positive ints, got {args.strides}")
    if len(set(args.strides)) != len(args.strides):
        raise ValueError(f"--strides lists a stride twice: {args.strides}")
    if args.max_boxes is not None and args.max_boxes <= 0:
        raise ValueError(f"--max-boxes must be a positive int, got {args.max_boxes}")


def run(args: argparse.Namespace) -> list[Path]:
    """Measure, print the tables and write the outputs; returns the files written. Raises ValueError/OSError."""
    _check_args(args)
    out = output_dir(args.output_dir, "--output-dir")
    rules = make_rules(args.rules, args.sampling_ratio)
    annotations, images = args.annotations, args.images
    if annotations is None:
        from roikit.data import ensure_shapes_dataset

        paths = ensure_shapes_dataset(args.data_root, progress=not args.no_progress)
        annotations = paths["val_annotations"]
        images = images if images is not None else paths["val_images"]
    if args.no_images:
        images = None
    start = time.perf_counter()
    boxset = mis.load_coco_boxes(annotations, max_boxes=args.max_boxes)
    picks = report.pick_examples(boxset, args.picture_boxes) if args.picture_annotations is None \
        else _annotation_rows(boxset, args.picture_annotations)
    results = mis.measure_dataset(boxset, rules, args.strides, args.output_size, images_dir=images,
                                  progress=not args.no_progress)
    seconds = time.perf_counter() - start
    summary = mis.summarize(results, rules, boxset.areas)
    counts = boxset.counts
    header = (f"# Box misalignment\n\nAnnotations: `{annotations}`; images: `{images or 'none'}`; "
              f"{args.output_size}x{args.output_size} bins; roi_align sampling_ratio {args.sampling_ratio}.\n\n"
              f"Boxes: {counts['annotations']} annotations, {counts['measured']} measured; skipped: "
              f"{counts['crowd']} crowd, {counts['zero_area']} zero-area, {counts['outside']} outside their "
              f"image; {counts['clipped']} clipped to their image; {counts['subsampled']} left out by "
              f"--max-boxes. Measured in {seconds:.1f} s.\n\n")
    tables = header + report.format_tables(summary)
    written = [out / "tables.md", out / "results.json"]
    atomic_write_text(written[0], tables)
    atomic_save_json(written[1], {
        "annotations": str(annotations),
        "images": None if images is None else str(images),
        "output_size": args.output_size,
        "strides": args.strides,
        "rules": {r.name: r.settings() for r in rules},
        "buckets": {name: [lo, None if hi == float("inf") else hi] for name, lo, hi in mis.BUCKETS},
        "metrics": {k: {"title": t, "unit": u} for k, (t, u) in mis.METRICS.items()},
        "counts": counts,
        "seconds": round(seconds, 2),
        "summary": summary,
    })
    if len(boxset):
        for metric in next(iter(results.values())):
            if metric in mis.METRICS:
                written.append(out / f"{metric}_vs_size.png")
                report.plot_error_vs_size(results, rules, boxset.areas, metric, written[-1])
        for stride in args.strides if len(picks) else []:
            written.append(out / f"boxes_stride{stride}.png")
            report.draw_examples(boxset, picks, rules, stride, args.output_size, written[-1], images)
    print(tables)
    print("wrote " + ", ".join(str(p) for p in written))
    return written


def _annotation_rows(boxset: mis.BoxSet, ann_ids: list[int]):
    """The rows of ``boxset`` holding the annotation ids ``ann_ids``, in that order; ValueError for one that is
    not measured (missing from the file, crowd, empty, or left out by --max-boxes)."""
    where = {int(a): i for i, a in enumerate(boxset.ann_ids.tolist())}
    missing = [a for a in ann_ids if a not in where]
    if missing:
        raise ValueError(f"--picture-annotations: annotation id {missing[0]} is not among the measured boxes (not "
                         f"in the file, a crowd or empty box, or left out by --max-boxes)")
    return [where[a] for a in ann_ids]


def main(args: argparse.Namespace) -> int:
    try:
        with torch_threads(args.threads):  # restored after: main() may run inside another program (tests)
            run(args)
    except (ValueError, OSError) as e:
        print(f"misalignment: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
