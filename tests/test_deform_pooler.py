"""RoIPooler(op="deform_roi_pool"): learned offsets per pyramid level, in a detector, its config and checkpoints.

Oracles: torchvision's ``roi_align(aligned=True)`` (a fresh pooler's offsets are zero), the same op on boxes moved
by ``gamma`` times their size (a constant offset moves every bin so, by deform_roi_pool's formula), FPN's level
rule (``assign_boxes_to_levels``); a detector trained a step and saved must give, reloaded, its own outputs.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
import yaml
from _helpers import load_tool
from torchvision.models import detection
from torchvision.ops import roi_align as tv_roi_align

from roikit.analysis.rules import RULES
from roikit.data import make_shapes_dataset
from roikit.engine import load_config
from roikit.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint
from roikit.engine.coco_eval import METRICS
from roikit.engine.config import apply_overrides, pooler_override
from roikit.engine.rule_sweep import BASELINE, evaluate_rules
from roikit.engine.trainer import METRICS_NAME
from roikit.io import read_jsonl
from roikit.layers import RoIPooler
from roikit.layers.poolers import assign_boxes_to_levels
from roikit.modeling import build_detector, swap_roi_pooler
from roikit.utils.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]
STRIDES = (4, 8, 16)  # FPN levels 2, 3, 4
IMAGE = 320
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _pyramid(channels: int = 3, batch: int = 2, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {str(i): torch.randn(batch, channels, IMAGE // s, IMAGE // s, generator=g, dtype=dtype)
            for i, s in enumerate(STRIDES)}


# sides 20-60 px go to level 2, 120-200 px to 3, 240-300 px to 4 (FPN: floor(4 + log2(sqrt(area) / 224)))
BOXES = [torch.tensor([[10.0, 12.5, 50.0, 40.0], [100.0, 90.0, 230.0, 250.0], [5.0, 3.0, 300.0, 280.0],
                       [200.3, 201.7, 221.1, 260.9]], dtype=torch.float64),
         torch.tensor([[30.0, 40.0, 190.0, 170.0], [0.0, 0.0, 319.0, 319.0], [150.5, 20.25, 170.0, 44.0]],
                      dtype=torch.float64)]


def _expected(features: dict[str, torch.Tensor], boxes: list[torch.Tensor], sampling_ratio: int,
              shift: tuple[float, float] = (0.0, 0.0), gamma: float = 0.1) -> torch.Tensor:
    """torchvision's roi_align(aligned=True) of each box on its FPN level, the box moved by ``shift`` times
    ``gamma`` times its width / height."""
    flat = torch.cat(boxes)
    levels = assign_boxes_to_levels(flat, 2, 4)
    assert set(levels.tolist()) == {0, 1, 2}  # every level pools some box
    batch = torch.cat([torch.full((len(b), 1), float(i), dtype=flat.dtype) for i, b in enumerate(boxes)])
    w, h = flat[:, 2] - flat[:, 0], flat[:, 3] - flat[:, 1]
    move = torch.stack([w * gamma * shift[0], h * gamma * shift[1]] * 2, dim=1)
    rois = torch.cat([batch, flat + move], dim=1)
    out = []
    for k in range(len(flat)):
        level = int(levels[k])
        out.append(tv_roi_align(features[str(level)], rois[k:k + 1], 7, 1 / STRIDES[level], sampling_ratio, True))
    return torch.cat(out)


def _pooler(**options) -> RoIPooler:
    options = {"channels": 3, "deform_fc_channels": 16, **options}
    return RoIPooler(["0", "1", "2"], 7, options.pop("sampling_ratio", 2), op="deform_roi_pool", **options).double()


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("modulated", [False, True])
def test_a_fresh_pooler_is_roi_align_aligned(sampling_ratio, modulated):
    """Offsets start at zero (the last fc layer does): torchvision's roi_align(aligned=True) on each box's level;
    modulated, the mask starts at sigmoid(0) = 0.5."""
    torch.manual_seed(0)
    features = _pyramid()
    pooler = _pooler(sampling_ratio=sampling_ratio, modulated=modulated)
    got = pooler(features, BOXES, [(IMAGE, IMAGE)] * 2)
    expected = _expected(features, BOXES, sampling_ratio)
    torch.testing.assert_close(got, expected * (0.5 if modulated else 1.0), rtol=0, atol=1e-12)


def test_each_level_moves_its_bins_by_its_own_offsets():
    """A constant offset (dx, dy) moves every bin by gamma * (dx * box width, dy * box height), i.e. pools the
    moved box; level l's pack has offset (l + 1, -0.5 l) (its last layer's bias), so each level reads its own."""
    features = _pyramid()
    gamma = 0.05
    pooler = _pooler(gamma=gamma)
    with torch.no_grad():
        for level, pack in enumerate(pooler.deform.packs):
            pack.offset_fc[-1].bias[:49] = level + 1.0
            pack.offset_fc[-1].bias[49:] = -0.5 * level
    got = pooler(features, BOXES, [(IMAGE, IMAGE)] * 2)
    levels = assign_boxes_to_levels(torch.cat(BOXES), 2, 4)
    for level in range(3):
        expected = _expected(features, BOXES, 2, (level + 1.0, -0.5 * level), gamma)
        torch.testing.assert_close(got[levels == level], expected[levels == level], rtol=0, atol=1e-12)


def test_a_level_without_boxes_still_gives_its_heads_a_gradient():
    """Every level's heads run (on no boxes): each weight has a grad, zero where no box went, as DDP wants."""
    pooler = _pooler(modulated=True)
    small = [torch.tensor([[10.0, 10.0, 40.0, 40.0]], dtype=torch.float64)] * 2  # all on level 2
    pooler(_pyramid(), small, [(IMAGE, IMAGE)] * 2).sum().backward()
    for level, pack in enumerate(pooler.deform.packs):
        for name, p in pack.named_parameters():
            assert p.grad is not None, (level, name)
        assert (pack.offset_fc[-1].weight.grad.abs().sum() > 0) == (level == 0)
        assert (pack.mask_fc[-2].weight.grad.abs().sum() > 0) == (level == 0)


