"""Detection models: backbones, the Fast R-CNN box head and predictor, the assembled detector, pooler swapping."""
from .backbones import SmallConvNet, resnet_fpn
from .box_head import HEAD_POOLS, FastRCNNConvFCHead, build_head_pool
from .detector import build_backbone, build_box_head, build_detector, build_pooler
from .predictor import FastRCNNPredictor
from .swap import swap_roi_pooler
from .torchvision_models import TORCHVISION_MODELS, load_torchvision_detector

__all__ = ["SmallConvNet", "resnet_fpn", "FastRCNNConvFCHead", "build_head_pool", "HEAD_POOLS", "FastRCNNPredictor",
           "build_backbone", "build_pooler", "build_box_head", "build_detector", "swap_roi_pooler",
           "TORCHVISION_MODELS", "load_torchvision_detector"]
