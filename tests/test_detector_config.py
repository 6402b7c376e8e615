"""The detector's config: _base_ merges, overrides, ranges, the --pooler override, and the errors of each."""
from __future__ import annotations

from pathlib import Path

import pytest

from roikit.engine import load_config
from roikit.engine import trainer as trainer_module
from roikit.engine.config import DEFAULTS, RANGES, apply_overrides, check_config, pooler_override
from roikit.layers.poolers import RoIPooler
from roikit.modeling import build_detector

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------ config
def test_config_base_merge_and_overrides():
    cfg = load_config(REPO / "configs" / "shapes_roi_pool_int_s32.yaml", ["solver.lr=5e-1", "data.batch_size=3"])
    assert cfg["model"]["backbone"]["stride"] == 32
    assert cfg["model"]["pooler"]["op"] == "roi_pool"
    assert cfg["model"]["pooler"]["options"] == {"rounding": "integer"}  # replaced, not merged with aligned: true
    assert cfg["model"]["rpn"]["anchor_sizes"] == [16, 32, 64, 128, 256]  # from base_shapes.yaml
    assert cfg["solver"]["lr"] == 0.5 and cfg["data"]["batch_size"] == 3
    assert cfg["solver"]["momentum"] == DEFAULTS["solver"]["momentum"]  # from the defaults
    cfg = apply_overrides(cfg, ["model.pooler.options={aligned: false}", "train.output_dir=null"])
    assert cfg["model"]["pooler"]["options"] == {"aligned": False} and cfg["train"]["output_dir"] is None


def test_every_config_builds():
    """Each shipped config loads and its model builds (the COCO example without its weights file)."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path, ["model.num_classes=3", "model.backbone.weights=null"])
        model = build_detector(cfg)
        assert isinstance(model.roi_heads.box_roi_pool, RoIPooler), path.name


@pytest.mark.parametrize("file_text, overrides, message", [
    ("solver: {lr: 0.1, max_iters: 5}\n", [], r"unknown config key 'solver.max_iters' \(did you mean 'solver.max_iter'\?\)"),
    ("solver: {lr: fast}\n", [], r"solver.lr must be a float"),
    ("data: 3\n", [], r"data must be a mapping"),
    ("solver: {lr: [0.1\n", [], r"malformed YAML"),
    ("- 1\n", [], r"a config file must be a mapping"),
    ("_base_: nowhere.yaml\n", [], r"config file not found: .*nowhere.yaml \(the _base_ of"),
    ("", ["model.pooler.opp=roi_pool"], r"unknown config key 'model.pooler.opp'"),
    ("", ["solver.lr"], r"override 'solver.lr' is not of the form key.sub=value"),
    ("", ["train.amp=3"], r"train.amp must be a bool"),
    ("", ["model.pooler.options=3"], r"model.pooler.options must be a mapping"),
])
def test_config_errors(tmp_path, file_text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(file_text)
    with pytest.raises(ValueError, match=message):
        load_config(path, overrides)


@pytest.mark.parametrize("override, message", [
    ("model.rpn.nms_thresh=-1", "model.rpn.nms_thresh must be in [0, 1], got -1"),
    ("data.batch_size=0", "data.batch_size must be an int >= 1, got 0"),
    ("model.transform.min_size=0", "model.transform.min_size must be an int >= 1, got 0"),
    ("model.backbone.channels=[8,0,8,8]", "each element of model.backbone.channels must be an int >= 1, got 0"),
    ("solver.lr=0", "solver.lr must be > 0, got 0"),
    ("solver.clip_grad_norm=fast", "solver.clip_grad_norm must be > 0, got 'fast'"),
    ("model.num_classes=2.5", "model.num_classes must be an int >= 1, got 2.5"),
    ("data.hflip=1.5", "data.hflip must be in [0, 1], got 1.5"),
])
def test_config_values_out_of_range(override, message):
    with pytest.raises(ValueError) as error:
        load_config(REPO / "configs" / "base_shapes.yaml", [override])
    assert str(error.value) == f"override {override!r}: {message}"


def test_config_ranges_name_real_keys_and_hold_for_hand_made_configs():
    for path in RANGES:
        node = DEFAULTS
        for key in path:
            node = node[key]  # KeyError: a range for a key that does not exist
    cfg = load_config(REPO / "configs" / "base_shapes.yaml")
    assert check_config(cfg) == cfg
    cfg["model"]["roi_heads"]["score_thresh"] = -0.5  # edited by hand, past load_config
    with pytest.raises(ValueError, match=r"the config: model.roi_heads.score_thresh must be in \[0, 1\], got -0.5"):
        trainer_module.train(cfg, "unused")


def test_pooler_override_lays_options_over_the_configured_ones():
    cfg = load_config(REPO / "configs" / "base_shapes.yaml")  # roi_align, sampling_ratio 2, aligned true
    pooler = pooler_override(cfg, "roi_align:sampling_ratio=0")["model"]["pooler"]
    assert pooler == {"op": "roi_align", "output_size": 7, "sampling_ratio": 0, "options": {"aligned": True}}
    pooler = pooler_override(cfg, "roi_align:aligned=false,pool=max")["model"]["pooler"]
    assert pooler["options"] == {"aligned": False, "pool": "max"} and pooler["sampling_ratio"] == 2
    pooler = pooler_override(cfg, "roi_pool:rounding=integer")["model"]["pooler"]  # another op: its own options
    assert pooler == {"op": "roi_pool", "output_size": 7, "sampling_ratio": 2, "options": {"rounding": "integer"}}
    assert cfg["model"]["pooler"]["options"] == {"aligned": True}  # not changed in place
    with pytest.raises(ValueError, match=r"--pooler 'roi_align:aligned=\[', aligned: malformed value '\['"):
        pooler_override(cfg, "roi_align:aligned=[")
    with pytest.raises(ValueError, match=r"--pooler 'roi_align:output_size=0': model.pooler.output_size must be"):
        pooler_override(cfg, "roi_align:output_size=0")


def test_config_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ValueError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