@pytest.mark.parametrize("options, message", [
    ({"gamma": math.nan}, r"deform_roi_pool: gamma \(the offsets' scale.*must be a finite number > 0, got nan"),
    ({"gamma": math.inf}, r"gamma .* got inf"),
    ({"gamma": -0.1}, r"gamma .* got -0.1"),
    ({"gamma": 0}, r"gamma .* got 0"),
    ({"gamma": "0.1"}, r"gamma .* got '0.1'"),
    ({"channels": None}, r"deform_roi_pool: channels \(the feature maps' C.*must be given"),
    ({"channels": 0}, r"deform_roi_pool: channels must be >= 1, got 0"),
    ({"modulated": "yes"}, r"deform_roi_pool: modulated must be True or False"),
    ({"deform_fc_channels": 0}, r"deform_fc_channels must be >= 1"),
    ({"aligned": False}, r"deform_roi_pool is always aligned"),
])
def test_bad_settings(options, message):
    with pytest.raises(ValueError, match=message):
        RoIPooler(["0"], 7, 2, op="deform_roi_pool", **{"channels": 3, **options})


@pytest.mark.parametrize("op, key", [("roi_align", "modulated"), ("roi_pool", "gamma"), ("prroi_pool", "channels"),
                                     ("roi_align_rotated", "deform_fc_channels")])
def test_deform_settings_with_another_op(op, key):
    with pytest.raises(ValueError, match=rf"'{key}' is a setting of op='deform_roi_pool' \(learned offsets\), "
                                         rf"not of op='{op}'"):
        RoIPooler(["0"], 7, 2, op=op, **{key: True})


