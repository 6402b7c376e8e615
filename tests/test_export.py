"""Export of roikit's ops and of detectors with RoIPooler: ONNX (dynamo exporter, run in plain onnxruntime) and
torch.export / torch.compile.

The oracle of every ONNX check is the PyTorch op on the same inputs (each op is itself exact to torchvision or its
naive loop in its own test file); the onnxruntime outputs must agree to float32 rounding.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import ort_session, quiet_onnx_export
from torch.export import Dim

from roikit.export import batched_nms, export_friendly_nms, torch_export
from roikit.ops import (
    deform_roi_pool,
    multilevel_roi_align,
    prroi_pool,
    ps_roi_align,
    ps_roi_pool,
    roi_align,
    roi_pool,
    roi_spp,
)

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
REPO = Path(__file__).parents[1]



class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, boxes):
        return self.fn(x, boxes)


# name -> (op call, channels of the map)
OPS = {
    "roi_align avg aligned sr=2": (lambda x, b: roi_align(x, b, 7, 1 / 8, 2, True), 8),
    "roi_align avg legacy adaptive": (lambda x, b: roi_align(x, b, (5, 3), 1 / 8, 0, False), 8),
    "roi_align max aligned sr=2": (lambda x, b: roi_align(x, b, 7, 1 / 8, 2, True, pool="max"), 8),
    "roi_align max legacy adaptive": (lambda x, b: roi_align(x, b, 4, 1 / 8, -1, False, pool="max"), 8),
    "roi_pool torchvision": (lambda x, b: roi_pool(x, b, 7, 1 / 8), 8),
    "roi_pool integer": (lambda x, b: roi_pool(x, b, (7, 4), 1 / 8, "integer"), 8),
    "roi_spp": (lambda x, b: roi_spp(x, b, (1, 2, 3), 1 / 8, "integer"), 8),
    "prroi_pool": (lambda x, b: prroi_pool(x, b, 7, 1 / 8), 8),
    "prroi_pool aligned": (lambda x, b: prroi_pool(x, b, (4, 6), 1 / 8, True), 8),
    "ps_roi_align sr=2": (lambda x, b: ps_roi_align(x, b, 3, 1 / 8, 2), 18),
    "ps_roi_align adaptive": (lambda x, b: ps_roi_align(x, b, (2, 3), 1 / 8, 0), 12),
    "ps_roi_pool": (lambda x, b: ps_roi_pool(x, b, 3, 1 / 8), 18),
}
MAX_ERROR = 2e-6  # float32 rounding of sums over a few cells of N(0, 1) values


@pytest.mark.parametrize("name", list(OPS))
def test_op_in_onnxruntime_matches_pytorch(name, make_rois):
    """Exported with a dynamic number of boxes and map size; run on other boxes, another map and no boxes. The
    ExportedProgram of torch.export gives the eager result."""
    fn, channels = OPS[name]
    model = _Op(fn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 13, 17, generator=g)
    rois = make_rois(k=12, n=2, size=(13, 17), scale=1 / 8, dtype=torch.float32)
    program = quiet_onnx_export(model, (x, rois), dynamic_shapes={"x": {2: Dim("H"), 3: Dim("W")},
                                                              "boxes": {0: Dim("K")}})
    assert {o.domain for o in program.model_proto.opset_import} <= {"", "ai.onnx"}  # standard ops only
    torch.testing.assert_close(torch_export(model, (x, rois)).module()(x, rois), model(x, rois), rtol=0, atol=0)
    session = ort_session(program)
    other = torch.randn(2, channels, 9, 21, generator=g)
    for features, boxes in ((x, rois), (other, make_rois(k=7, n=2, size=(9, 21), scale=1 / 8, seed=1,
                                                         dtype=torch.float32)), (x, rois[:0])):
        out = session.run(None, {"x": features.numpy(), "boxes": boxes.numpy()})[0]
        expected = model(features, boxes).numpy()
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, rtol=0, atol=MAX_ERROR)


@pytest.mark.parametrize(("name", "onnx_op"), [("roi_align avg aligned sr=2", "RoiAlign"),
                                               ("roi_pool torchvision", "MaxRoiPool"),
                                               ("roi_pool integer", "MaxRoiPool")])
def test_ops_with_an_onnx_operator_use_it(name, onnx_op):
    fn, channels = OPS[name]
    program = quiet_onnx_export(_Op(fn), (torch.randn(1, channels, 8, 8), torch.tensor([[0.0, 1, 2, 40, 50]])))
    assert onnx_op in {node.op_type for node in program.model_proto.graph.node}


def test_multilevel_roi_align_in_onnxruntime():
    """The FPN level rule and RoiAlign per level: boxes on every level, on the level boundaries (112 and 224 px
    squares), a reversed box (no level: zeros, as torchvision) and no boxes."""
    class Pyramid(torch.nn.Module):
        def forward(self, f0, f1, f2, boxes):
            return multilevel_roi_align([f0, f1, f2], boxes, 7, [1 / 4, 1 / 8, 1 / 16], 2, False)

    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 4, 64 // s, 64 // s, generator=g) for s in (4, 8, 16)]
    boxes = torch.tensor([[0, 1.0, 2, 30, 20], [1, 0, 0, 250, 250], [0, 10, 10, 120, 100], [1, 5, 5, 4, 50],
                          [0, 0, 0, 112, 112], [1, 0, 0, 224, 224], [0, 3, 4, 9, 8]])
    program = quiet_onnx_export(Pyramid(), (*maps, boxes), dynamic_shapes={"f0": None, "f1": None, "f2": None,
                                                                        "boxes": {0: Dim("K")}})
    session = ort_session(program)
    for b in (boxes, boxes[2:4], boxes[:0]):
        out = session.run(None, dict(zip(["f0", "f1", "f2", "boxes"], [m.numpy() for m in maps] + [b.numpy()])))[0]
        np.testing.assert_allclose(out, Pyramid()(*maps, b).numpy(), rtol=0, atol=MAX_ERROR)


@pytest.mark.parametrize("with_offset", [True, False])
def test_deform_roi_pool_in_onnxruntime(with_offset, make_rois):
    """mmcv's deformable RoI pooling: per-bin weights (offsets of several box widths too); no offset is RoiAlign."""
    class Deform(torch.nn.Module):
        def forward(self, x, boxes, offset):
            return deform_roi_pool(x, boxes, offset if with_offset else None, (3, 4), 1 / 8, 2, 0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 13, 17, generator=g)
    rois = make_rois(k=9, n=2, size=(13, 17), scale=1 / 8, dtype=torch.float32, reversed_boxes=False)
    offset = torch.randn(9, 2, 3, 4, generator=g)
    program = quiet_onnx_export(Deform(), (x, rois, offset), dynamic_shapes={"x": None, "boxes": {0: Dim("K")},
                                                                         "offset": {0: Dim("K")}})
    session = ort_session(program)
    for b, o in ((rois, offset), (rois[:4], offset[:4] * 30), (rois[:0], offset[:0])):
        feed = {"x": x.numpy(), "boxes": b.numpy(), "offset": o.numpy()}
        out = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]
        np.testing.assert_allclose(out, Deform()(x, b, o).numpy(), rtol=0, atol=MAX_ERROR)


