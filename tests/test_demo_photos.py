"""demo/demo.py on a real photograph of coco-mini (skipped where it is absent): a COCO file's boxes drawn and
explained, its errors, and a torchvision detector with a weights file."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from _demo_helpers import ROOT, load_demo, make_demo_files, ring

from roikit.analysis.drawing import box_pixels, class_colour
from roikit.analysis.pooling_view import blank_explain

demo, _ = load_demo()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny detector's checkpoint and a generated video (test_annotations_errors refuses them)."""
    return make_demo_files(tmp_path_factory.mktemp("demo"))


# ------------------------------------------------------------------------------------------------ real photographs
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"
PHOTO = "000000022892.jpg"  # val2017: a cat and a dog, and what surrounds them


def _coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"coco-mini is not here ({COCO_MINI}): the real-photograph tests need it")
    return COCO_MINI


def _check_drawn_jpeg(drawn_file: Path, photo_file: Path, boxes, labels, at_least: float, inside: bool = True) -> None:
    """Each box outlined in its class colour where it is (JPEG: colours come back only near), not in the photo;
    ``inside``: and not 5 px inside it (where no other box of its colour lies)."""
    drawn, photo = cv2.imread(str(drawn_file)), cv2.imread(str(photo_file))
    for box, label in zip(boxes, labels):
        px, colour = box_pixels(box, drawn.shape), np.asarray(class_colour(label))

        def near(pixels):
            return float((np.abs(pixels.astype(int) - colour).max(axis=1) <= 48).mean())

        assert near(ring(drawn, px)) >= at_least and near(ring(photo, px)) < 0.05, (box, label)
        assert not inside or near(ring(drawn, px, -5)) < 0.1, (box, label)


def _main(*args) -> int:
    return demo.main(demo.get_args_parser().parse_intermixed_args([str(a) for a in args]))


def test_annotations_are_the_boxes_drawn_and_explained(capsys, tmp_path):
    coco = _coco_mini()
    ann_file, image = coco / "annotations" / "instances_val2017.json", coco / "val2017" / PHOTO
    assert _main("--input", image, "--annotations", ann_file, "--explain-pooling", "--detection", 1,
                 "--output-dir", tmp_path, "--save-detections") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model: none: the boxes of ")
    data = json.loads(ann_file.read_text())
    info = next(i for i in data["images"] if i["file_name"] == PHOTO)
    anns = [a for a in data["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
    names = {c["id"]: c["name"] for c in data["categories"]}
    record = json.loads((tmp_path / f"{Path(PHOTO).stem}.json").read_text())
    assert record["size"] == [info["width"], info["height"]] and "scores" not in record
    assert sorted(record["annotation_ids"]) == sorted(a["id"] for a in anns) and len(anns) >= 2
    by_id = {a["id"]: a for a in anns}
    for box, label, name, ann_id in zip(record["boxes"], record["labels"], record["names"], record["annotation_ids"]):
        x, y, w, h = by_id[ann_id]["bbox"]
        assert box == pytest.approx([x, y, x + w, y + h], abs=0.006)  # written to 2 decimals
        assert label == by_id[ann_id]["category_id"] and name == names[label]
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in record["boxes"]]
    assert areas == sorted(areas, reverse=True)  # largest first
    explained = by_id[record["annotation_ids"][1]]
    assert record["explain"]["annotation_id"] == explained["id"]
    x, y, w, h = explained["bbox"]
    assert record["explain"]["box_net_px"] == pytest.approx([x, y, x + w, y + h], abs=0.006)  # the image's pixels
    level = math.floor(4 + math.log2(math.sqrt(w * h) / 224))  # the FPN paper's rule, levels 2 to 5
    assert record["explain"]["stride"] == 2 ** min(max(level, 2), 5)
    _check_drawn_jpeg(tmp_path / PHOTO, image, record["boxes"], record["labels"], 0.4)  # others' tags cover some
    view = cv2.imread(str(tmp_path / f"{Path(PHOTO).stem}_explain.png"))
    assert view.shape == blank_explain(256, "").shape


def test_annotations_errors(capsys, tmp_path, setup):
    coco = _coco_mini()
    ann_file = coco / "annotations" / "instances_val2017.json"
    other = tmp_path / "other.jpg"
    cv2.imwrite(str(other), np.zeros((20, 30, 3), np.uint8))
    resized = tmp_path / PHOTO
    cv2.imwrite(str(resized), np.zeros((20, 30, 3), np.uint8))
    for args, status, message in [  # 1: an image that cannot be run; 2: bad arguments, nothing done
        (["--input", other], 1, f"demo.py: error: {other}: other.jpg is not in {ann_file} (images are matched by "
                                f"file name)"),
        (["--input", resized], 1, f"demo.py: error: {resized}: {resized} is 30x20 px, but {ann_file} says {PHOTO} is "),
        (["--input", setup["video"]], 2, "demo.py: error: --annotations takes an image or a folder of images"),
        (["--input", other, "--checkpoint", setup["checkpoint"]], 2,
         "demo.py: error: --annotations draws the file's boxes instead of a model's detections"),
    ]:
        capsys.readouterr()
        assert _main(*args, "--annotations", ann_file, "--output-dir", tmp_path / "out") == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), (err, message)


def test_torchvision_model(capsys, tmp_path):
    """A randomly initialised torchvision MobileNetV3-FPN saved as a weights file: its COCO class names, its own
    pooler's scales for the pooling view (the numbers are meaningless, the path is real)."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    from roikit.modeling.torchvision_models import COCO_CATEGORY_NAMES

    coco = _coco_mini()
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "out"
    assert _main("--input", coco / "val2017" / PHOTO, "--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn",
                 "--weights", tmp_path / "weights.pth", "--min-size", 160, "--max-size", 256, "--score-threshold", 0,
                 "--explain-pooling", "--output-dir", out, "--save-detections", "--threads", 1) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model: torchvision's fasterrcnn_mobilenet_v3_large_fpn with the weights of ")
    record = json.loads((out / f"{Path(PHOTO).stem}.json").read_text())
    assert len(record["scores"]) > 0 and record["scores"] == sorted(record["scores"], reverse=True)
    assert all(name == COCO_CATEGORY_NAMES[label] for name, label in zip(record["names"], record["labels"]))
    # the photo is 500x334: its short side to --min-size, 160; the long side 500 * 160 / 334, rounded down
    box = np.array(record["boxes"][0]) * np.array([239 / 500, 160 / 334] * 2)
    assert record["explain"]["box_net_px"] == pytest.approx(box.tolist(), abs=0.02)
    assert record["explain"]["stride"] in (8, 16, 32, 64)
    _check_drawn_jpeg(out / PHOTO, coco / "val2017" / PHOTO, record["boxes"][:1], record["labels"][:1], 0.8,
                      inside=False)  # a hundred random boxes of one class
    capsys.readouterr()
    assert _main("--input", coco / "val2017" / PHOTO, "--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn",
                 "--output-dir", out) == 2
    assert capsys.readouterr().err.strip() == "demo.py: error: --model torchvision:NAME and --weights FILE go together"