def test_features_of_other_channels():
    pooler = RoIPooler(["0"], 7, 2, op="deform_roi_pool", channels=4, deform_fc_channels=8)
    with pytest.raises(ValueError, match="the feature map has 3 channels but the offset heads were built for "
                                         "channels=4"):
        pooler({"0": torch.rand(1, 3, 20, 20)}, [torch.tensor([[0.0, 0.0, 50.0, 50.0]])], [(320, 320)])


# ------------------------------------------------------------------------------------------ config and the detector
TINY = ["model.num_classes=3", "model.backbone.channels=[8,8,8,16]", "model.box_head.fc_dims=[16]",
        "model.transform.min_size=96", "model.transform.max_size=96"]


def _tiny_cfg(spec: str):
    return pooler_override(load_config(REPO / "configs" / "base_shapes.yaml", TINY), spec)


def test_config_builds_the_deform_pooler_with_the_backbones_channels():
    cfg = _tiny_cfg("deform_roi_pool:gamma=0.2,deform_fc_channels=32")
    assert cfg["model"]["pooler"] == {"op": "deform_roi_pool", "output_size": 7, "sampling_ratio": 2,
                                      "options": {"gamma": 0.2, "deform_fc_channels": 32}}
    pooler = build_detector(cfg).roi_heads.box_roi_pool
    assert pooler.op == "deform_roi_pool" and pooler.deform.gamma == 0.2 and not pooler.deform.modulated
    assert len(pooler.deform.packs) == 1  # small_cnn: one map
    assert pooler.deform.packs[0].offset_fc[0].in_features == 16 * 49  # the backbone's 16 channels x 7 x 7
    # `model.pooler.op=deform_roi_pool` alone keeps roi_align's {aligned: true}: taken, deform pooling is aligned
    cfg = load_config(REPO / "configs" / "base_shapes.yaml", [*TINY, "model.pooler.op=deform_roi_pool"])
    assert build_detector(cfg).roi_heads.box_roi_pool.deform.channels == 16
    with pytest.raises(ValueError, match=r"model.pooler.options.channels is 8 but the backbone gives 16 channels"):
        build_detector(_tiny_cfg("deform_roi_pool:channels=8"))
    with pytest.raises(ValueError, match=r"gamma .* got -1"):
        build_detector(_tiny_cfg("deform_roi_pool:gamma=-1"))
    with pytest.raises(ValueError, match=r"'modulated' is a setting of op='deform_roi_pool'"):
        build_detector(_tiny_cfg("roi_align:modulated=true"))
    with pytest.raises(ValueError, match=r"model.pooler.options .* for deform_roi_pool: .*'rounding'"):
        build_detector(_tiny_cfg("deform_roi_pool:rounding=integer"))


def _batch():
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1)),
              torch.rand(3, 80, 96, generator=torch.Generator().manual_seed(2))]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[5.0, 20.0, 30.0, 40.0], [40.0, 40.0, 90.0, 70.0]]),
                "labels": torch.tensor([1, 3])}]
    return images, targets


@pytest.mark.parametrize("modulated", [False, True])
def test_detector_trains_saves_and_reloads_with_the_deform_pooler(modulated, tmp_path):
    """Gradients reach the offset head (and the mask head); one SGD step makes the offsets non-zero; the checkpoint
    reloads into a detector built afresh (other random weights) and gives the trained one's detections."""
    cfg = _tiny_cfg(f"deform_roi_pool:gamma=0.1,modulated={str(modulated).lower()},deform_fc_channels=32")
    cfg = apply_overrides(cfg, ["model.roi_heads.score_thresh=0.0"])  # an untrained model's scores are low
    torch.manual_seed(0)
    model = build_detector(cfg)
    pack = model.roi_heads.box_roi_pool.deform.packs[0]
    images, targets = _batch()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert pack.offset_fc[-1].weight.grad.abs().sum() > 0
    if modulated:
        assert pack.mask_fc[-2].weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert pack.offset_fc[-1].weight.abs().sum() > 0  # offsets are no longer zero

    model.eval()
    with torch.no_grad():
        expected = model(images)
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"model": model.state_dict(), "config": cfg, "iteration": 1}, path)
    torch.manual_seed(1)
    fresh = build_detector(cfg).eval()
    assert fresh.roi_heads.box_roi_pool.deform.packs[0].offset_fc[-1].weight.abs().sum() == 0
    assert load_checkpoint(path, model=fresh, cfg=cfg) == 1
    with torch.no_grad():
        got = fresh(images)
    assert len(expected[0]["boxes"]) > 0
    for e, g in zip(expected, got):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(e[key], g[key]), key


