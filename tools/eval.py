"""Evaluate a detector with COCOeval, under one pooling rule or all of them.

A roikit run: ``python tools/eval.py --checkpoint runs/x/checkpoint.pth`` (the config saved in the checkpoint;
--config FILE to use another). torchvision's detectors from a local weights file, without training:
``python tools/eval.py --model torchvision:fasterrcnn_resnet50_fpn --weights FILE --annotations
instances_val2017.json --images val2017 --pooler all``.

--pooler evaluates the same weights with another pooling op: ``roi_pool:rounding=integer``,
``roi_align:aligned=false,sampling_ratio=0`` (op, then the op's settings; ``sampling_ratio=`` sets the pooler's).
Settings given for the model's own op are laid over its own; another op starts from its own defaults. ``--pooler
all``: the model's own pooler and every rule of roikit.analysis.rules in one go, one table, a bar chart and a JSON.
Writes <stem>_results.json (COCO results, the annotation file's category ids) and <stem>_metrics.json, stem
``eval`` or ``eval_<pooler>`` (e.g. ``eval_roi_pool-rounding-integer``); --pooler all also eval_all_rules.json and
eval_all_rules.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from roikit.utils.threads import add_threads_argument, positive_int, torch_threads


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roikit = parser.add_argument_group("a roikit run")
    roikit.add_argument("--checkpoint", default=None, help="checkpoint.pth written by tools/train.py")
    roikit.add_argument("--config", default=None,
                        help="a YAML config for the checkpoint (default: the config saved in the checkpoint)")
    tv = parser.add_argument_group("a torchvision detector")
    tv.add_argument("--model", default=None, metavar="torchvision:NAME",
                    help="torchvision:fasterrcnn_resnet50_fpn, torchvision:fasterrcnn_resnet50_fpn_v2, "
                         "torchvision:fasterrcnn_mobilenet_v3_large_fpn or torchvision:maskrcnn_resnet50_fpn "
                         "(its box detector)")
    tv.add_argument("--weights", default=None, help="the model's state_dict file (e.g. torchvision's "
                                                    "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth); nothing is downloaded")
    parser.add_argument("--annotations", default=None,
                        help="COCO instances JSON to evaluate on (default for a run: the config's data.val_*)")
    parser.add_argument("--images", default=None, help="the folder of the annotation file's images")
    parser.add_argument("--pooler", default=None, metavar="SPEC|all",
                        help="evaluate with another pooler, e.g. roi_pool:rounding=integer; 'all': every rule")
    parser.add_argument("--min-size", type=positive_int, default=None, metavar="PX",
                        help="resize images to this shorter side (the model's transform; default: the config's "
                             "for a run, 800 for torchvision's; smaller is faster on a CPU)")
    parser.add_argument("--max-size", type=positive_int, default=None, metavar="PX",
                        help="and at most this longer side (default: the config's for a run, 1333 for torchvision's)")
    parser.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                        help="evaluate on the first N images only (a quick run)")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                        help="images per batch (default: the config's data.eval_batch_size for a run; 1 for "
                             "torchvision's, as its reference scripts score them: a batch pads its images to one size)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="default: the config's train.device for a run, auto (CUDA when there is a GPU) else")
    parser.add_argument("--output-dir", default=None,
                        help="where the results go (default: the checkpoint's folder; runs/torchvision_<NAME>)")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: eval[_<pooler>])")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser)
    parser.add_argument("opts", nargs="*", metavar="key.sub=value", help="config overrides (a roikit run)")
    return parser


def main(args: argparse.Namespace) -> int:
    from roikit.engine.evaluation import evaluate_target, run_target, torchvision_target
    from roikit.io import output_dir
    from roikit.utils.distributed import cleanup

    with torch_threads(args.threads):
        try:
            if (args.annotations is None) != (args.images is None):
                raise ValueError("--annotations and --images go together (the file and the folder of its images)")
            if args.model is not None:
                given = [flag for flag, v in (("--checkpoint", args.checkpoint), ("--config", args.config),
                                              ("key.sub=value overrides", args.opts)) if v]
                if given:
                    raise ValueError(f"--model (a torchvision detector) takes no {', '.join(given)}")
                if args.weights is None:
                    raise ValueError(f"--model {args.model} needs --weights FILE, the model's state_dict "
                                     "(nothing is downloaded)")
                if args.annotations is None:
                    raise ValueError(f"--model {args.model} needs --annotations FILE and --images DIR")
                target = torchvision_target(args.model, args.weights, args.annotations, args.images,
                                            device=args.device or "auto", min_size=args.min_size,
                                            max_size=args.max_size)
            elif args.checkpoint is not None:
                if args.weights is not None:
                    raise ValueError("--weights goes with --model torchvision:NAME; a run's weights are --checkpoint")
                if not Path(args.checkpoint).is_file():
                    raise ValueError(f"checkpoint not found: {args.checkpoint}")
                target = run_target(args.checkpoint, config=args.config, overrides=args.opts,
                                    pooler=None if args.pooler == "all" else args.pooler,
                                    annotations=args.annotations, images=args.images, device=args.device,
                                    min_size=args.min_size, max_size=args.max_size)
            else:
                raise ValueError("give --checkpoint FILE (a roikit run) or --model torchvision:NAME --weights FILE")
            folder = output_dir(args.output_dir or target.default_folder,
                                "--output-dir" if args.output_dir else "the output folder")
            evaluate_target(target, folder, pooler=args.pooler if args.model or args.pooler == "all" else None,
                            name=args.name, max_images=args.max_images, batch_size=args.batch_size,
                            progress=not args.no_progress)
        except (ValueError, OSError) as e:  # OSError: a file that cannot be written (disk full, no permission)
            print(f"eval.py: error: {e}", file=sys.stderr)
            return 2
        finally:
            cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
