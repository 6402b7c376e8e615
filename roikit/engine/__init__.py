"""Training and evaluation: the config system, the train loop, checkpoints, inference on one image, COCO evaluation,
multi-process set-up."""
from ..data.build import build_datasets
from .checkpoint import (
    CHECKPOINT_NAME,
    check_state_dict,
    first_non_finite,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .coco_eval import METRICS, coco_evaluate, detections_to_coco, evaluate, format_metrics, format_per_class
from .config import DEFAULTS, apply_overrides, check_config, load_config, merge_config
from .inference import class_names_of, detect, load_detector, to_tensor
from .trainer import resume, train

__all__ = ["METRICS", "coco_evaluate", "detections_to_coco", "evaluate", "format_metrics", "format_per_class",
           "DEFAULTS", "apply_overrides", "check_config", "load_config", "merge_config", "CHECKPOINT_NAME",
           "check_state_dict", "first_non_finite", "load_checkpoint", "read_checkpoint", "save_checkpoint",
           "class_names_of", "detect", "load_detector", "to_tensor", "resume", "train",
           # roikit.data.build's, also here for the code that has always imported it from roikit.engine
           "build_datasets"]
