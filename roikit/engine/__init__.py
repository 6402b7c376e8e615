"""Training and evaluation: the config system, the train loop, COCO evaluation, multi-process set-up."""
from .coco_eval import METRICS, coco_evaluate, detections_to_coco, evaluate, format_metrics, format_per_class
from .config import DEFAULTS, apply_overrides, check_config, load_config, merge_config
from .trainer import (build_datasets, check_state_dict, load_checkpoint, read_checkpoint, resume, save_checkpoint,
                      train)

__all__ = ["METRICS", "coco_evaluate", "detections_to_coco", "evaluate", "format_metrics", "format_per_class",
           "DEFAULTS", "apply_overrides", "check_config", "load_config", "merge_config", "build_datasets",
           "check_state_dict", "load_checkpoint", "read_checkpoint", "resume", "save_checkpoint", "train"]
