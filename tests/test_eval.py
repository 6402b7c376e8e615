"""tools/eval.py on coco-mini: torchvision detectors from a weights file under every pooling rule, a roikit run's
checkpoint with the config saved in it, and the category ids of the results (COCOeval on perfect detections).

The torchvision models here are randomly initialised (no weights can be downloaded): their scores mean nothing,
the path they take is the one the official weights take.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import load_tool
from torch import nn
from torchvision.models import detection

from roikit.analysis.rules import RULES
from roikit.data.coco import CocoDetection
from roikit.engine.config import load_config
from roikit.engine.rule_sweep import (
    BASELINE,
    evaluate_detections,
    format_rule_table,
    pooler_slug,
    rule_spec,
    swapped_pooler,
)
from roikit.modeling import build_detector
from roikit.modeling.torchvision_models import (
    COCO_CATEGORY_NAMES,
    label_to_category_id,
    load_torchvision_detector,
)
from roikit.utils.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"
VAL_IMAGES = COCO_MINI / "val2017"
CPU = DistInfo(0, 1, 0, torch.device("cpu"))

pytestmark = pytest.mark.skipif(not VAL_JSON.is_file(), reason=f"coco-mini is not at {COCO_MINI} (see issue 12)")


eval_tool = load_tool("eval")


def run_eval(argv: list[str]) -> int:
    return eval_tool.main(eval_tool.get_args_parser().parse_intermixed_args([*argv, "--no-progress", "--threads", "2"]))


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory) -> Path:
    """A random fasterrcnn_mobilenet_v3_large_fpn (91 classes, COCO's) as a state_dict file. Its classifier is
    scaled up, so that it gives detections above torchvision's score threshold (0.05): the results file is then
    not empty."""
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(300)
    path = tmp_path_factory.mktemp("weights") / "mobilenet.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def val_set() -> CocoDetection:
    return CocoDetection(VAL_IMAGES, VAL_JSON)


# --------------------------------------------------------------------------------------------- torchvision, all rules
def test_pooler_all_on_a_torchvision_model(mobilenet_weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_eval(["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--weights", str(mobilenet_weights),
                     "--annotations", str(VAL_JSON), "--images", str(VAL_IMAGES), "--pooler", "all",
                     "--max-images", "3", "--min-size", "160", "--batch-size", "1", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:].split(" (")[0] for line in table[1:]] == [BASELINE, *RULES]  # every rule, once
    assert "| baseline (MultiScaleRoIAlign) |" in printed
    assert "The baseline pools as roi_align_unaligned" in printed

    scores = json.loads((out / "eval_all_rules.json").read_text())
    rows = {r["rule"]: r for r in scores["rows"]}
    assert scores["images"] == 3 and rows[BASELINE]["same_as"] == "roi_align_unaligned"
    metrics = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    assert [rows[BASELINE][m] for m in metrics] == [rows["roi_align_unaligned"][m] for m in metrics]
    assert (out / "eval_all_rules.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each rule wrote its files under the name of its --pooler spec; the results carry the file's category ids
    file_ids = {c["id"] for c in json.loads(VAL_JSON.read_text())["categories"]}
    first_three = sorted(CocoDetection(VAL_IMAGES, VAL_JSON).ids)[:3]
    for rule in [None, *RULES.values()]:
        stem = "eval" if rule is None else f"eval_{pooler_slug(rule_spec(rule))}"
        assert "=" not in stem and ":" not in stem
        results = json.loads((out / f"{stem}_results.json").read_text())
        metrics_file = json.loads((out / f"{stem}_metrics.json").read_text())
        assert results and {r["category_id"] for r in results} <= file_ids
        assert {r["image_id"] for r in results} <= set(first_three)
        assert metrics_file["images"] == 3 and metrics_file["weights"] == str(mobilenet_weights)
        if rule is not None:
            assert metrics_file["pooler"]["op"] == rule.op

    # the sweep runs the backbone and RPN once for all rules: a rule's detections are those of its own evaluation
    # (in the same batches: torchvision pads a batch's images to one size, which changes the features at the edges)
    assert run_eval(["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--weights", str(mobilenet_weights),
                     "--annotations", str(VAL_JSON), "--images", str(VAL_IMAGES), "--pooler", "roi_pool:rounding=integer",
                     "--max-images", "1", "--min-size", "160", "--batch-size", "1", "--output-dir", str(out),
                     "--name", "alone"]) == 0
    alone = json.loads((out / "alone_results.json").read_text())
    swept = json.loads((out / "eval_roi_pool-rounding-integer_results.json").read_text())
    assert alone and alone == [r for r in swept if r["image_id"] == first_three[0]]
    saved = json.loads((out / "alone_metrics.json").read_text())
    assert saved["pooler"] == {"op": "roi_pool", "output_size": 7, "sampling_ratio": 2,
                               "options": {"rounding": "integer"}}
    assert saved["images"] == 1


def test_the_baseline_pools_as_roi_align_unaligned(mobilenet_weights, val_set):
    """torchvision's MultiScaleRoIAlign (the oracle) and the swapped-in roi_align, aligned=False, give the box head
    the same features for the same proposals."""
    model, _ = load_torchvision_detector("fasterrcnn_mobilenet_v3_large_fpn", mobilenet_weights, min_size=160)
    seen = []
    model.roi_heads.box_head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    images = [val_set[0][0]]
    with torch.no_grad():
        model(images)
        with swapped_pooler(model, "roi_align", aligned=False) as pooler:
            assert type(pooler).__name__ == "RoIPooler"
            model(images)
    assert type(model.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIAlign"  # put back
    torchvision_features, roikit_features = seen
    assert torchvision_features.shape == roikit_features.shape and torchvision_features.abs().max() > 0
    torch.testing.assert_close(roikit_features, torchvision_features, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- category ids: COCOeval's oracle
class _GroundTruthModel(nn.Module):
    """Answers each image (in the data set's order) with its ground-truth boxes, labelled by ``label_of`` (a
    category id -> the model's label), score 1, plus one box of ``extra_label`` that no category of the file has."""

    def __init__(self, dataset: CocoDetection, label_of: dict[int, int], extra_label: int | None = None) -> None:
        super().__init__()
        self.answers = []
        for image_id in dataset.ids:
            anns = [a for a in dataset.coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]
            boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            labels = [label_of[a["category_id"]] for a in anns]
            if extra_label is not None:
                boxes, labels = torch.cat([boxes, torch.tensor([[0.0, 0.0, 10.0, 10.0]])]), labels + [extra_label]
            info = dataset.coco.imgs[image_id]
            self.answers.append(((info["height"], info["width"]), {
                "boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.ones(len(labels))}))
        self.next = 0

    def forward(self, images):
        out = []
        for image in images:
            size, answer = self.answers[self.next]
            assert tuple(image.shape[1:]) == size  # the images come in the data set's order
            self.next += 1
            out.append(answer)
        return out


def test_torchvision_labels_are_the_category_ids(val_set, tmp_path):
    """Perfect detections labelled with COCO's category ids (as torchvision's COCO models label them) score AP 1.0
    through the torchvision mapping; a detection of an "N/A" label (12) is dropped from the results file."""
    labels = label_to_category_id(COCO_CATEGORY_NAMES, list(val_set.coco.cats.values()), "coco-mini")
    assert labels == {c: c for c in val_set.coco.cats}  # the identity on the file's 80 ids
    assert COCO_CATEGORY_NAMES[12] == "N/A" and 12 not in labels
    results = tmp_path / "results.json"
    model = _GroundTruthModel(val_set, {c: c for c in val_set.coco.cats}, extra_label=12)
    metrics = evaluate_detections(model, val_set, labels, CPU, max_images=8, results_file=results, batch_size=3)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    found = json.loads(results.read_text())
    assert {r["category_id"] for r in found} <= set(val_set.coco.cats) and len({r["image_id"] for r in found}) <= 8
    assert len(found) == sum(len([a for a in val_set.coco.imgToAnns.get(i, []) if not a["iscrowd"]])
                             for i in val_set.ids[:8])


def test_roikit_labels_are_mapped_to_the_category_ids(val_set):
    """A roikit detector's labels 1..80 are the file's sorted category ids renumbered: perfect detections so
    labelled score AP 1.0 through the data set's map, and far less when taken for category ids (the test can
    fail)."""
    model = _GroundTruthModel(val_set, val_set.cat_id_to_label)
    assert evaluate_detections(model, val_set, val_set.label_to_cat_id, CPU, max_images=8)["AP"] == pytest.approx(1.0)
    wrong = {c: c for c in val_set.coco.cats}
    assert evaluate_detections(_GroundTruthModel(val_set, val_set.cat_id_to_label), val_set, wrong, CPU,
                               max_images=8)["AP"] < 0.5


def test_a_file_with_other_category_ids_is_refused():
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "dog"}]
    with pytest.raises(ValueError, match=r"^f.json: category id 3 is 'dog', but COCO's \(the model's\) id 3 is 'car'"):
        label_to_category_id(COCO_CATEGORY_NAMES, cats, "f.json")
    with pytest.raises(ValueError, match=r"none of its category ids \(\[100, 200\]\) is a label of the model"):
        label_to_category_id(COCO_CATEGORY_NAMES, [{"id": 100, "name": "a"}, {"id": 200, "name": "b"}], "f.json")


# ------------------------------------------------------------------------------------------------ a roikit checkpoint
@pytest.fixture(scope="module")
def roikit_run(tmp_path_factory) -> Path:
    """A run folder with an untrained small roikit detector for coco-mini's 80 categories: checkpoint.pth (with its
    config, as tools/train.py saves it) and config.yaml."""
    cfg = load_config(REPO / "configs" / "base_shapes.yaml", [
        "model.num_classes=80", "model.backbone.channels=[8,16,16,32]", "model.box_head.fc_dims=[32,32]",
        "model.transform.min_size=96", "model.transform.max_size=128", "train.device=cpu",
        f"data.val_annotations={VAL_JSON}", f"data.val_images={VAL_IMAGES}"])
    torch.manual_seed(0)
    model = build_detector(cfg)
    run = tmp_path_factory.mktemp("run")
    torch.save({"model": model.state_dict(), "iteration": 7, "config": cfg}, run / "checkpoint.pth")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_pooler_all_on_a_roikit_checkpoint_with_its_own_config(roikit_run, capsys):
    ckpt = roikit_run / "checkpoint.pth"
    assert run_eval(["--checkpoint", str(ckpt), "--annotations", str(VAL_JSON), "--images", str(VAL_IMAGES),
                     "--pooler", "all", "--max-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| baseline (RoIPooler roi_align) |" in printed and "The baseline pools as roi_align_aligned" in printed
    scores = json.loads((roikit_run / "eval_all_rules.json").read_text())
    assert scores["iteration"] == 7 and [r["rule"] for r in scores["rows"]] == [BASELINE, *RULES]
    assert format_rule_table(scores["rows"]).count("\n| ") == 1 + len(RULES)
    saved = json.loads((roikit_run / "eval_metrics.json").read_text())
    assert saved["pooler"] == {"op": "roi_align", "output_size": 7, "sampling_ratio": 2, "options": {"aligned": True}}


def test_a_config_that_does_not_fit_points_at_the_runs_config(roikit_run, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"_base_": str(REPO / "configs" / "base_shapes.yaml"),
                                     "model": {"num_classes": 80}}))
    ckpt = roikit_run / "checkpoint.pth"
    assert run_eval(["--checkpoint", str(ckpt), "--config", str(other), "--annotations", str(VAL_JSON),
                     "--images", str(VAL_IMAGES), "--max-images", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"eval.py: error: checkpoint {ckpt} does not match the model")
    assert err.endswith(f"(the config is {other}; the run's own config is {roikit_run / 'config.yaml'})")


# ------------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_a_one_line_error(mobilenet_weights, tmp_path, capsys):
    data = ["--annotations", str(VAL_JSON), "--images", str(VAL_IMAGES), "--output-dir", str(tmp_path)]
    cases = [
        (["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", *data],
         "--model torchvision:fasterrcnn_mobilenet_v3_large_fpn needs --weights FILE"),
        (["--model", "torchvision:fasterrcnn_resnet50_fpn", "--weights", str(mobilenet_weights), *data],
         f"weights file {mobilenet_weights} is not a fasterrcnn_resnet50_fpn state_dict"),
        (["--model", "torchvision:yolo", "--weights", str(mobilenet_weights), *data],
         "--model must be torchvision:NAME with NAME one of fasterrcnn_resnet50_fpn, "),
        (["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--weights", str(tmp_path / "none.pth"), *data],
         f"weights file not found: {tmp_path / 'none.pth'}"),
        (["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--weights", str(mobilenet_weights)],
         "--model torchvision:fasterrcnn_mobilenet_v3_large_fpn needs --annotations FILE and --images DIR"),
        (["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--weights", str(mobilenet_weights),
          "--pooler", "roi_pool:rounding=floor", "--min-size", "64", "--max-images", "1", *data],
         "rounding must be one of"),
        (["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--weights", str(mobilenet_weights),
          "--pooler", "roi_align:output_size=14", "--min-size", "64", "--max-images", "1", *data],
         "--pooler 'roi_align:output_size=14': the box head takes output_size=7x7, got 14"),
        ([*data], "give --checkpoint FILE (a roikit run) or --model torchvision:NAME --weights FILE"),
        (["--weights", str(mobilenet_weights), "--checkpoint", str(mobilenet_weights), *data],
         "--weights goes with --model torchvision:NAME"),
        (["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--annotations", str(VAL_JSON)],
         "--annotations and --images go together"),
    ]
    for argv, message in cases:
        assert run_eval(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"eval.py: error: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_mask_rcnn_weights_load_as_its_box_detector(tmp_path, val_set):
    """torchvision's Mask R-CNN (the oracle) and its weights loaded as a box detector find the same boxes."""
    torch.manual_seed(0)
    mask_rcnn = detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=128,
                                                max_size=160, box_score_thresh=0.0).eval()
    path = tmp_path / "maskrcnn.pth"
    torch.save(mask_rcnn.state_dict(), path)
    boxes_only, names = load_torchvision_detector("maskrcnn_resnet50_fpn", path, min_size=128, max_size=160,
                                                  box_score_thresh=0.0)
    assert names == COCO_CATEGORY_NAMES and boxes_only.roi_heads.mask_head is None
    image = [val_set[0][0]]
    with torch.no_grad():
        expected, got = mask_rcnn(image)[0], boxes_only(image)[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        torch.testing.assert_close(got[key], expected[key])


def test_the_loaded_model_holds_the_files_tensors(mobilenet_weights):
    """Every tensor of the file, BatchNorm's running statistics included, is in the model as it was saved (finding
    the pooler's feature maps runs the backbone once: in eval mode, so it changes nothing)."""
    model, _ = load_torchvision_detector("fasterrcnn_mobilenet_v3_large_fpn", mobilenet_weights)
    saved = torch.load(mobilenet_weights, weights_only=True)
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys() and not model.training
    assert [k for k in saved if not torch.equal(loaded[k], saved[k])] == []
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1"]  # the maps its backbone gives


def _as_before_torchvision_0_13(state: dict) -> dict:
    """A state_dict as torchvision's own files have it (written before torchvision 0.13 by models with
    FrozenBatchNorm2d): FPN's and the RPN head's convolutions under their old names, no num_batches_tracked."""
    old = {}
    for key, value in state.items():
        if key.endswith(".num_batches_tracked"):
            continue
        key = re.sub(r"(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
        old[key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")] = value
    return old


def test_weights_files_as_torchvision_writes_them_load(mobilenet_weights, tmp_path, val_set):
    """A file with the old key names and no BatchNorm counters (what the official files hold) loads, and the model
    finds exactly what the model of the full file finds."""
    state = torch.load(mobilenet_weights, weights_only=True)
    old = _as_before_torchvision_0_13(state)
    assert "backbone.fpn.inner_blocks.0.weight" in old and "rpn.head.conv.weight" in old and len(old) < len(state)
    torch.save(old, tmp_path / "old.pth")
    images = [val_set[0][0]]
    with torch.no_grad():
        expected = load_torchvision_detector("fasterrcnn_mobilenet_v3_large_fpn", mobilenet_weights,
                                             min_size=160)[0](images)[0]
        got = load_torchvision_detector("fasterrcnn_mobilenet_v3_large_fpn", tmp_path / "old.pth",
                                        min_size=160)[0](images)[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
