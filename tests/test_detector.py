"""The detector's parts and assembly: the small CNN, the box head, each pooler in a detector, swapping the pooler
(against torchvision's Faster R-CNN), and the errors of each. Training and the tools: test_detector_training.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from roikit.engine import load_config
from roikit.engine.config import apply_overrides
from roikit.layers.poolers import RoIPooler
from roikit.modeling import FastRCNNConvFCHead, FastRCNNPredictor, SmallConvNet, build_detector, swap_roi_pooler

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------- model
def test_small_cnn_strides_and_errors():
    x = torch.zeros(2, 3, 96, 128)
    assert SmallConvNet(stride=16, channels=(4, 8, 8, 12))(x)["0"].shape == (2, 12, 6, 8)
    net = SmallConvNet(stride=32, channels=(4, 8, 8, 12, 16), norm="gn")
    assert net(x)["0"].shape == (2, 16, 3, 4) and net.out_channels == 16
    with pytest.raises(ValueError, match="stride must be 16 or 32"):
        SmallConvNet(stride=8)
    with pytest.raises(ValueError, match="stride 32 needs 5 positive channel widths"):
        SmallConvNet(stride=32, channels=(4, 8, 8, 12))
    with pytest.raises(ValueError, match="norm must be one of"):
        SmallConvNet(norm="ln")


def test_box_head_takes_spp_and_grid_features():
    grid = FastRCNNConvFCHead(input_shape=(8, 7, 7), fc_dims=(16, 12))
    assert grid(torch.rand(5, 8, 7, 7)).shape == (5, 12) and grid.out_features == 12
    pooler = RoIPooler(["0"], op="roi_spp", levels=(1, 2))
    spp = FastRCNNConvFCHead(input_shape=pooler.output_shape(8), fc_dims=(16,))
    pooled = pooler({"0": torch.rand(1, 8, 6, 6)}, [torch.tensor([[0.0, 0.0, 40.0, 40.0]])], [(96, 96)])
    assert pooled.shape == (1, 40) and spp(pooled).shape == (1, 16)
    with pytest.raises(ValueError, match=r"expected pooled features \[K, 8, 7, 7\]"):
        grid(torch.rand(5, 8, 6, 6))
    assert FastRCNNConvFCHead(input_shape=(8,), fc_dims=()).out_features == 8  # the predictor reads the pooled vector
    scores, deltas = FastRCNNPredictor(in_features=12, num_classes=6)(torch.rand(5, 12))
    assert scores.shape == (5, 7) and deltas.shape == (5, 28)


@pytest.mark.parametrize("op, options", [("roi_spp", {"levels": [1, 2]}), ("roi_pool", {"rounding": "integer"}),
                                         ("prroi_pool", {})])
def test_detector_trains_and_predicts_with_each_pooler(op, options):
    cfg = load_config(REPO / "configs" / "base_shapes.yaml", [
        "model.num_classes=3", "model.backbone.channels=[8,8,8,16]", "model.box_head.fc_dims=[16]",
        "model.transform.min_size=96", "model.transform.max_size=96", f"model.pooler.op={op}",
        f"model.pooler.options={json.dumps(options)}"])
    torch.manual_seed(0)
    model = build_detector(cfg)
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[5.0, 20.0, 30.0, 40.0], [40.0, 40.0, 90.0, 70.0]]),
                "labels": torch.tensor([1, 3])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.roi_heads.box_head.layers[1].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[1]["boxes"].shape[1] == 4


def test_detector_refuses_an_image_it_would_resize_to_nothing():
    cfg = load_config(REPO / "configs" / "base_shapes.yaml", ["model.num_classes=3", "model.box_head.fc_dims=[8]",
                                                              "model.backbone.channels=[4,4,4,4]"])
    model = build_detector(cfg).eval()  # min_size = max_size = 320: sides up to 320:1
    with torch.no_grad():
        assert model([torch.rand(3, 1, 320)])[0]["boxes"].shape[1] == 4  # resized to 1 x 320
        for h, w in ((20000, 2), (1, 321), (0, 5)):
            with pytest.raises(ValueError, match=rf"an image of {w}x{h} px cannot be resized by model.transform "
                                                 r"\(min_size \[320\], max_size 320\): its short side would be"):
                model([torch.rand(3, h, w)])


def test_swap_roi_pooler_keeps_the_options_of_the_same_op():
    cfg = load_config(REPO / "configs" / "base_shapes.yaml", ["model.num_classes=3", "model.box_head.fc_dims=[8]",
                                                              "model.backbone.channels=[4,4,4,4]"])
    model = build_detector(cfg)  # roi_align, aligned=True
    swap_roi_pooler(model, op="roi_align", pool="max")
    assert model.roi_heads.box_roi_pool.op_options == {"aligned": True, "pool": "max"}
    swap_roi_pooler(model, op="roi_pool")  # another op: its own options only
    assert model.roi_heads.box_roi_pool.op_options == {}
    swap_roi_pooler(model, op="roi_pool", rounding="integer")
    swap_roi_pooler(model, op="roi_pool")
    assert model.roi_heads.box_roi_pool.op_options == {"rounding": "integer"}


def test_build_detector_errors():
    cfg = load_config(REPO / "configs" / "base_shapes.yaml")
    with pytest.raises(ValueError, match="model.num_classes must be an int, got None"):
        build_detector(cfg)
    with pytest.raises(ValueError, match="model.backbone.name must be one of"):
        build_detector(apply_overrides(cfg, ["model.num_classes=2", "model.backbone.name=vgg"]))
    with pytest.raises(ValueError, match="op must be one of"):
        build_detector(apply_overrides(cfg, ["model.num_classes=2", "model.pooler.op=roi_warp"]))


def test_swap_roi_pooler_matches_torchvision():
    """RoIAlign with aligned=False in place of MultiScaleRoIAlign: the same detections (float64, so no ties flip)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    # a random model's scores are all low: keep every detection (score 0); fewer proposals keep the test short
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=128, max_size=160,
                                    rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150, box_score_thresh=0.0)
    model.eval().double()
    images = [torch.rand(3, 128, 160, dtype=torch.float64), torch.rand(3, 96, 128, dtype=torch.float64)]
    with torch.no_grad():
        expected = model(images)
        swap_roi_pooler(model, op="roi_align", aligned=False)
        assert isinstance(model.roi_heads.box_roi_pool, RoIPooler)
        assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
        actual = model(images)
    for e, a in zip(expected, actual):
        assert len(e["boxes"]) == 100
        torch.testing.assert_close(a["boxes"], e["boxes"])
        torch.testing.assert_close(a["scores"], e["scores"])
        assert torch.equal(a["labels"], e["labels"])
    # another op with the same bins fits the box head; roi_spp with other bins does not
    swap_roi_pooler(model, op="roi_pool", rounding="integer")
    assert model.roi_heads.box_roi_pool.op == "roi_pool"
    with pytest.raises(ValueError, match="gives 50 bins per channel, but the box head takes 49"):
        swap_roi_pooler(model, op="roi_spp")
    swap_roi_pooler(model, op="roi_spp", levels=(7,))
    with pytest.raises(ValueError, match="has no roi_heads.box_roi_pool"):
        swap_roi_pooler(torch.nn.Linear(2, 2))
