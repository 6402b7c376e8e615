"""Training and evaluation on COCO-format data: the real coco-mini slice of COCO 2017 (read from ../shared, skipped
when absent) and tiny COCO-format sets written here (a grayscale JPEG, an image without boxes, a crowd box, category
ids with gaps), and the one-line errors of tools/train.py for bad data."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from _helpers import load_tool, run_tool
from pycocotools.cocoeval import COCOeval

from roikit.data import CocoDetection
from roikit.engine import coco_evaluate

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
needs_coco_mini = pytest.mark.skipif(not (COCO_MINI / "annotations" / "instances_val2017.json").is_file(),
                                     reason=f"coco-mini is not at {COCO_MINI} (see its README; it is not copied "
                                            f"into the project)")


train_tool = load_tool("train")
eval_tool = load_tool("eval")


@pytest.fixture
def cocoeval_image_ids(monkeypatch) -> list[list[int]]:
    """The image ids of every COCOeval.evaluate call, as COCOeval itself holds them."""
    calls: list[list[int]] = []
    evaluate = COCOeval.evaluate

    def recording(self):
        calls.append(list(self.params.imgIds))
        return evaluate(self)

    monkeypatch.setattr(COCOeval, "evaluate", recording)
    return calls


# ------------------------------------------------------------------------------------------------- coco-mini itself
# COCO's own category list (cocodataset.org, instances_*2017.json): id 12 is one of the gaps, 13 is "stop sign", 90 is
# "toothbrush", the last of the 80 categories.
@needs_coco_mini
def test_coco_mini_labels_are_the_files_sorted_ids_and_crowd_boxes_are_left_to_cocoeval():
    ds = CocoDetection(COCO_MINI / "val2017", COCO_MINI / "annotations" / "instances_val2017.json")
    assert ds.num_classes == 80 and ds.label_to_cat_id[1] == 1 and ds.class_names[0] == "person"
    assert ds.label_to_cat_id[12] == 13 and ds.class_names[11] == "stop sign"
    assert ds.label_to_cat_id[80] == 90 and ds.class_names[79] == "toothbrush"
    data = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowd  # the README: 5 crowd boxes in val2017
    image_id = crowd[0]["image_id"]
    mine = [a for a in data["annotations"] if a["image_id"] == image_id]
    _, target = ds[ds.ids.index(image_id)]
    assert len(target["boxes"]) == sum(not a["iscrowd"] for a in mine) < len(mine)
    assert {a["id"] for a in ds.coco.imgToAnns[image_id]} == {a["id"] for a in mine}  # kept for COCOeval


def _subset(src: Path, dst: Path, count: int) -> tuple[Path, list[int]]:
    """The first ``count`` images of a COCO file with their annotations (all categories kept)."""
    data = json.loads(src.read_text())
    data["images"] = data["images"][:count]
    ids = {img["id"] for img in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    dst.write_text(json.dumps(data))
    return dst, sorted(ids)


QUICK = ["model.transform.min_size=128", "model.transform.max_size=192", "solver.max_iter=2", "data.batch_size=2",
         "solver.warmup_iters=1", "model.roi_heads.score_thresh=0.0", "model.rpn.post_nms_top_n_test=50",
         "--no-progress", "--threads", "2"]


@needs_coco_mini
def test_coco_mini_trains_and_evaluates(tmp_path, capsys, cocoeval_image_ids):
    """configs/coco_mini.yaml, two iterations at 128 px on 6 val images: COCOeval runs on exactly those image ids,
    the results carry the file's own category ids (1-90 with gaps), and tools/eval.py scores the checkpoint."""
    val, val_ids = _subset(COCO_MINI / "annotations" / "instances_val2017.json", tmp_path / "val6.json", 6)
    run = tmp_path / "run"
    overrides = [f"data.val_annotations={val}"] + QUICK  # score_thresh 0: detections, so that COCOeval runs
    assert run_tool(train_tool, ["--config", str(REPO / "configs" / "coco_mini.yaml"), "--output-dir", str(run)]
                    + overrides) == 0
    out = capsys.readouterr().out
    assert "80 images" in out and f"saved checkpoint {run / 'checkpoint.pth'}" in out
    assert cocoeval_image_ids == [val_ids]
    file_ids = {c["id"] for c in json.loads(val.read_text())["categories"]}
    assert len(file_ids) == 80 and max(file_ids) == 90
    results = json.loads((run / "eval_final_results.json").read_text())
    metrics = json.loads((run / "eval_final_metrics.json").read_text())
    assert len(results) == metrics["num_detections"] > 0 and metrics["images"] == 6
    used = {r["category_id"] for r in results}
    assert used <= file_ids and max(used) > 80  # label 80 would be id 80 if the labels were written as they are
    assert {r["image_id"] for r in results} <= set(val_ids)

    cocoeval_image_ids.clear()
    assert run_tool(eval_tool, ["--checkpoint", str(run / "checkpoint.pth"), "--config",
                                str(REPO / "configs" / "coco_mini.yaml")] + overrides) == 0
    assert cocoeval_image_ids == [val_ids]
    scored = json.loads((run / "eval_metrics.json").read_text())
    assert scored["AP"] == pytest.approx(metrics["AP"])
    assert {r["category_id"] for r in json.loads((run / "eval_results.json").read_text())} <= file_ids


