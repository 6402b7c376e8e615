"""Evaluate a checkpoint with COCOeval: ``python tools/eval.py --config FILE --checkpoint FILE``.

--pooler evaluates the same weights with another pooling op: ``roi_pool:rounding=integer``,
``roi_align:aligned=false,sampling_ratio=0`` (op, then the op's settings; ``output_size=`` and ``sampling_ratio=``
set the pooler's). Writes <name>_results.json (COCO results) and <name>_metrics.json beside the checkpoint.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import yaml

from roikit.engine.coco_eval import evaluate, format_metrics, format_per_class
from roikit.engine.config import load_config
from roikit.engine.distributed import cleanup, init_distributed, is_main_process, log
from roikit.engine.trainer import build_datasets, load_checkpoint, make_eval_loader
from roikit.io import atomic_save_json
from roikit.modeling import build_detector


def pooler_overrides(spec: str) -> list[str]:
    """``"roi_pool:rounding=integer"`` -> config overrides of ``model.pooler``."""
    op, _, settings = spec.partition(":")
    if not op.strip():
        raise ValueError(f"--pooler {spec!r}: expected op[:key=value,...], e.g. roi_pool:rounding=integer")
    overrides, options = [f"model.pooler.op={op.strip()}"], {}
    for item in filter(None, (s.strip() for s in settings.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--pooler {spec!r}: {item!r} is not key=value")
        key = key.strip()
        if key in ("output_size", "sampling_ratio"):
            overrides.append(f"model.pooler.{key}={value}")
        else:
            options[key] = yaml.safe_load(value)
    overrides.append("model.pooler.options=" + yaml.safe_dump(options, default_flow_style=True).strip())
    return overrides


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the YAML config the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by tools/train.py")
    parser.add_argument("--pooler", default=None, help="evaluate with another pooler, e.g. roi_pool:rounding=integer")
    parser.add_argument("--output-dir", default=None, help="where the results go (default: the checkpoint's folder)")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: eval[_<pooler>])")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        opts = list(args.opts) + (pooler_overrides(args.pooler) if args.pooler else [])
        cfg = load_config(args.config, opts)
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint not found: {checkpoint}")
        info = init_distributed(cfg["train"]["device"])
        _, val_set = build_datasets(cfg, train=False)
        if cfg["model"]["num_classes"] is None:
            cfg["model"]["num_classes"] = val_set.num_classes
        model = build_detector(cfg).to(info.device)
        iteration = load_checkpoint(checkpoint, model=model)
        name = args.name or "eval" + (f"_{re.sub(r'[^A-Za-z0-9.=-]+', '_', args.pooler)}" if args.pooler else "")
        output_dir = Path(args.output_dir) if args.output_dir else checkpoint.parent
        log(f"evaluating {checkpoint} (iteration {iteration}) with {model.roi_heads.box_roi_pool} "
            f"on {len(val_set)} images")
        metrics = evaluate(model, make_eval_loader(val_set, cfg, info), val_set, info.device,
                           results_file=output_dir / f"{name}_results.json",
                           amp=cfg["train"]["amp"], progress=not args.no_progress)
        if is_main_process():
            atomic_save_json(output_dir / f"{name}_metrics.json",
                             {"checkpoint": str(checkpoint), "iteration": iteration, "pooler": cfg["model"]["pooler"],
                              **{k: v for k, v in metrics.items() if k != "summary"}})
            log(metrics["summary"])
            log(format_per_class(metrics))
            log(format_metrics(metrics))
            log(f"results: {output_dir / f'{name}_results.json'}")
    except ValueError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
