"""Configuration: YAML files over one table of defaults, with ``_base_`` inheritance and ``key.sub=value`` overrides.

A config file is a nested mapping of keys that exist in :data:`DEFAULTS`; ``_base_: other.yaml`` (a path relative
to the file) names a file it is laid over. Mappings merge key by key, everything else (lists included) replaces.
The mappings in :data:`FREEFORM` (an op's own settings) take any keys and replace as a whole, since the settings
of one op make no sense for another. Command-line overrides ``model.pooler.op=roi_pool`` come last; the value is
read with ``yaml.safe_load``, so ``8`` is an int, ``[16, 32]`` a list and ``null`` None (and, where the default
is a float, ``1e-4`` is the float PyYAML would have left a string).

Numbers are checked against :data:`RANGES` (each element of a list of numbers too), wherever they come from.
Each unknown key, wrong type, value out of range or unreadable file is a ``ValueError`` that names the file and
the key.
"""
from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULTS", "FREEFORM", "RANGES", "Range", "load_config", "merge_config", "check_config", "apply_overrides",
           "parse_override", "parse_value", "pooler_override", "config_difference", "config_differences"]

DEFAULTS: dict[str, Any] = {
    "model": {
        "num_classes": None,  # object classes without the background; None: from the training set
        "backbone": {
            "name": "small_cnn",  # small_cnn | resnet_fpn
            "stride": 16,  # small_cnn: 16 or 32
            "channels": [16, 32, 64, 128],  # small_cnn: one width per stride-2 step
            "depth": 2,  # small_cnn: convolutions per stage
            "norm": "bn",  # small_cnn: bn | gn | none
            "resnet_depth": 50,  # resnet_fpn
            "weights": None,  # resnet_fpn: a local file or a torchvision weights name
            "trainable_layers": 3,  # resnet_fpn
        },
        "transform": {  # torchvision's GeneralizedRCNNTransform
            "min_size": 800,
            "max_size": 1333,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        },
        "rpn": {
            "anchor_sizes": [32, 64, 128, 256, 512],  # per feature map when there are as many maps, else all on one
            "aspect_ratios": [0.5, 1.0, 2.0],
            "pre_nms_top_n_train": 2000,
            "post_nms_top_n_train": 2000,
            "pre_nms_top_n_test": 1000,
            "post_nms_top_n_test": 1000,
            "nms_thresh": 0.7,
            "fg_iou_thresh": 0.7,
            "bg_iou_thresh": 0.3,
            "batch_size_per_image": 256,
            "positive_fraction": 0.5,
        },
        "pooler": {
            "op": "roi_align",  # roi_align | roi_pool | prroi_pool | roi_spp | ps_roi_align | ps_roi_pool
            #                    | roi_align_rotated | deform_roi_pool
            "output_size": 7,
            "sampling_ratio": 2,
            "options": {"aligned": True},  # the op's own settings: aligned, pool, rounding, levels; deform_roi_pool:
            # gamma, modulated, deform_fc_channels (channels: the backbone's, set by the builder)
        },
        "box_head": {  # region features -> 3x3 convs -> head pool -> fc layers (roikit.modeling.box_head)
            "conv_dims": [],
            "pool": "none",  # none (flatten) | global_avg | global_max | avg | max | overlapping_max | stochastic
            #                  | bilinear | compact_bilinear | spp
            "pool_options": {},  # the head pool layer's own settings: kernel_size, stride, output_dim, levels, ...
            "fc_dims": [1024, 1024],
        },
        "roi_heads": {
            "fg_iou_thresh": 0.5,
            "bg_iou_thresh": 0.5,
            "batch_size_per_image": 512,
            "positive_fraction": 0.25,
            "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
            "score_thresh": 0.05,
            "nms_thresh": 0.5,
            "detections_per_img": 100,
        },
    },
    "data": {
        # the synthetic shapes set, generated on first use; used for a split whose paths below are null
        "shapes": {"root": "data/shapes", "num_train": 2000, "num_val": 500, "image_size": 320, "seed": 0},
        "train_images": None,
        "train_annotations": None,
        "val_images": None,
        "val_annotations": None,
        "hflip": 0.5,
        "batch_size": 8,  # per process
        "eval_batch_size": 8,
        "num_workers": 0,
    },
    "solver": {
        "optimizer": "sgd",  # sgd | adamw
        "lr": 0.02,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "max_iter": 1000,
        "warmup_iters": 100,
        "warmup_factor": 0.001,
        "schedule": "cosine",  # cosine | step | constant
        "steps": [],  # step: iterations at which the rate is multiplied by gamma
        "gamma": 0.1,
        "clip_grad_norm": None,
    },
    "train": {
        "seed": 0,
        "output_dir": None,  # None: runs/<config file name>
        "eval_period": 0,  # 0: evaluate once, at the end
        "checkpoint_period": 500,
        "log_period": 20,
        "amp": True,  # mixed precision, on CUDA only
        "device": "auto",  # auto | cpu | cuda
    },
}

