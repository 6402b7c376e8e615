"""roikit.data: the synthetic shapes set, the COCO data set and the transforms."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from roikit.data import (
    SHAPE_CLASSES,
    CocoDetection,
    Compose,
    RandomHorizontalFlip,
    collate_fn,
    ensure_shapes_dataset,
    make_shapes_dataset,
    render_image,
)
from roikit.data import shapes as shapes_module

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_shapes.py"
_spec = importlib.util.spec_from_file_location("make_shapes", _TOOL)
make_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shapes)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, num_train=48, num_val=12, seed=0, progress=False)


# ---------------------------------------------------------------- rendering


def test_render_image_is_deterministic_and_seed_dependent():
    a, ann_a = render_image(np.random.default_rng(5))
    b, ann_b = render_image(np.random.default_rng(5))
    c, _ = render_image(np.random.default_rng(6))
    assert a.dtype == np.uint8 and a.shape == (320, 320, 3)
    assert np.array_equal(a, b) and ann_a == ann_b
    assert not np.array_equal(a, c)
    img, anns = render_image(np.random.default_rng(0), image_size=(96, 128))
    assert img.shape == (96, 128, 3) and 1 <= len(anns) <= 6


@pytest.mark.parametrize("seed", range(25))
def test_boxes_are_tight_on_the_visible_pixels(seed):
    """Read each shape's pixels back from the image (by its flat colour) and rebuild its box from them."""
    h, w = 200, 240
    image, anns = render_image(np.random.default_rng(seed), (h, w))
    _, shapes = shapes_module._render(np.random.default_rng(seed), h, w)  # same stream: gives the colours
    assert 1 <= len(anns) == len(shapes) <= 6
    for (class_index, box, area), shape in zip(anns, shapes):
        assert 0 <= class_index < len(SHAPE_CLASSES)
        mask = (image == shape.colour).all(-1)  # [H, W]: this shape's visible pixels, nothing else
        ys, xs = np.nonzero(mask)
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert box == [float(v) for v in expected]
        assert area == box[2] * box[3]
        # fully inside the image, never touching its border
        assert box[0] >= 1 and box[1] >= 1 and box[0] + box[2] <= w - 1 and box[1] + box[3] <= h - 1
        # occlusion leaves at least 60% of every shape
        assert mask.sum() >= 0.6 * shape.full_area


def test_render_image_bad_input():
    with pytest.raises(ValueError, match="image_size must be between 64"):
        render_image(np.random.default_rng(0), (32, 320))
    with pytest.raises(ValueError, match="image_size must be an int or a pair"):
        render_image(np.random.default_rng(0), (320, 320, 3))
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        render_image(0)


def test_shapes_settings_take_numpy_ints_but_not_bools():
    settings = shapes_module._settings(np.int64(2), np.int32(1), (np.int64(96), 96), np.uint8(0))
    assert settings["num_train"] == 2 and type(settings["num_train"]) is int and settings["image_size"] == [96, 96]
    with pytest.raises(ValueError, match="num_val must be an int, got True"):
        shapes_module._settings(2, True, 96, 0)
    with pytest.raises(ValueError, match=r"image_size\[1\] must be an int, got 96.0"):
        shapes_module._settings(2, 1, (96, 96.0), 0)
    with pytest.raises(ValueError, match="image_size must be an int or a pair of ints"):
        shapes_module._settings(2, 1, "96", 0)


# ---------------------------------------------------------------- the data set on disk


def test_dataset_is_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_train=5, num_val=3, seed=3, progress=False)
    b = make_shapes_dataset(tmp_path / "b", num_train=5, num_val=3, seed=3, progress=False)
    c = make_shapes_dataset(tmp_path / "c", num_train=5, num_val=3, seed=4, progress=False)
    bytes_a, bytes_b, bytes_c = (_tree_bytes(Path(p["root"])) for p in (a, b, c))
    assert len(bytes_a) == 5 + 3 + 2 + 1  # images, two annotation files, DONE
    assert bytes_a == bytes_b
    for name in bytes_a:
        if name.endswith(".png") or name.startswith("annotations"):
            assert bytes_a[name] != bytes_c[name], name
    # An image depends on (seed, split, index) only: a smaller set holds the same first images.
    d = make_shapes_dataset(tmp_path / "d", num_train=2, num_val=1, seed=3, progress=False)
    for name, data in _tree_bytes(Path(d["root"])).items():
        if name.endswith(".png"):
            assert data == bytes_a[name], name
    # train and val never share an image
    assert bytes_a["train/images/000001.png"] != bytes_a["val/images/000001.png"]