# ------------------------------------------------------------------------------------------- a tiny COCO-format set
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


def _tiny_coco(root: Path, edit=None) -> Path:
    """Three images: a grayscale JPEG of an odd size with two boxes, one without boxes, one with a crowd box; the
    categories 1, 5 and 90 (labels 1, 2, 3). ``edit(data)`` changes the JSON before it is written."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "gray.jpg"), rng.integers(0, 256, (57, 83), dtype=np.uint8))
    cv2.imwrite(str(images / "empty.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "crowd.jpg"), rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    data = {
        "images": [{"id": 3, "file_name": "gray.jpg", "width": 83, "height": 57},
                   {"id": 7, "file_name": "empty.png", "width": 64, "height": 64},
                   {"id": 9, "file_name": "crowd.jpg", "width": 90, "height": 70}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 90, "bbox": [5, 6, 30, 20], "area": 600.0, "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 5, "bbox": [40, 10, 35, 40], "area": 1400.0, "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900.0, "iscrowd": 0},
            {"id": 4, "image_id": 9, "category_id": 1, "bbox": [45, 5, 40, 60], "area": 2400.0, "iscrowd": 1},
        ],
        "categories": copy.deepcopy(CATEGORIES),
    }
    if edit is not None:
        edit(data)
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


TINY = {
    "model": {
        "backbone": {"channels": [8, 8, 16, 16]},
        "transform": {"min_size": 96, "max_size": 128},
        "rpn": {"pre_nms_top_n_train": 100, "post_nms_top_n_train": 50, "pre_nms_top_n_test": 50,
                "post_nms_top_n_test": 30, "batch_size_per_image": 32},
        "box_head": {"fc_dims": [16, 16]},
        "roi_heads": {"batch_size_per_image": 16, "score_thresh": 0.0},
    },
    "data": {"batch_size": 3, "eval_batch_size": 3, "hflip": 0.0},
    "solver": {"max_iter": 2, "warmup_iters": 1},
    "train": {"checkpoint_period": 0},
}


def _tiny_config(root: Path, annotations: Path) -> Path:
    cfg = copy.deepcopy(TINY)
    cfg["_base_"] = str(REPO / "configs" / "base_shapes.yaml")
    for split in ("train", "val"):
        cfg["data"][f"{split}_images"], cfg["data"][f"{split}_annotations"] = str(root / "images"), str(annotations)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_tiny_set_with_a_grayscale_jpeg_an_empty_image_a_crowd_box_and_gap_ids(tmp_path, cocoeval_image_ids):
    config = _tiny_config(tmp_path, _tiny_coco(tmp_path))
    run = tmp_path / "run"
    assert run_tool(train_tool, ["--config", str(config), "--output-dir", str(run), "--no-progress"]) == 0
    assert cocoeval_image_ids == [[3, 7, 9]]  # the image without boxes too
    results = json.loads((run / "eval_final_results.json").read_text())
    assert {r["image_id"] for r in results} == {3, 7, 9}
    assert {r["category_id"] for r in results} == {1, 5, 90}  # not the labels 1, 2, 3

    ds = CocoDetection(tmp_path / "images", tmp_path / "instances.json")
    image, target = ds[0]
    assert image.shape == (3, 57, 83) and target["labels"].tolist() == [3, 2]  # ids 90 and 5
    assert ds[1][1]["boxes"].shape == (0, 4)
    assert ds[2][1]["boxes"].tolist() == [[10, 10, 40, 40]]  # the crowd box is no training target


def test_a_set_without_any_box_trains_and_evaluates(tmp_path, cocoeval_image_ids):
    """Batches of images without boxes train (the losses have no box terms to learn from, but run), and COCOeval
    with no ground truth at all answers -1 (no AP defined), which is written as such."""
    config = _tiny_config(tmp_path, _tiny_coco(tmp_path, lambda d: d.update(annotations=[])))
    run = tmp_path / "run"
    assert run_tool(train_tool, ["--config", str(config), "--output-dir", str(run), "--no-progress",
                                 "solver.max_iter=1"]) == 0
    assert cocoeval_image_ids == [[3, 7, 9]]
    metrics = json.loads((run / "eval_final_metrics.json").read_text())
    assert metrics["AP"] == -1.0 and metrics["num_detections"] > 0


def test_cocoeval_ignores_a_detection_on_a_crowd_box(tmp_path):
    """The crowd box reaches COCOeval through the data set's ``coco``: the ground truth given as detections plus a
    top-scoring detection on the crowd region is still AP 1 (COCOeval ignores a detection matched to a crowd
    box); with the crowd annotation removed the same detection is a false positive ranked first, so AP < 1."""
    ds = CocoDetection(tmp_path / "images", _tiny_coco(tmp_path))
    data = ds.coco.dataset
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in data["annotations"] if not a["iscrowd"]]
    results.append({"image_id": 9, "category_id": 1, "bbox": [45, 5, 40, 60], "score": 1.0})
    assert coco_evaluate(ds.coco, results)["AP"] == pytest.approx(1.0)
    _tiny_coco(tmp_path, lambda d: d["annotations"].pop())
    no_crowd = CocoDetection(tmp_path / "images", tmp_path / "instances.json")
    assert coco_evaluate(no_crowd.coco, results)["AP"] < 0.99


# ---------------------------------------------------------------------------------------- bad data: one-line errors
def _set_ann(index: int, key: str, value):
    def edit(data):
        data["annotations"][index][key] = value
    return edit


def _truncate(root: Path) -> None:
    path = root / "images" / "crowd.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what an interrupted download leaves


def _remove(root: Path) -> None:
    (root / "images" / "crowd.jpg").unlink()


def _thin(data) -> None:
    data["images"][1].update(width=300, height=1)  # 300:1, the transform (max_size 128) would make it 0.4 px tall


@pytest.mark.parametrize("edit, after, message", [
    (_set_ann(2, "image_id", 8), None, r"annotation id 3 refers to unknown image id 8 \(not in 'images'\)"),
    (_set_ann(1, "bbox", [40, 10, -35, 40]), None,
     r"annotation id 2 \(image id 3\) has a bbox of negative size \[40, 10, -35, 40\] \(w and h must be >= 0\)"),
    (_set_ann(1, "bbox", [40, 10, float("nan"), 40]), None,
     r"annotation id 2 \(image id 3\) needs 'bbox' as 4 finite numbers \[x, y, w, h\], got \[40, 10, nan, 40\]"),
    (_set_ann(0, "category_id", 12), None,
     r"annotation id 1 \(image id 3\) has unknown category id 12 \(not in 'categories'\)"),
    (None, _remove, r"image file of image id 9 not found: {images}/crowd\.jpg"),
    (None, _truncate, r"the image file of image id 9 is damaged \(image file is truncated.*\): {images}/crowd\.jpg"),
    (_thin, None, r"image id 7 \({images}/empty\.png\): an image of 300x1 px cannot be resized by model\.transform"),
])
def test_bad_training_data_is_one_line_naming_the_file_and_the_record(tmp_path, capsys, edit, after, message):
    annotations = _tiny_coco(tmp_path, edit)
    if edit is _thin:
        cv2.imwrite(str(tmp_path / "images" / "empty.png"), np.zeros((1, 300, 3), np.uint8))
    if after is not None:
        after(tmp_path)
    config = _tiny_config(tmp_path, annotations)
    code = run_tool(train_tool, ["--config", str(config), "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    expected = rf"train\.py: error: {re.escape(str(annotations))}: " + message.format(images=re.escape(
        str(tmp_path / "images")))
    assert re.match(expected, err.strip()), err


# ------------------------------------------------------------------------------------------------------ the tool
def test_resume_names_the_keys_where_the_config_differs_from_the_saved_one(tmp_path, capsys):
    config = _tiny_config(tmp_path, _tiny_coco(tmp_path))
    run = tmp_path / "run"
    assert run_tool(train_tool, ["--config", str(config), "--output-dir", str(run), "--no-progress",
                                 "solver.lr=0.004", "data.batch_size=2", "train.checkpoint_period=1"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "saved checkpoint" in line] == [
        f"iter 1: saved checkpoint {run / 'checkpoint.pth'}", f"iter 2: saved checkpoint {run / 'checkpoint.pth'}"]

    # the file says lr 0.003 (base_shapes.yaml), batch 3 and no periodic checkpoint; max_iter is overridden on both
    assert run_tool(train_tool, ["--config", str(config), "--output-dir", str(run), "--resume", "--no-progress",
                                 "solver.max_iter=3"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("--resume:"))
    assert line == (f"--resume: the run's saved config is used; --config {config} differs from it in 3 key(s) (give "
                    f"key=value to change one): data.batch_size: saved 2, tiny.yaml 3; solver.lr: saved 0.004, "
                    f"tiny.yaml 0.003; train.checkpoint_period: saved 1, tiny.yaml 0")
    assert "training 1 iterations (2 -> 3)" in out
    saved = json.loads((run / "eval_final_metrics.json").read_text())
    assert saved["iteration"] == 3

    # without --config (or with the same settings) nothing is listed
    assert run_tool(train_tool, ["--output-dir", str(run), "--resume", "--no-progress", "solver.max_iter=4"]) == 0
    assert "--resume:" not in capsys.readouterr().out


def test_a_config_value_of_the_wrong_type_is_named_with_its_article(tmp_path, capsys):
    config = _tiny_config(tmp_path, _tiny_coco(tmp_path))
    assert run_tool(train_tool, ["--config", str(config), "--output-dir", str(tmp_path / "run"), "--no-progress",
                                 "data.batch_size=two"]) == 2
    assert capsys.readouterr().err == ("train.py: error: override 'data.batch_size=two': data.batch_size must be an "
                                       "int (like the default 8), got 'two'\n")


def test_periodic_evaluations_keep_their_own_files(tmp_path):
    config = _tiny_config(tmp_path, _tiny_coco(tmp_path))
    run = tmp_path / "run"
    assert run_tool(train_tool, ["--config", str(config), "--output-dir", str(run), "--no-progress",
                                 "train.eval_period=1", "solver.max_iter=2"]) == 0
    names = sorted(p.name for p in run.glob("eval_*.json"))
    assert names == ["eval_final_metrics.json", "eval_final_results.json", "eval_iter1_metrics.json",
                     "eval_iter1_results.json"]
    assert json.loads((run / "eval_iter1_metrics.json").read_text())["iteration"] == 1
