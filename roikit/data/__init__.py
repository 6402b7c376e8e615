"""Data: COCO-format detection data sets, the synthetic shapes set, detection transforms, and the data sets and
loaders a config describes."""
from roikit.data.build import build_datasets, make_eval_loader, make_train_loader
from roikit.data.coco import CocoDetection, collate_fn
from roikit.data.shapes import SHAPE_CLASSES, ensure_shapes_dataset, make_shapes_dataset, render_image
from roikit.data.transforms import Compose, RandomHorizontalFlip

__all__ = [
    "CocoDetection",
    "collate_fn",
    "SHAPE_CLASSES",
    "render_image",
    "make_shapes_dataset",
    "ensure_shapes_dataset",
    "Compose",
    "RandomHorizontalFlip",
    "build_datasets",
    "make_train_loader",
    "make_eval_loader",
]
