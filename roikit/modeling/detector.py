"""Assemble a Faster R-CNN from torchvision's parts and roikit's pooler, box head and predictor.

torchvision gives the image transform (``GeneralizedRCNNTransform``: normalise, resize, batch), the RPN
(``AnchorGenerator``, ``RPNHead``, ``RegionProposalNetwork``) and ``RoIHeads`` (proposal matching, the 25 %
foreground sampling, the (10, 10, 5, 5) box coder, the losses, per-class NMS); roikit gives the region pooling
(:class:`~roikit.layers.poolers.RoIPooler`, any op), the box head and the predictor. The result is a torchvision
``GeneralizedRCNN``: ``model(images, targets)`` returns the loss dict in training and the detections in eval mode.
"""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..layers.deform_pooler import DEFORM_OP
from ..layers.poolers import RoIPooler
from ..utils.checks import check_choice, check_int
from .backbones import SmallConvNet, resnet_fpn
from .box_head import FastRCNNConvFCHead
from .predictor import FastRCNNPredictor

__all__ = ["build_backbone", "build_pooler", "build_box_head", "build_detector", "DetectionTransform", "BACKBONES"]

BACKBONES = ("small_cnn", "resnet_fpn")


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, resize, batch) that refuses, with a ValueError, an image it would
    resize to nothing: an empty one, or one so thin that scaling its long side to ``max_size`` leaves its short
    side under a pixel (sides more than ``max_size`` : 1)."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        h, w = (int(v) for v in image.shape[-2:])
        short, long = min(h, w), max(h, w)
        if short == 0 or short * min(min(self.min_size) / short, self.max_size / long) < 1.0:
            raise ValueError(f"an image of {w}x{h} px cannot be resized by model.transform (min_size "
                             f"{list(self.min_size)}, max_size {self.max_size}): its short side would be under "
                             f"1 px; sides at most {self.max_size}:1 are taken")
        return super().resize(image, target)


def build_backbone(cfg: dict) -> tuple[nn.Module, list[str], list[str]]:
    """``cfg["model"]["backbone"]`` -> (backbone, the names of its maps, the names of the maps to pool from)."""
    b = cfg["model"]["backbone"]
    if check_choice(b["name"], "model.backbone.name", BACKBONES) == "small_cnn":
        backbone = SmallConvNet(stride=b["stride"], channels=b["channels"], depth=b["depth"], norm=b["norm"])
        return backbone, ["0"], ["0"]
    backbone = resnet_fpn(depth=b["resnet_depth"], weights=b["weights"], trainable_layers=b["trainable_layers"])
    return backbone, ["0", "1", "2", "3", "pool"], ["0", "1", "2", "3"]


def build_pooler(cfg: dict, featmap_names: list[str], channels: int | None = None) -> RoIPooler:
    """``cfg["model"]["pooler"]`` -> the pooler; ``channels`` (the backbone's) sizes deform_roi_pool's offset
    heads unless the options give them (then they must agree)."""
    p = cfg["model"]["pooler"]
    options = dict(p["options"])
    if p["op"] == DEFORM_OP and channels is not None:
        given = options.setdefault("channels", channels)
        if given != channels:
            raise ValueError(f"model.pooler.options.channels is {given!r} but the backbone gives {channels} "
                             f"channels (leave it out: the builder takes the backbone's)")
    try:
        return RoIPooler(featmap_names, output_size=p["output_size"], sampling_ratio=p["sampling_ratio"], op=p["op"],
                         **options)
    except TypeError as e:  # an option the op does not take
        raise ValueError(f"model.pooler.options {p['options']} for {p['op']}: {e}") from e


def build_box_head(cfg: dict, input_shape: tuple[int, ...]) -> FastRCNNConvFCHead:
    """``cfg["model"]["box_head"]`` -> the box head for pooled features of ``input_shape`` (one region's)."""
    h = cfg["model"]["box_head"]
    try:
        return FastRCNNConvFCHead(input_shape=input_shape, fc_dims=h["fc_dims"], conv_dims=h["conv_dims"],
                                  pool=h["pool"], pool_options=h["pool_options"])
    except ValueError as e:
        raise ValueError(f"model.box_head: {e}") from e


def _anchor_generator(rpn: dict, num_maps: int) -> AnchorGenerator:
    sizes, ratios = tuple(rpn["anchor_sizes"]), tuple(rpn["aspect_ratios"])
    if not sizes or not ratios:
        raise ValueError("model.rpn.anchor_sizes and model.rpn.aspect_ratios must not be empty")
    if num_maps == 1:
        return AnchorGenerator((sizes,), (ratios,))
    if len(sizes) != num_maps:
        raise ValueError(f"model.rpn.anchor_sizes: the backbone has {num_maps} feature maps, so give one anchor size "
                         f"per map, got {list(sizes)}")
    return AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * num_maps)


def build_detector(cfg: dict) -> GeneralizedRCNN:
    """A ``GeneralizedRCNN`` as ``cfg["model"]`` describes it; ``model.num_classes`` must be set (no background)."""
    m = cfg["model"]
    num_classes = m["num_classes"]
    check_int(num_classes, "model.num_classes", minimum=1)
    backbone, map_names, pooled_names = build_backbone(cfg)

    rpn_cfg = m["rpn"]
    anchors = _anchor_generator(rpn_cfg, len(map_names))
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=rpn_cfg["fg_iou_thresh"],
        bg_iou_thresh=rpn_cfg["bg_iou_thresh"],
        batch_size_per_image=rpn_cfg["batch_size_per_image"],
        positive_fraction=rpn_cfg["positive_fraction"],
        pre_nms_top_n={"training": rpn_cfg["pre_nms_top_n_train"], "testing": rpn_cfg["pre_nms_top_n_test"]},
        post_nms_top_n={"training": rpn_cfg["post_nms_top_n_train"], "testing": rpn_cfg["post_nms_top_n_test"]},
        nms_thresh=rpn_cfg["nms_thresh"],
    )

    pooler = build_pooler(cfg, pooled_names, backbone.out_channels)
    box_head = build_box_head(cfg, pooler.output_shape(backbone.out_channels))
    predictor = FastRCNNPredictor(in_features=box_head.out_features, num_classes=num_classes)
    r = m["roi_heads"]
    if len(r["bbox_reg_weights"]) != 4:
        raise ValueError(f"model.roi_heads.bbox_reg_weights must be 4 numbers, got {r['bbox_reg_weights']!r}")
    roi_heads = RoIHeads(
        pooler, box_head, predictor,
        fg_iou_thresh=r["fg_iou_thresh"],
        bg_iou_thresh=r["bg_iou_thresh"],
        batch_size_per_image=r["batch_size_per_image"],
        positive_fraction=r["positive_fraction"],
        bbox_reg_weights=tuple(float(w) for w in r["bbox_reg_weights"]),
        score_thresh=r["score_thresh"],
        nms_thresh=r["nms_thresh"],
        detections_per_img=r["detections_per_img"],
    )

    t = m["transform"]
    transform = DetectionTransform(t["min_size"], t["max_size"], t["image_mean"], t["image_std"])
    return GeneralizedRCNN(backbone, rpn, roi_heads, transform)