def test_onnxruntime_roialign_max_is_not_the_max_of_samples():
    """Why ``roi_align(pool="max")`` is not exported as ONNX ``RoiAlign(mode="max")``: onnxruntime (as the ONNX
    reference implementation) takes the largest weighted tap ``w_i v_i`` of a sample, not the sample's bilinear
    value (microsoft/onnxruntime#6146, onnx/onnx#4764). Hand-worked: one sample at the centre of the 2 x 2 map
    [[1, 2], [3, 4]] reads each cell with weight 1/4; its value is 2.5, onnxruntime's max gives 4 / 4 = 1."""
    from onnx import TensorProto, helper

    node = helper.make_node("RoiAlign", ["X", "rois", "batch"], ["Y"], mode="max", output_height=1, output_width=1,
                            sampling_ratio=1, spatial_scale=1.0, coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph(
        [node], "max", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1, 2, 2]),
                        helper.make_tensor_value_info("rois", TensorProto.FLOAT, [1, 4]),
                        helper.make_tensor_value_info("batch", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], np.float32)
    box = np.array([[0.5, 0.5, 1.5, 1.5]], np.float32)  # half_pixel: cells [0, 1], one sample at (0.5, 0.5)
    assert session.run(None, {"X": x, "rois": box, "batch": np.array([0])})[0].item() == 1.0
    ours = roi_align(torch.from_numpy(x), torch.tensor([[0.0, 0.5, 0.5, 1.5, 1.5]]), 1, 1.0, 1, True, pool="max")
    assert ours.item() == 2.5
    program = quiet_onnx_export(_Op(lambda x, b: roi_align(x, b, 1, 1.0, 1, True, pool="max")),
                            (torch.from_numpy(x), torch.tensor([[0.0, 0.5, 0.5, 1.5, 1.5]])))
    assert ort_session(program).run(None, {"x": x, "boxes": np.array([[0, 0.5, 0.5, 1.5, 1.5]], np.float32)})[0] \
        .item() == 2.5


@pytest.mark.parametrize("count", [0, 1, 300, 1500])  # 1500 boxes: torchvision's per-category loop (> 4000 values)
def test_batched_nms_keeps_what_torchvision_keeps(count):
    from torchvision.ops import batched_nms as torchvision_batched_nms

    g = torch.Generator().manual_seed(count)
    xy = torch.rand(count, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(count, 2, generator=g) * 80 + 1], dim=1)
    scores = torch.randperm(count, generator=g).float() / max(count, 1)  # distinct: one order
    idxs = torch.randint(0, 5, (count,), generator=g)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), torchvision_batched_nms(boxes, scores, idxs, 0.5))