def test_dataset_layout_and_size_buckets(shapes_set):
    assert (Path(shapes_set["root"]) / "DONE").is_file()
    areas = []
    for split, count in (("train", 48), ("val", 12)):
        data = json.loads(Path(shapes_set[f"{split}_annotations"]).read_text())
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5, 6]
        assert [c["name"] for c in data["categories"]] == list(SHAPE_CLASSES)
        assert [im["id"] for im in data["images"]] == list(range(1, count + 1))
        assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
        for im in data["images"]:
            assert (Path(shapes_set[f"{split}_images"]) / im["file_name"]).is_file()
            assert (im["width"], im["height"]) == (320, 320)
        for a in data["annotations"]:
            assert a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3]
        areas += [a["area"] for a in data["annotations"]]
    areas = np.array(areas)
    buckets = np.array([(areas < 32**2).mean(), ((areas >= 32**2) & (areas < 96**2)).mean(), (areas >= 96**2).mean()])
    assert (buckets > 0.2).all(), buckets  # about a third each


def test_pycocotools_loads_it_and_gt_as_detections_scores_ap_1(shapes_set):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(shapes_set["val_annotations"])
    assert sorted(gt.getCatIds()) == [1, 2, 3, 4, 5, 6]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_ensure_generates_only_when_needed(tmp_path, monkeypatch):
    root = tmp_path / "s"
    kwargs = dict(num_train=4, num_val=2, seed=0, progress=False)
    first = ensure_shapes_dataset(root, **kwargs)
    calls = []
    real = shapes_module.make_shapes_dataset
    monkeypatch.setattr(shapes_module, "make_shapes_dataset", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert ensure_shapes_dataset(root, **kwargs) == first and calls == []
    (root / "DONE").unlink()  # a half-made folder
    ensure_shapes_dataset(root, **kwargs)
    assert len(calls) == 1
    ensure_shapes_dataset(root, **{**kwargs, "num_train": 2})  # other settings: regenerated, stale images gone
    assert len(calls) == 2
    assert sorted(p.name for p in (root / "train" / "images").iterdir()) == ["000001.png", "000002.png"]
    assert json.loads((root / "DONE").read_text())["num_train"] == 2
    with pytest.raises(ValueError, match="unknown argument"):
        ensure_shapes_dataset(root, num_trian=3)
    with pytest.raises(ValueError, match="num_train must be >= 1, got 0"):
        make_shapes_dataset(root, num_train=0)


def test_cli(tmp_path, capsys):
    args = make_shapes.get_args_parser().parse_args(
        ["--data-root", str(tmp_path / "cli"), "--num-train-images", "2", "--num-val-images", "1", "--image-size",
         "96", "--no-progress", "--threads", "1"]
    )
    before = torch.get_num_threads()
    assert make_shapes.main(args) == 0
    assert torch.get_num_threads() == before  # restored after
    assert len(list((tmp_path / "cli" / "train" / "images").iterdir())) == 2
    assert len(list((tmp_path / "cli" / "val" / "images").iterdir())) == 1
    args.image_size = 16
    assert make_shapes.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_shapes.py: error: image_size must be between") and err.count("\n") == 1
    args.image_size, args.data_root = 96, str(tmp_path / "cli" / "DONE")  # a file
    assert make_shapes.main(args) == 2
    assert capsys.readouterr().err == f"make_shapes.py: error: --data-root {args.data_root} is a file, not a folder\n"


@pytest.mark.parametrize("old", ["--root", "--num-train", "--num-val"])
def test_cli_takes_one_name_per_setting(old, capsys):
    """The names the other tools use (--data-root, --num-train-images), and no second spelling (the old names, two
    of them prefixes of the new ones, are refused)."""
    with pytest.raises(SystemExit) as exit_info:
        make_shapes.get_args_parser().parse_args([old, "1"])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {old} 1" in capsys.readouterr().err


def test_every_option_of_the_tools_is_described():
    train = importlib.util.spec_from_file_location("train_tool", _TOOL.with_name("train.py"))
    train_tool = importlib.util.module_from_spec(train)
    train.loader.exec_module(train_tool)
    for tool in (make_shapes, train_tool):
        for action in tool.get_args_parser()._actions:
            assert action.help and action.help.strip(), (tool.__name__, action.dest)
        assert any(a.dest == "threads" for a in tool.get_args_parser()._actions)


# ---------------------------------------------------------------- CocoDetection


def test_coco_detection_formats(shapes_set):
    ds = CocoDetection(shapes_set["train_images"], shapes_set["train_annotations"], check_images=True)
    assert len(ds) == 48 and ds.num_classes == 6 and ds.class_names == SHAPE_CLASSES
    assert ds.cat_id_to_label == {i: i for i in range(1, 7)} and ds.label_to_cat_id == ds.cat_id_to_label
    image, target = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, 320, 320)
    assert 0.0 <= image.min() and image.max() <= 1.0
    bgr = cv2.imread(str(Path(shapes_set["train_images"]) / "000004.png"))
    assert torch.equal(image, torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float() / 255)  # RGB
    anns = ds.coco.imgToAnns[target["image_id"]]
    assert target["image_id"] == 4
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(anns), 4)
    x, y, w, h = anns[0]["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [a["category_id"] for a in anns]
    assert target["area"].tolist() == [a["area"] for a in anns]
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].sum() == 0

    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 3 and [t["image_id"] for t in targets] == [1, 2, 3]


