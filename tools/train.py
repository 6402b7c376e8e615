"""Train a detector: ``python tools/train.py --config configs/base_shapes.yaml [key.sub=value ...]``.

Several processes: ``torchrun --nproc_per_node 2 tools/train.py ...`` (gloo on CPU, nccl on GPU).
Checkpoints (each save is printed), metrics.jsonl and the evaluations (eval_final_results.json with the detections
in COCO's results format, eval_final_metrics.json with the scores) go to --output-dir (default: train.output_dir of
the config, else runs/<config name>). --resume continues the run there with its own config, the one saved in its
checkpoint: a --config given with it only names the default folder, and each key where it differs from the saved
config is printed; key.sub=value overrides given with --resume change the saved config, are printed, and are
recorded in config_resume_<iteration>.yaml beside the run's config.yaml.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from roikit.engine.config import load_config
from roikit.engine.trainer import resume, train
from roikit.io import output_dir as check_output_dir
from roikit.utils.threads import add_threads_argument, torch_threads


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config file, e.g. configs/base_shapes.yaml "
                        "(needed unless --resume with --output-dir)")
    parser.add_argument("--output-dir", default=None,
                        help="where checkpoints and metrics go (default: train.output_dir, else runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its checkpoint, with its saved config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser, "per process under torchrun")
    parser.add_argument("opts", nargs="*", metavar="key.sub=value", help="config overrides, e.g. solver.lr=0.01")
    return parser


def main(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        try:
            if args.config is None and not (args.resume and args.output_dir):
                raise ValueError("--config is needed (or --resume with --output-dir)")
            cfg = load_config(args.config, [] if args.resume else args.opts) if args.config else None
            folder = args.output_dir or cfg["train"]["output_dir"] or Path("runs") / Path(args.config).stem
            folder = check_output_dir(folder, "--output-dir" if args.output_dir else "the output folder")
            if args.resume:
                resume(folder, args.opts, progress=not args.no_progress, config_file=args.config)
            else:
                train(cfg, folder, progress=not args.no_progress)
        except (ValueError, OSError) as e:  # OSError: a file that cannot be written (disk full, no permission)
            print(f"train.py: error: {e}", file=sys.stderr)
            return 2
        except FloatingPointError as e:
            print(f"train.py: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
