"""The pooling study: crops are the pixels inside the boxes, and a tiny run writes what it promises."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from roikit.analysis.pooling_study import HEADS, StudyConfig, crop_box, extract_crops, resize_crop, wilson_interval
from roikit.data import CocoDetection, make_shapes_dataset

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "pooling_study.py"


def _load_tool():
    # in-process (no second torch import); the tool is a script, not a package module
    spec = importlib.util.spec_from_file_location("pooling_study_tool", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = make_shapes_dataset(root, num_train=4, num_val=3, image_size=128, seed=3, progress=False)
    return paths


def test_crop_box_is_the_pixels_inside_the_box():
    image = torch.zeros(3, 10, 12)
    image[:, 2:5, 3:9] = torch.tensor([0.2, 0.4, 0.6])[:, None, None]  # a 3-row, 6-column block
    crop = crop_box(image, (3, 2, 9, 5))  # x1, y1, x2, y2: x2 and y2 are the edges after the last pixel
    assert crop.shape == (3, 3, 6)
    assert torch.equal(crop, image[:, 2:5, 3:9])
    assert bool((crop == torch.tensor([0.2, 0.4, 0.6])[:, None, None]).all())  # only block pixels, all of them

    arange = torch.arange(2 * 6 * 7, dtype=torch.float32).view(2, 6, 7)
    assert torch.equal(crop_box(arange, (1.0, 2.0, 4.0, 5.0)), arange[:, 2:5, 1:4])
    assert torch.equal(crop_box(arange, (0.5, 1.2, 3.5, 4.0)), arange[:, 1:4, 0:4])  # fractional edges: outwards
    assert torch.equal(crop_box(arange, (-2, -1, 30, 30)), arange)  # clipped to the image
    with pytest.raises(ValueError, match="covers no pixel"):
        crop_box(arange, (7, 0, 9, 3))
    assert torch.equal(resize_crop(arange[:, 1:4, 0:4], 3)[:, :, :], torch.nn.functional.interpolate(
        arange[None, :, 1:4, 0:4], size=(3, 3), mode="bilinear", align_corners=False, antialias=True)[0])


def test_extracted_crops_equal_the_annotated_pixels_of_the_png(shapes):
    # The reference reads the PNG and the COCO json itself (cv2 + json, no roikit), slices [y, y + h) x [x, x + w).
    dataset = CocoDetection(shapes["train_images"], shapes["train_annotations"])
    ann = json.loads(open(shapes["train_annotations"]).read())
    files = {img["id"]: img["file_name"] for img in ann["images"]}
    anns = sorted(ann["annotations"], key=lambda a: (a["image_id"], a["id"]))
    assert all(float(v).is_integer() for a in anns for v in a["bbox"])  # the shapes set has pixel-exact boxes

    out = extract_crops(dataset, len(anns), size=16)
    assert out["crops"].shape == (len(anns), 3, 16, 16) and len(out["sources"]) == len(anns)
    for k, (a, (index, box)) in enumerate(zip(anns, out["sources"])):
        x, y, w, h = (int(v) for v in a["bbox"])
        bgr = cv2.imread(f"{shapes['train_images']}/{files[a['image_id']]}", cv2.IMREAD_COLOR)
        expected = torch.from_numpy(np.ascontiguousarray(bgr[y:y + h, x:x + w, ::-1])).permute(2, 0, 1).float() / 255
        image, _ = dataset[index]
        assert dataset.ids[index] == a["image_id"]
        crop = crop_box(image, box)
        assert crop.shape == (3, h, w)
        assert torch.equal(crop, expected)  # exactly the pixels inside the box
        assert torch.equal(out["crops"][k], resize_crop(expected, 16))  # and the study's input is their resize
        assert out["labels"][k].item() == a["category_id"] - 1

    with pytest.raises(ValueError, match="generate more images"):
        extract_crops(dataset, len(anns) + 1, size=16)


def test_tiny_study_writes_results_and_chart(shapes, tmp_path):
    tool = _load_tool()

    out = tmp_path / "out"
    args = tool.get_args_parser().parse_args([
        "--data-root", shapes["root"], "--num-train-images", "4", "--num-val-images", "3", "--seed", "3",
        "--train-crops", "8", "--val-crops", "6", "--crop-size", "12", "--epochs", "1", "--batch-size", "4",
        "--width", "4", "--compact-dim", "16", "--output-dir", str(out), "--no-progress",
    ])
    assert tool.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["heads"]) == list(HEADS)
    for name, r in results["heads"].items():
        acc = r["val_accuracy"]
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0, (name, acc)
        assert acc == r["val_correct"] / 6
        low, high = r["val_accuracy_95ci"]
        assert 0.0 <= low <= acc <= high <= 1.0
        assert len(r["train_loss_per_epoch"]) == 1 and math.isfinite(r["train_loss_per_epoch"][0])
        assert r["train_s"] > 0 and r["inference_s"] > 0 and r["head_train_step_ms"] > 0
    assert results["heads"]["bilinear"]["feature_dim"] == 16 * 16  # 4 * width channels, squared
    assert results["heads"]["compact_bilinear"]["feature_dim"] == 16
    assert results["data"]["map_shape"] == [16, 3, 3]
    png = (out / "pooling_study.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) is not None
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_same_seed_same_study(shapes):
    dataset = CocoDetection(shapes["train_images"], shapes["train_annotations"])
    from roikit.analysis.pooling_study import run_study

    config = StudyConfig(train_crops=6, val_crops=4, crop_size=12, epochs=1, batch_size=3, width=4, compact_dim=8,
                         heads=("global_avg", "stochastic"), inference_repeats=1)
    a, b = run_study(dataset, dataset, config, progress=False), run_study(dataset, dataset, config, progress=False)
    for name in config.heads:
        assert a["heads"][name]["train_loss_per_epoch"] == b["heads"][name]["train_loss_per_epoch"]
        assert a["heads"][name]["val_accuracy"] == b["heads"][name]["val_accuracy"]


def test_wilson_interval_and_config_checks():
    low, high = wilson_interval(90, 100)
    assert 0.82 < low < 0.83 and 0.94 < high < 0.95  # the textbook 95 % interval of 90/100
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="heads"):
        StudyConfig(heads=("global_max", "median"))
    with pytest.raises(ValueError, match="epochs"):
        StudyConfig(epochs=0)


def test_every_option_is_described_and_a_file_is_no_output_folder(tmp_path, capsys):
    tool = _load_tool()
    parser = tool.get_args_parser()
    for action in parser._actions:
        words = (action.help or "").replace("(default: %(default)s)", "").replace("default: %(default)s", "")
        assert len(words.strip()) > 8, f"{action.option_strings}: {action.help!r}"  # more than its default
    assert parser.parse_args([]).threads is None  # torch's own unless given: the tools' one convention
    (tmp_path / "file").write_text("x")
    args = parser.parse_args(["--output-dir", str(tmp_path / "file"), "--data-root", str(tmp_path / "none")])
    assert tool.main(args) == 2
    assert capsys.readouterr().err.strip() == f"pooling_study: error: --output-dir {tmp_path / 'file'} is a file, " \
                                              f"not a folder"
    assert not (tmp_path / "none").exists()  # refused before the data set is made