FREEFORM = {("model", "pooler", "options"), ("model", "box_head", "pool_options")}


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``lo <= v`` (``lo < v`` when ``lo_open``) and ``v <= hi``; ``integer`` where
    the default (None) gives no type to check."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False

    def __contains__(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)) or not math.isfinite(v):
            return False
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        return above and (self.hi is None or v <= self.hi)

    def __str__(self) -> str:
        kind = "an int " if self.integer else ""
        if self.hi is None:
            return f"{kind}{'>' if self.lo_open else '>='} {self.lo}"
        return f"{kind}in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"


POSITIVE, FRACTION = Range(0, lo_open=True), Range(0, 1)
COUNT, NON_NEGATIVE = Range(1, integer=True), Range(0, integer=True)

# What each number may be (for a list, each of its elements); keys not listed take any value of their type.
# Settings with a fixed set of values (names, strides) are checked where they are used, against what exists.
RANGES: dict[tuple[str, ...], Range] = {tuple(key.split(".")): r for key, r in {
    "model.num_classes": COUNT,
    "model.backbone.channels": COUNT,
    "model.backbone.depth": COUNT,
    "model.backbone.trainable_layers": Range(0, 5, integer=True),
    "model.transform.min_size": COUNT,
    "model.transform.max_size": COUNT,
    "model.transform.image_std": POSITIVE,
    "model.rpn.anchor_sizes": POSITIVE,
    "model.rpn.aspect_ratios": POSITIVE,
    "model.rpn.pre_nms_top_n_train": COUNT,
    "model.rpn.post_nms_top_n_train": COUNT,
    "model.rpn.pre_nms_top_n_test": COUNT,
    "model.rpn.post_nms_top_n_test": COUNT,
    "model.rpn.nms_thresh": FRACTION,
    "model.rpn.fg_iou_thresh": FRACTION,
    "model.rpn.bg_iou_thresh": FRACTION,
    "model.rpn.batch_size_per_image": COUNT,
    "model.rpn.positive_fraction": FRACTION,
    "model.pooler.output_size": COUNT,
    "model.box_head.conv_dims": COUNT,
    "model.box_head.fc_dims": COUNT,
    "model.roi_heads.fg_iou_thresh": FRACTION,
    "model.roi_heads.bg_iou_thresh": FRACTION,
    "model.roi_heads.batch_size_per_image": COUNT,
    "model.roi_heads.positive_fraction": FRACTION,
    "model.roi_heads.bbox_reg_weights": POSITIVE,
    "model.roi_heads.score_thresh": FRACTION,
    "model.roi_heads.nms_thresh": FRACTION,
    "model.roi_heads.detections_per_img": COUNT,
    "data.shapes.num_train": COUNT,
    "data.shapes.num_val": COUNT,
    "data.shapes.seed": NON_NEGATIVE,
    "data.hflip": FRACTION,
    "data.batch_size": COUNT,
    "data.eval_batch_size": COUNT,
    "data.num_workers": NON_NEGATIVE,
    "solver.lr": POSITIVE,
    "solver.momentum": FRACTION,
    "solver.weight_decay": Range(0),
    "solver.max_iter": COUNT,
    "solver.warmup_iters": NON_NEGATIVE,
    "solver.warmup_factor": FRACTION,
    "solver.steps": COUNT,
    "solver.gamma": POSITIVE,
    "solver.clip_grad_norm": POSITIVE,
    "train.seed": NON_NEGATIVE,
    "train.eval_period": NON_NEGATIVE,
    "train.checkpoint_period": NON_NEGATIVE,
    "train.log_period": COUNT,
}.items()}


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _check_type(value: Any, default: Any, path: tuple[str, ...], where: str) -> None:
    if default is None or value is None:
        return
    expected: tuple[type, ...]
    if isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, int):
        expected = (int,)
    elif isinstance(default, float):
        expected = (int, float)
    else:
        expected = (type(default),)
    if not isinstance(value, expected) or (isinstance(value, bool) and not isinstance(default, bool)):
        name = expected[-1].__name__
        raise ValueError(f"{where}: {_dotted(path)} must be {'an' if name[0] in 'aeiou' else 'a'} {name} "
                         f"(like the default {default!r}), got {value!r}")


def _check_range(value: Any, path: tuple[str, ...], where: str) -> None:
    allowed = RANGES.get(path)
    if allowed is None or value is None:
        return
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if v not in allowed]
    if bad:
        each = "each element of " if isinstance(value, list) else ""
        raise ValueError(f"{where}: {each}{_dotted(path)} must be {allowed}, got {bad[0]!r}")