def test_train_tool_two_iterations_then_eval(tmp_path, capsys):
    """tools/train.py with configs/shapes_deform_roi_pool_s16.yaml (made tiny): 2 iterations, a checkpoint, the
    final evaluation; tools/eval.py reloads the checkpoint and scores the same AP."""
    data = make_shapes_dataset(tmp_path / "shapes", num_train=4, num_val=2, image_size=96, seed=0, progress=False)
    cfg = {"_base_": str(REPO / "configs" / "shapes_deform_roi_pool_s16.yaml"),
           "model": {"backbone": {"channels": [8, 8, 8, 16]}, "transform": {"min_size": 96, "max_size": 96},
                     "rpn": {"pre_nms_top_n_train": 100, "post_nms_top_n_train": 50, "pre_nms_top_n_test": 50,
                             "post_nms_top_n_test": 30, "batch_size_per_image": 32},
                     "box_head": {"fc_dims": [16]}, "roi_heads": {"batch_size_per_image": 16}},
           "data": {"batch_size": 2, "eval_batch_size": 2,
                    **{k: data[k] for k in ("train_images", "train_annotations", "val_images", "val_annotations")}},
           "solver": {"max_iter": 2, "warmup_iters": 1}, "train": {"checkpoint_period": 2, "log_period": 1}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train, evaluate = load_tool("train"), load_tool("eval")
    run = tmp_path / "run"
    assert train.main(train.get_args_parser().parse_intermixed_args(
        ["--config", str(path), "--output-dir", str(run), "--no-progress"])) == 0
    records = read_jsonl(run / METRICS_NAME)
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    final = [r for r in records if r["type"] == "eval"]
    assert len(final) == 1 and 0.0 <= final[0]["AP"] <= 1.0
    state = torch.load(run / CHECKPOINT_NAME, weights_only=True)["model"]
    assert state["roi_heads.box_roi_pool.deform.packs.0.offset_fc.4.weight"].abs().sum() > 0  # it learned
    capsys.readouterr()

    def run_eval(checkpoint: Path, *flags: str) -> int:
        return evaluate.main(evaluate.get_args_parser().parse_intermixed_args(
            ["--checkpoint", str(checkpoint), "--no-progress", *flags]))

    assert run_eval(run / CHECKPOINT_NAME) == 0
    assert json.loads((run / "eval_metrics.json").read_text())["AP"] == pytest.approx(final[0]["AP"])

    # --pooler all: the learned offsets are the baseline, each rule pools the same features without them
    assert run_eval(run / CHECKPOINT_NAME, "--pooler", "all") == 0
    assert "| baseline (RoIPooler deform_roi_pool) |" in capsys.readouterr().out
    rows = {r["rule"]: r for r in json.loads((run / "eval_all_rules.json").read_text())["rows"]}
    assert list(rows) == [BASELINE, *RULES] and rows[BASELINE]["same_as"] is None
    assert rows[BASELINE]["AP"] == pytest.approx(final[0]["AP"])
    # oracle for a rule's row: the deform pooler with its offset head's last layer zeroed pools as
    # roi_align(aligned=True) at its sampling ratio (test_a_fresh_pooler_is_roi_align_aligned), i.e. as the rule
    # roi_align_aligned (sampling_ratio 2, the config's)
    assert RULES["roi_align_aligned"].settings() == {"op": "roi_align", "aligned": True, "sampling_ratio": 2}
    saved = torch.load(run / CHECKPOINT_NAME, weights_only=False)
    for key in [k for k in saved["model"] if ".offset_fc.4." in k]:
        saved["model"][key].zero_()
    unmoved = tmp_path / "unmoved"
    unmoved.mkdir()
    torch.save(saved, unmoved / CHECKPOINT_NAME)
    assert run_eval(unmoved / CHECKPOINT_NAME) == 0
    scores = json.loads((unmoved / "eval_metrics.json").read_text())
    for metric in METRICS:
        assert rows["roi_align_aligned"][metric] == pytest.approx(scores[metric], abs=1e-6), metric

    def detections(path: Path) -> torch.Tensor:  # [D, 6]: image id, category id, box, score; in the file's order
        found = json.loads(path.read_text())
        return torch.tensor([[d["image_id"], d["category_id"], *d["bbox"], d["score"]] for d in found])

    expected = detections(unmoved / "eval_results.json")
    assert len(expected) > 0
    torch.testing.assert_close(detections(run / f"{rows['roi_align_aligned']['stem']}_results.json"), expected)
    learned = detections(run / "eval_results.json")  # the learned offsets move the bins: other scores
    assert learned.shape != expected.shape or not torch.allclose(learned, expected)
    # one rule alone (--pooler SPEC: the model built with that pooler, the offset heads' tensors passed over)
    assert run_eval(run / CHECKPOINT_NAME, "--pooler", "roi_align:aligned=true") == 0
    torch.testing.assert_close(detections(run / "eval_roi_align-aligned-true_results.json"), expected)


@pytest.mark.parametrize(("op", "options", "why"), [
    ("roi_spp", {"levels": (7,)}, r"roi_spp, which gives each box's pyramid of bins flattened level by level"),
    ("ps_roi_align", {}, r"ps_roi_align, which is position-sensitive: its box head reads C / \(PH \* PW\)"),
    ("ps_roi_pool", {}, r"ps_roi_pool, which is position-sensitive"),
    ("roi_align_rotated", {}, r"roi_align_rotated, which pools rotated boxes \(cx, cy, w, h, angle\)"),
])
def test_the_rule_sweep_refuses_a_pooler_no_rule_stands_in_for(op, options, why, tmp_path):
    """--pooler all takes deform_roi_pool (its bins are C x PH x PW, as the rules'), and refuses, saying why, the
    poolers whose features or boxes no rule gives; before reading any image."""
    model = SimpleNamespace(roi_heads=SimpleNamespace(box_roi_pool=RoIPooler(["0"], 7, 2, op=op, **options)))
    with pytest.raises(ValueError, match=rf"box pooler is {why}.*: no rule can stand in for it; evaluate it with its "
                                         r"own pooler \(leave out --pooler all\)"):
        evaluate_rules(model, None, {1: 1}, CPU, tmp_path)


class RegionPath(torch.nn.Module):
    """backbone -> RoIPooler -> box head -> predictor on given proposals of one image: (class logits, deltas)."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images, boxes):
        heads = self.detector.roi_heads
        pooled = heads.box_roi_pool(self.detector.backbone(images), [boxes], [tuple(images.shape[-2:])])
        return heads.box_predictor(heads.box_head(pooled))


def _region_path():
    """A tiny detector's region path with a modulated deform pooler whose offsets are not zero (so the offset
    heads are in the graph for real), an image and proposals."""
    torch.manual_seed(0)
    detector = build_detector(_tiny_cfg("deform_roi_pool:modulated=true,deform_fc_channels=32")).eval()
    with torch.no_grad():
        detector.roi_heads.box_roi_pool.deform.packs[0].offset_fc[-1].bias.uniform_(-1, 1)
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0.0, 0, 90, 90], [10, 20, 60, 90], [30, 30, 40, 45], [70, 2, 71, 9]])
    return RegionPath(detector), images, boxes


def test_region_path_exports_with_the_deform_pooler():
    """torch.export of the region path gives the eager result."""
    from roikit.export import torch_export

    region, images, boxes = _region_path()
    with torch.no_grad():
        expected = region(images, boxes)
        program = torch_export(region, (images, boxes))
        for got, want in zip(program.module()(images, boxes), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow  # about 8 s of CPU (the ONNX export)
def test_region_path_with_the_deform_pooler_in_onnxruntime():
    """The same exported to ONNX (roikit.export.onnx_export) and run in onnxruntime: the eager result."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from roikit.export import onnx_export

    region, images, boxes = _region_path()
    with torch.no_grad():
        expected = region(images, boxes)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = onnx_export(region, (images, boxes))
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {names[0]: images.numpy(), names[1]: boxes.numpy()})
    for g, want in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), want, rtol=0, atol=1e-5)