def _tiny_set(tmp_path: Path, data_edit=None, name: str = "ann.json") -> tuple[Path, Path]:
    """One 40x30 image, categories with ids 7 and 3 (not contiguous), one crowd annotation."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    cv2.imwrite(str(images / "a.png"), np.full((30, 40, 3), 200, np.uint8))
    data = {
        "images": [{"id": 10, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 10, 5], "area": 50.0, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20, 10, 19, 19]},  # no area, no iscrowd
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 40, 30], "area": 1200.0, "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    if data_edit is not None:
        data_edit(data)
    ann = tmp_path / name
    ann.write_text(json.dumps(data))
    return images, ann


def test_coco_detection_label_map_and_crowd(tmp_path):
    ds = CocoDetection(*_tiny_set(tmp_path))
    assert ds.cat_id_to_label == {3: 1, 7: 2} and ds.label_to_cat_id == {1: 3, 2: 7}
    assert ds.class_names == ("cat", "dog")
    image, target = ds[0]
    assert image.shape == (3, 30, 40)
    assert target["boxes"].tolist() == [[1, 2, 11, 7], [20, 10, 39, 29]]  # the crowd box is left out
    assert target["labels"].tolist() == [2, 1]
    assert target["area"].tolist() == [50.0, 19.0 * 19.0]
    assert len(ds.coco.getAnnIds(imgIds=[10])) == 3  # but kept for evaluation
    # an image without annotations gives empty targets of the right shapes
    ds = CocoDetection(*_tiny_set(tmp_path, lambda d: d.update(annotations=[])))
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def _edit_ann(key, value, index=0):
    def edit(data):
        data["annotations"][index][key] = value
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("images"), r"ann\.json: missing or non-list key 'images'"),
        (lambda d: d["images"][0].pop("width"), r"ann\.json: image #0 \(id 10\) needs an int 'width'"),
        (_edit_ann("bbox", [1, 2, 10, -3], 1),
         r"ann\.json: annotation id 2 \(image id 10\) has a bbox of negative size \[1, 2, 10, -3\]"),
        (_edit_ann("bbox", [1, 2, -0.5, 3]), r"ann\.json: annotation id 1 \(image id 10\) has a bbox of negative size"),
        (_edit_ann("bbox", [1, 2, float("nan"), 5]),
         r"ann\.json: annotation id 1 \(image id 10\) needs 'bbox' as 4 finite numbers \[x, y, w, h\], got \[1, 2, nan"),
        (_edit_ann("bbox", [1, 2, 10, float("inf")]), r"annotation id 1 \(image id 10\) needs 'bbox' as 4 finite"),
        (_edit_ann("bbox", [35, 2, 10, 5]), r"ann\.json: annotation id 1 \(image id 10\) has bbox \[35, 2, 10, 5\] "
                                            r"outside its image \(40x30\)"),
        (_edit_ann("bbox", [-2, 2, 10, 5]), r"annotation id 1 \(image id 10\) has bbox .* outside its image \(40x30\)"),
        (_edit_ann("bbox", [1, 2, 10]), r"annotation id 1 \(image id 10\) needs 'bbox' as 4 finite numbers"),
        (_edit_ann("category_id", 5, 1),
         r"ann\.json: annotation id 2 \(image id 10\) has unknown category id 5 \(not in 'categories'\)"),
        (_edit_ann("image_id", 11), r"ann\.json: annotation id 1 refers to unknown image id 11 \(not in 'images'\)"),
        (_edit_ann("id", 2), r"ann\.json: duplicate annotation id 2"),
        (lambda d: d["annotations"][0].pop("category_id"), r"annotation id 1 needs an int 'category_id'"),
    ],
)
def test_coco_detection_bad_annotations(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message) as error:
        CocoDetection(*_tiny_set(tmp_path, edit))
    assert "\n" not in str(error.value)


def test_coco_detection_tolerates_a_box_a_little_outside(tmp_path):
    CocoDetection(*_tiny_set(tmp_path, _edit_ann("bbox", [30.5, 2, 10, 5])))  # 0.5 px over the right edge


def test_boxes_of_no_size_are_no_training_targets_but_stay_for_cocoeval(tmp_path):
    """COCO 2017's training file has two boxes of height 0 (annotation ids 918 and 2206849): they load, and the
    model never sees them (torchvision's detectors refuse a box of no size)."""
    def edit(data):
        data["annotations"][0]["bbox"] = [1, 2, 10, 0]
        data["annotations"].append({"id": 4, "image_id": 10, "category_id": 3, "bbox": [30.5, 5, 1e-9, 5]})
    ds = CocoDetection(*_tiny_set(tmp_path, edit))
    _, target = ds[0]
    # annotation 4 has a width that vanishes in float32 (30.5 + 1e-9 == 30.5): left out as well
    assert target["boxes"].tolist() == [[20, 10, 39, 29]] and target["labels"].tolist() == [1]
    assert target["area"].tolist() == [19.0 * 19.0]
    assert sorted(ds.coco.getAnnIds(imgIds=[10])) == [1, 2, 3, 4]
    assert ds.coco.anns[1]["area"] == 50.0 and ds.coco.anns[4]["area"] == pytest.approx(5e-9)


def test_coco_detection_bad_files(tmp_path):
    images, ann = _tiny_set(tmp_path)
    with pytest.raises(ValueError, match="annotation file not found: .*nope.json"):
        CocoDetection(images, tmp_path / "nope.json")
    with pytest.raises(ValueError, match="images folder not found: .*nope"):
        CocoDetection(tmp_path / "nope", ann)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON"):
        CocoDetection(images, bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"bad\.json: expected a JSON object"):
        CocoDetection(images, bad)

    # a missing image file is found up front, not when (maybe hours later) it is loaded
    ds = CocoDetection(images, ann)
    (images / "a.png").unlink()
    with pytest.raises(ValueError, match=r"ann\.json: image file of image id 10 not found: .*a\.png$"):
        ds[0]
    with pytest.raises(ValueError, match=r"ann\.json: image file of image id 10 not found: .*a\.png$"):
        CocoDetection(images, ann)
    # unreadable image
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"ann\.json: cannot decode the image file of image id 10: .*a\.png$"):
        CocoDetection(images, ann, check_images=True)
    # an image whose size disagrees with the annotation file
    cv2.imwrite(str(images / "a.png"), np.zeros((31, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image id 10 is 40x31 in .*a\.png, but the annotation file says 40x30$"):
        CocoDetection(images, ann)[0]


def test_several_missing_image_files_are_counted(tmp_path):
    def edit(data):
        data["images"] += [{"id": 11 + i, "file_name": f"gone{i}.jpg", "width": 40, "height": 30} for i in range(3)]
    images, ann = _tiny_set(tmp_path, edit)
    with pytest.raises(ValueError, match=r"ann\.json: image file of image id 11 not found: \S*gone0\.jpg \(2 more "
                                         r"of its 4 images are missing too\)$"):
        CocoDetection(images, ann)


def _one_image_set(tmp_path: Path, name: str, width: int, height: int) -> tuple[Path, Path]:
    data = {"images": [{"id": 5, "file_name": name, "width": width, "height": height}], "annotations": [],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path, tmp_path / "ann.json"


def test_grayscale_palette_and_cmyk_files_load_as_three_channels(tmp_path):
    from PIL import Image

    gray = np.arange(23 * 37, dtype=np.uint8).reshape(23, 37)  # an odd size
    cv2.imwrite(str(tmp_path / "gray.png"), gray)  # lossless: the values are known exactly
    image, target = CocoDetection(*_one_image_set(tmp_path, "gray.png", 37, 23))[0]
    assert image.shape == (3, 23, 37) and target["boxes"].shape == (0, 4)
    expected = torch.from_numpy(gray).float() / 255
    for c in range(3):
        assert torch.equal(image[c], expected)

    cv2.imwrite(str(tmp_path / "gray.jpg"), gray)  # a one-channel JPEG
    with Image.open(tmp_path / "gray.jpg") as im:
        assert im.mode == "L"
    image, _ = CocoDetection(*_one_image_set(tmp_path, "gray.jpg", 37, 23))[0]
    decoded = cv2.imread(str(tmp_path / "gray.jpg"), cv2.IMREAD_GRAYSCALE)  # OpenCV's decode as the oracle
    assert image.shape == (3, 23, 37)
    assert (image * 255 - torch.from_numpy(decoded).float()).abs().max() <= 1.0

    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    image, _ = CocoDetection(*_one_image_set(tmp_path, "palette.png", 37, 23))[0]
    assert image.shape == (3, 23, 37)

    cmyk = Image.new("CMYK", (37, 23), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    image, _ = CocoDetection(*_one_image_set(tmp_path, "cmyk.jpg", 37, 23))[0]
    assert image.shape == (3, 23, 37)
    assert image[0].mean() > 0.9 and image[1].mean() < 0.1 and image[2].mean() < 0.1


def test_exif_orientation_is_not_applied(tmp_path):
    """COCO's boxes are in the stored pixel order (pycocotools and torchvision read it without EXIF turns)."""
    from PIL import Image

    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 3  # "turn by 180 degrees to show"
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    image, _ = CocoDetection(*_one_image_set(tmp_path, "turned.jpg", 40, 30))[0]
    assert image[:, :, :18].mean() > 0.95 and image[:, :, 22:].mean() < 0.05  # still white on the left

    exif[0x0112] = 6  # a quarter turn: an annotation file made from the turned image has the other size
    Image.fromarray(pixels).save(tmp_path / "quarter.jpg", exif=exif)
    with pytest.raises(ValueError, match=r"image id 5 is 40x30 in .*quarter\.jpg, but the annotation file says "
                                         r"30x40 \(its EXIF orientation 6 turns it;"):
        CocoDetection(*_one_image_set(tmp_path, "quarter.jpg", 30, 40))[0]


def test_a_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "cut.jpg"), pixels)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert cv2.imread(str(tmp_path / "cut.jpg")) is not None  # what went unnoticed: OpenCV fills the rest in grey
    ds = CocoDetection(*_one_image_set(tmp_path, "cut.jpg", 80, 64))
    with pytest.raises(ValueError) as error:
        ds[0]
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'ann.json'))}: the image file of image id 5 is damaged "
                        rf"\(image file is truncated[^\n]*\): {re.escape(str(tmp_path / 'cut.jpg'))}", str(error.value))
    with pytest.raises(ValueError, match="is damaged"):
        CocoDetection(*_one_image_set(tmp_path, "cut.jpg", 80, 64), check_images=True)
    assert ds.describe(5) == f"{tmp_path / 'ann.json'}: image id 5 ({tmp_path / 'cut.jpg'})"


