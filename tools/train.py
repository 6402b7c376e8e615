"""Train a detector: ``python tools/train.py --config configs/base_shapes.yaml [key.sub=value ...]``.

Several processes: ``torchrun --nproc_per_node 2 tools/train.py --config ...`` (gloo on CPU, nccl on GPU).
Checkpoints, metrics.jsonl and the final evaluation go to --output-dir (default: train.output_dir of the config,
else runs/<config name>); --resume continues from the checkpoint there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from roikit.engine.config import load_config
from roikit.engine.trainer import train


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/base_shapes.yaml")
    parser.add_argument("--output-dir", default=None,
                        help="where checkpoints and metrics go (default: train.output_dir, else runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pth")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs="*", metavar="key.sub=value", help="config overrides, e.g. solver.lr=0.01")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.opts)
        output_dir = Path(args.output_dir or cfg["train"]["output_dir"] or Path("runs") / Path(args.config).stem)
        train(cfg, output_dir, resume=args.resume, progress=not args.no_progress)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
