"""Detection models: backbones, the Fast R-CNN box head and predictor, the assembled detector, pooler swapping."""
from .backbones import SmallConvNet, resnet_fpn
from .box_head import FastRCNNFCHead
from .detector import build_backbone, build_detector, build_pooler
from .predictor import FastRCNNPredictor
from .swap import swap_roi_pooler

__all__ = ["SmallConvNet", "resnet_fpn", "FastRCNNFCHead", "FastRCNNPredictor", "build_backbone", "build_pooler",
           "build_detector", "swap_roi_pooler"]