# ---------------------------------------------------------------- transforms


def test_random_horizontal_flip():
    image = torch.zeros(3, 6, 10)
    image[:, 1:3, 2:5] = 1.0  # the object: columns 2..4, rows 1..2 -> box [2, 1, 5, 3]
    target = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0]]), "labels": torch.tensor([1])}
    flipped, t = Compose([RandomHorizontalFlip(1.0)])(image, target)
    assert t["boxes"].tolist() == [[5.0, 1.0, 8.0, 3.0]]
    x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
    assert flipped[:, y1:y2, x1:x2].eq(1).all() and flipped.sum() == image.sum()  # the box still frames the object
    assert target["boxes"].tolist() == [[2.0, 1.0, 5.0, 3.0]]  # the input target is untouched
    same, t0 = RandomHorizontalFlip(0.0)(image, target)
    assert same is image and t0 is target
    empty, te = RandomHorizontalFlip(1.0)(image, {"boxes": torch.zeros(0, 4)})
    assert te["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\]"):
        RandomHorizontalFlip(1.5)


def test_small_images_render_for_many_seeds():
    # shapes scaled to fill a small image once left a negative placement range (ValueError: high - low < 0)
    import numpy as np

    from roikit.data import render_image

    for seed in range(120):
        for size in (64, 128):
            image, annotations = render_image(np.random.default_rng(seed), (size, size))
            assert image.shape == (size, size, 3)
            for _, (x, y, w, h), _ in annotations:
                assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