def _yaml11_float(text: str) -> float | str:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string (it wants ``1.0e-4``); where a float is due, take it as one."""
    try:
        return float(text)
    except ValueError:
        return text


def _unknown_key(key: str, known: Iterable[str], path: tuple[str, ...], where: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {_dotted(path + (close[0],))!r}?)" if close else ""
    return ValueError(f"{where}: unknown config key {_dotted(path + (key,))!r}{hint}")


def merge_config(base: dict, update: dict, where: str, schema: dict | None = None,
                 path: tuple[str, ...] = ()) -> dict:
    """``base`` with ``update`` laid over it, every key checked against ``schema`` (default: :data:`DEFAULTS`)."""
    schema = DEFAULTS if schema is None else schema
    if not isinstance(update, dict):
        raise ValueError(f"{where}: {_dotted(path) or 'the config'} must be a mapping, got {update!r}")
    out = copy.deepcopy(base)
    for key, value in update.items():
        if not isinstance(key, str) or key not in schema:
            raise _unknown_key(str(key), schema, path, where)
        sub = path + (key,)
        if sub in FREEFORM:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {_dotted(sub)} must be a mapping, got {value!r}")
            out[key] = copy.deepcopy(value)
        elif isinstance(schema[key], dict):
            out[key] = merge_config(out[key], value, where, schema[key], sub)
        else:
            if isinstance(schema[key], float) and isinstance(value, str):
                value = _yaml11_float(value)
            _check_type(value, schema[key], sub, where)
            _check_range(value, sub, where)
            out[key] = copy.deepcopy(value)
    return out


def check_config(cfg: dict, where: str = "the config") -> dict:
    """``cfg`` checked as a whole (keys, types, ranges) and completed with :data:`DEFAULTS`: for a config that
    did not come from :func:`load_config`."""
    return merge_config(DEFAULTS, cfg, where)


def config_differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Every key where two configs differ, in sorted key order: ``[("solver.lr", 0.01, 0.02), ...]`` (a key one of
    them lacks reads as None there)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in config_differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))]
    return [] if a == b else [(path, a, b)]


def config_difference(a: Any, b: Any, path: str = "", names: tuple[str, str] = ("was", "now")) -> str | None:
    """The first key where two configs differ, as ``"path: was 1, now 2"``; None when they are equal."""
    diffs = config_differences(a, b, path)
    if not diffs:
        return None
    key, x, y = diffs[0]
    return f"{key}: {names[0]} {x!r}, {names[1]} {y!r}"


def _read_yaml(path: Path, where: str) -> dict:
    if not path.is_file():
        raise ValueError(f"config file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config file: {e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping, got {type(data).__name__}")
    return data


def _load_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    where = f" (the _base_ of {chain[-1]})" if chain else ""
    data = _read_yaml(path, where)
    if path.resolve() in [p.resolve() for p in chain]:
        raise ValueError(f"{path}: _base_ cycle: {' -> '.join(map(str, chain + (path,)))}")
    base = data.pop("_base_", None)
    if base is None:
        cfg = copy.deepcopy(DEFAULTS)
    elif isinstance(base, str):
        cfg = _load_file(path.parent / base, chain + (path,))
    else:
        raise ValueError(f"{path}: _base_ must be a file name, got {base!r}")
    return merge_config(cfg, data, str(path))


def parse_value(text: str, where: str) -> Any:
    """A setting's value from the command line, read as YAML (``8`` an int, ``[16, 32]`` a list, empty None)."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: malformed value {text!r}: {' '.join(str(e).split())}") from e


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"solver.lr=0.01"`` -> ``(("solver", "lr"), 0.01)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} is not of the form key.sub=value")
    return tuple(key.strip().split(".")), parse_value(value, f"override {text!r}")


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """``cfg`` with ``key.sub=value`` overrides applied, in order."""
    for text in overrides:
        path, value = parse_override(text)
        update: Any = value
        for key in reversed(path):
            update = {key: update}
        cfg = merge_config(cfg, update, f"override {text!r}")
    return cfg


def pooler_override(cfg: dict, spec: str, flag: str = "--pooler") -> dict:
    """``cfg`` with the pooler ``spec`` (``"op[:key=value,...]"``, e.g. ``"roi_pool:rounding=integer"``) laid over
    ``model.pooler``: ``output_size`` and ``sampling_ratio`` set the pooler's own keys, the other keys the op's
    options. For the configured op the options given are laid over the configured ones (``roi_align:
    sampling_ratio=0`` keeps ``aligned``); another op starts from its own defaults, since one op's options mean
    nothing to another."""
    op, _, settings = spec.partition(":")
    op = op.strip()
    if not op:
        raise ValueError(f"{flag} {spec!r}: expected op[:key=value,...], e.g. roi_pool:rounding=integer")
    pooler = cfg["model"]["pooler"]
    update: dict[str, Any] = {"op": op, "options": dict(pooler["options"]) if op == pooler["op"] else {}}
    for item in filter(None, (s.strip() for s in settings.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {spec!r}: {item!r} is not key=value")
        parsed = parse_value(value, f"{flag} {spec!r}, {key}")
        if key in ("output_size", "sampling_ratio"):
            update[key] = parsed
        else:
            update["options"][key] = parsed
    return merge_config(cfg, {"model": {"pooler": update}}, f"{flag} {spec!r}")


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """The full config: :data:`DEFAULTS`, then the file's ``_base_`` chain, the file, then the overrides."""
    return apply_overrides(_load_file(Path(path)), overrides)