# ---------------------------------------------------------------- detectors
def _mobilenet_detector(**swap_options):
    """torchvision's Faster R-CNN MobileNetV3-FPN (random weights, 160 px images) with roikit's pooler."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    from roikit.modeling import swap_roi_pooler

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=160,
                                              max_size=160)
    # its MultiScaleRoIAlign names maps "0"-"3" but the backbone gives "0", "1", "pool": it pools the two it finds
    model.roi_heads.box_roi_pool.featmap_names = ["0", "1"]
    return swap_roi_pooler(model, **swap_options).eval()


def _roikit_detector():
    from roikit.engine import load_config
    from roikit.modeling import build_detector

    torch.manual_seed(0)
    return build_detector(load_config(REPO / "configs" / "base_shapes.yaml", ["model.num_classes=3"])).eval()


class RegionPath(torch.nn.Module):
    """backbone -> RoIPooler -> box head -> predictor on given proposals of one image: (class logits, deltas)."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images, boxes):
        features = self.detector.backbone(images)
        heads = self.detector.roi_heads
        pooled = heads.box_roi_pool(features, [boxes], [(images.shape[-2], images.shape[-1])])
        return heads.box_predictor(heads.box_head(pooled))


class Detections(torch.nn.Module):
    """The whole detector on one image: boxes, scores, labels."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, image):
        found = self.detector([image])[0]
        return found["boxes"], found["scores"], found["labels"]


PROPOSALS = torch.tensor([[0.0, 0, 150, 150], [10, 20, 60, 90], [30, 30, 40, 45], [5, 5, 100, 50], [70, 2, 71, 9]])


def _check_region_path(region, images, compile_too):
    with torch.no_grad():
        expected = region(images, PROPOSALS)
        program = torch_export(region, (images, PROPOSALS))
        for got, want in zip(program.module()(images, PROPOSALS), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        if compile_too:
            compiled = torch.compile(region, fullgraph=True, backend="eager")
            for got, want in zip(compiled(images, PROPOSALS), expected):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    onnx_out = ort_session(quiet_onnx_export(region, (images, PROPOSALS))).run(
        None, {"images": images.numpy(), "boxes": PROPOSALS.numpy()})
    for got, want in zip(onnx_out, expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("op", [dict(op="roi_align", aligned=True), dict(op="roi_pool", rounding="integer")],
                         ids=["roi_align", "roi_pool_integer"])
def test_region_path_of_roikit_detector_exports(op):
    """torch.export, torch.compile(fullgraph=True) and ONNX of roikit's detector (small CNN, stride 16) from the
    backbone through RoIPooler and the box head give the eager result."""
    from roikit.modeling import swap_roi_pooler

    region = RegionPath(swap_roi_pooler(_roikit_detector(), **op))
    _check_region_path(region, torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1)), True)


@pytest.mark.slow  # about 5 s on an idle machine (the ONNX export of MobileNetV3)
def test_region_path_of_torchvision_detector_exports():
    """The same through torchvision's Faster R-CNN MobileNetV3-FPN with roikit's pooler (two FPN levels: the fused
    multilevel_roi_align op)."""
    region = RegionPath(_mobilenet_detector(op="roi_align", aligned=True))
    _check_region_path(region, torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1)), False)


# The whole detector (RPN, NMS, pooler, box head, post-processing): the number of proposals is data-dependent, so
# convert_boxes_to_rois builds the batch column from b.shape[0] (len(b) cannot be traced by torch.export).
@pytest.mark.parametrize("build", [_roikit_detector, lambda: _mobilenet_detector(op="roi_align", aligned=True)],
                         ids=["roikit_small_cnn", "torchvision_mobilenet_fpn"])
def test_whole_detector_torch_export_matches_eager(build):
    detections = Detections(build())
    image = torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(2))
    program = torch_export(detections, (image,))
    with torch.no_grad(), export_friendly_nms():  # eager with the same NMS: the same ties broken the same way
        for img in (image, torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(3)), image * 0):
            for got, want in zip(program.module()(img), detections(img)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow  # about 10 s to export
def test_whole_roikit_detector_in_onnxruntime():
    """torch.onnx falls back to torch.export(strict=True) here, which traces len() of the proposals (see above)."""
    detections = Detections(_roikit_detector())
    image = torch.rand(3, 320, 320, generator=torch.Generator().manual_seed(2))
    session = ort_session(quiet_onnx_export(detections, (image,)))
    with torch.no_grad(), export_friendly_nms():
        for img in (image, torch.rand(3, 320, 320, generator=torch.Generator().manual_seed(3))):
            boxes, scores, labels = session.run(None, {session.get_inputs()[0].name: img.numpy()})
            want = detections(img)
            assert boxes.shape == tuple(want[0].shape)
            np.testing.assert_allclose(scores, want[1].numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(boxes, want[0].numpy(), rtol=0, atol=1e-2)
            np.testing.assert_array_equal(labels, want[2].numpy())
