"""Evaluate a checkpoint with COCOeval: ``python tools/eval.py --config FILE --checkpoint FILE``.

--pooler evaluates the same weights with another pooling op: ``roi_pool:rounding=integer``,
``roi_align:aligned=false,sampling_ratio=0`` (op, then the op's settings; ``output_size=`` and ``sampling_ratio=``
set the pooler's). Settings given for the configured op are laid over its configured ones; another op starts from
its own defaults. The pooler used is printed in full. Writes <name>_results.json (COCO results) and
<name>_metrics.json beside the checkpoint (or in --output-dir).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from roikit.data.build import build_datasets, make_eval_loader
from roikit.engine.coco_eval import evaluate, format_metrics, format_per_class
from roikit.engine.config import load_config, pooler_override
from roikit.engine.inference import load_detector
from roikit.io import atomic_save_json, file_in
from roikit.io import output_dir as check_output_dir
from roikit.utils.distributed import cleanup, init_distributed, is_main_process, log


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
        cfg = load_config(args.config, args.opts)
        if args.pooler:
            cfg = pooler_override(cfg, args.pooler)
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint not found: {checkpoint}")
        name = args.name or "eval" + (f"_{re.sub(r'[^A-Za-z0-9.=-]+', '_', args.pooler)}" if args.pooler else "")
        output_dir = check_output_dir(args.output_dir, "--output-dir") if args.output_dir else checkpoint.parent
        stem = file_in(output_dir, name, "--name")
        results_file, metrics_file = (stem.with_name(f"{stem.name}_{kind}.json") for kind in ("results", "metrics"))
        info = init_distributed(cfg["train"]["device"])
        _, val_set = build_datasets(cfg, train=False)
        if cfg["model"]["num_classes"] is None:
            cfg["model"]["num_classes"] = val_set.num_classes
        # the model config may differ from the checkpoint's in its pooler (--pooler): only the tensors must fit
        model, cfg, iteration = load_detector(cfg, checkpoint, info.device, same_model_config=False)
        log(f"evaluating {checkpoint} (iteration {iteration}) on {len(val_set)} images with "
            f"{model.roi_heads.box_roi_pool}")
        metrics = evaluate(model, make_eval_loader(val_set, cfg, info), val_set, info.device, results_file=results_file,
                           amp=cfg["train"]["amp"], progress=not args.no_progress)
        if is_main_process():
            atomic_save_json(metrics_file, {"checkpoint": str(checkpoint), "iteration": iteration,
                                            "pooler": cfg["model"]["pooler"],
                                            **{k: v for k, v in metrics.items() if k != "summary"}})
            log(metrics["summary"])
            log(format_per_class(metrics))
            log(format_metrics(metrics))
            log(f"results: {results_file}")
    except (ValueError, OSError) as e:  # OSError: a file that cannot be written (disk full, no permission)
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