def test_fx_traces_the_deform_pooler_as_one_call():
    """torch.fx (torchvision's feature extractors trace detectors) keeps the pooler one node: same output, and the
    traced module's parameters are the offset heads' own (a gradient step on the original changes the traced)."""

    class Pooling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pooler = _pooler()

        def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]):
            return self.pooler(features, boxes, [(IMAGE, IMAGE)] * 2)

    model = Pooling()
    traced = torch.fx.symbolic_trace(model)
    features = _pyramid()
    with torch.no_grad():
        model.pooler.deform.packs[1].offset_fc[-1].bias.fill_(0.7)
    torch.testing.assert_close(traced(features, BOXES), model(features, BOXES), rtol=0, atol=0)
    assert not torch.equal(model(features, BOXES), _expected(features, BOXES, 2))


def test_autocast_pools_in_float32_and_gives_the_features_dtype():
    """Under autocast the ops run in float32 and the offset heads in bfloat16 (their Linear layers): bfloat16
    features come back bfloat16, within bfloat16 rounding of the float32 pooling."""
    torch.manual_seed(0)
    pooler = RoIPooler(["0", "1", "2"], 7, 2, op="deform_roi_pool", channels=3, deform_fc_channels=16,
                       modulated=True)
    with torch.no_grad():
        for pack in pooler.deform.packs:
            pack.offset_fc[-1].bias.uniform_(-1, 1)
    features = _pyramid(dtype=torch.float32)
    boxes = [b.float() for b in BOXES]
    expected = pooler(features, boxes, [(IMAGE, IMAGE)] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pooler({k: v.bfloat16() for k, v in features.items()}, boxes, [(IMAGE, IMAGE)] * 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_box_reading_a_non_finite_cell_pools_nan_and_the_others_are_unaffected(bad):
    """Its offsets are non-finite (0 * nan in the fc), which deform_roi_pool refuses; the pooler gives that box
    NaN instead of failing the batch, and the other boxes torchvision's roi_align(aligned=True)."""
    features = _pyramid()
    features["0"][1, 2, 7, 40] = bad  # image 1, level 2 (stride 4): cell (x, y) = (40, 7), in box 2 of image 1
    pooler = _pooler()
    got = pooler(features, BOXES, [(IMAGE, IMAGE)] * 2)
    expected = _expected(features, BOXES, 2)
    hit = torch.zeros(len(got), dtype=torch.bool)
    hit[len(BOXES[0]) + 2] = True
    assert got[hit].isnan().all()
    torch.testing.assert_close(got[~hit], expected[~hit], rtol=0, atol=1e-12)


def _detections(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return model.eval()(images)


def _assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    assert sum(len(e["boxes"]) for e in expected) > 0
    for g, e in zip(got, expected):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(g[key], e[key], msg=key)


def test_swap_to_the_deform_pooler_reads_the_channels_from_a_roikit_detector():
    """swap_roi_pooler(op="deform_roi_pool") without channels=: the backbone's (small_cnn's last width, 16); the
    fresh offset heads are zero, so the swapped detector detects as with roi_align(aligned=True)."""
    cfg = apply_overrides(_tiny_cfg("roi_align:aligned=true,sampling_ratio=2"), ["model.roi_heads.score_thresh=0.0"])
    torch.manual_seed(0)
    model = build_detector(cfg)
    images, _ = _batch()
    expected = _detections(model, images)
    swap_roi_pooler(model, op="deform_roi_pool", deform_fc_channels=32)
    pooler = model.roi_heads.box_roi_pool
    assert pooler.deform.channels == 16 and pooler.deform.packs[0].offset_fc[0].in_features == 16 * 49
    _assert_same_detections(_detections(model, images), expected)
    swap_roi_pooler(model, op="deform_roi_pool", channels=8)  # an override is taken as given
    assert model.roi_heads.box_roi_pool.deform.channels == 8


def test_swap_to_the_deform_pooler_reads_the_channels_from_a_torchvision_detector():
    """fasterrcnn_mobilenet_v3_large_fpn: FPN maps of 256 channels (backbone.out_channels; without it, the box
    head's fc6 reads 256 x 7 x 7); a model that tells them nowhere is refused, naming channels=."""
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4,
                                                        min_size=160, max_size=160, box_score_thresh=0.0)
    images = [torch.rand(3, 160, 128, generator=torch.Generator().manual_seed(3))]
    swap_roi_pooler(model, op="roi_align", aligned=True)  # the deform pooler's zero-offset twin
    expected = _detections(model, images)
    del model.backbone.out_channels
    swap_roi_pooler(model, op="deform_roi_pool", deform_fc_channels=16)
    assert model.roi_heads.box_roi_pool.deform.channels == 256  # from fc6: 12544 = 256 x 49
    _assert_same_detections(_detections(model, images), expected)
    model.backbone.out_channels = 256
    swap_roi_pooler(model, op="deform_roi_pool", deform_fc_channels=16)
    assert model.roi_heads.box_roi_pool.deform.channels == 256
    del model.backbone.out_channels
    model.roi_heads.box_head = torch.nn.Identity()  # now only the old (deform) pooler tells the channels
    swap_roi_pooler(model, op="deform_roi_pool", gamma=0.2)
    assert model.roi_heads.box_roi_pool.deform.channels == 256 and model.roi_heads.box_roi_pool.deform.gamma == 0.2
    swap_roi_pooler(model, op="roi_align")
    with pytest.raises(ValueError, match=r"swap_roi_pooler: op='deform_roi_pool' needs the feature maps' channels "
                                         r"for its offset heads, and FasterRCNN tells them nowhere .*: give channels=C"):
        swap_roi_pooler(model, op="deform_roi_pool")


def test_swap_in_a_detector_whose_backbone_gives_one_map():
    """torchvision's FasterRCNN on a backbone returning one Tensor (GeneralizedRCNN names it "0"; the pooler names
    "0" only): swap_roi_pooler reads which maps the backbone gives, and the swapped model detects as
    roi_align(aligned=True) does, deform pooling with zero offsets."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
    backbone.out_channels = 8
    model = detection.FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96, box_score_thresh=0.0,
                                 rpn_anchor_generator=detection.anchor_utils.AnchorGenerator(((16, 32),), ((1.0,),)),
                                 box_roi_pool=torchvision.ops.MultiScaleRoIAlign(["0"], 7, 2))
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(4))]
    swap_roi_pooler(model, op="roi_align", aligned=True)
    assert model.roi_heads.box_roi_pool.featmap_names == ["0"]
    expected = _detections(model, images)
    swap_roi_pooler(model, op="deform_roi_pool", deform_fc_channels=16)
    assert model.roi_heads.box_roi_pool.deform.channels == 8
    _assert_same_detections(_detections(model, images), expected)
