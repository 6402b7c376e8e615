"""torchvision's own detection models, loaded from a local weights file, so their box pooler can be swapped.

    model, names = load_torchvision_detector("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_coco.pth")
    swap_roi_pooler(model, "roi_pool", rounding="integer")   # the same weights under another rule

The weights file is the ``state_dict`` torchvision's model zoo downloads (e.g.
``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``), or one saved with ``torch.save(model.state_dict(), FILE)``.
Nothing is downloaded: the backbone's ImageNet weights are not fetched either. ``maskrcnn_resnet50_fpn`` is loaded
as its box detector only (a Faster R-CNN with Mask R-CNN's weights; the mask branch is dropped).

The models are torchvision's: images are RGB floats in [0, 1] (as roikit's detectors take them), labels are the
class indices of the weights file; for torchvision's COCO weights (91 classes) those are COCO's category ids, so
their detections can be scored against a COCO annotation file as they are.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models import detection
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

__all__ = ["TORCHVISION_MODELS", "COCO_CATEGORY_NAMES", "parse_model_name", "load_torchvision_detector",
           "label_to_category_id", "given_feature_maps"]

# name -> (builder, state-dict key prefixes that are not loaded)
TORCHVISION_MODELS = {
    "fasterrcnn_resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, ()),
    "fasterrcnn_resnet50_fpn_v2": (detection.fasterrcnn_resnet50_fpn_v2, ()),
    "fasterrcnn_mobilenet_v3_large_fpn": (detection.fasterrcnn_mobilenet_v3_large_fpn, ()),
    "maskrcnn_resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, ("roi_heads.mask_",)),
}

# label index -> name for torchvision's COCO weights ("N/A" at the ids COCO leaves out)
COCO_CATEGORY_NAMES: tuple[str, ...] = tuple(
    detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])

_PREFIX = "torchvision:"
_CLASS_WEIGHT = "roi_heads.box_predictor.cls_score.weight"


def parse_model_name(spec: str) -> str:
    """``"torchvision:fasterrcnn_resnet50_fpn"`` -> ``"fasterrcnn_resnet50_fpn"``; ValueError naming the choices."""
    name = spec[len(_PREFIX):] if spec.startswith(_PREFIX) else None
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"--model must be torchvision:NAME with NAME one of {', '.join(TORCHVISION_MODELS)}; "
                         f"got {spec!r}")
    return name


def _read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    if not weights.is_file():
        raise ValueError(f"weights file not found: {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"cannot read weights file {weights}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint around it
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {weights} holds no state_dict (a dict of tensors)")
    return state


def load_torchvision_detector(name: str, weights: str | Path, device: torch.device | str = "cpu",
                              **kwargs) -> tuple[GeneralizedRCNN, tuple[str, ...]]:
    """torchvision's detector ``name`` (a key of :data:`TORCHVISION_MODELS`) with the weights of the file
    ``weights``: (model in eval mode on ``device``, the names of its labels 0..num_classes-1).

    The number of classes is read from the file. ``kwargs`` go to torchvision's builder (``min_size``,
    ``max_size``, ``box_score_thresh``, ``box_detections_per_img``, ...). ValueError for an unknown name, a file
    that is missing or unreadable, or weights of another architecture (naming a missing or unexpected key).
    """
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"unknown torchvision model {name!r}; choose one of {', '.join(TORCHVISION_MODELS)}")
    builder, dropped = TORCHVISION_MODELS[name]
    weights = Path(weights)
    state = _read_state_dict(weights)
    state = {k: v for k, v in state.items() if not k.startswith(dropped)} if dropped else state
    cls = state.get(_CLASS_WEIGHT)
    if cls is None or cls.dim() != 2:
        raise ValueError(f"weights file {weights} is not a {name} state_dict: it has no {_CLASS_WEIGHT}")
    num_classes = cls.shape[0]
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    # Built without weights, the model has plain BatchNorm2d where torchvision's weighted builders put
    # FrozenBatchNorm2d: its files (trained frozen) have no num_batches_tracked, a counter eval mode never reads.
    counters = {k: torch.zeros_like(v) for k, v in model.state_dict().items()
                if k.endswith(".num_batches_tracked") and k not in state}
    state = {**state, **counters}
    # torch's loading applies torchvision's own key upgrades (files written before torchvision 0.13, as the
    # official ones, name FPN's convolutions inner_blocks.0.weight, now inner_blocks.0.0.weight), so the check of
    # the keys is the one of load_state_dict
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of another shape
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = next((line for line in lines if line.startswith("size mismatch")), lines[-1] if lines else "")
        raise ValueError(f"weights file {weights} is not a {name} state_dict ({first.rstrip('.')}): is it another "
                         f"architecture?") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        which = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(f"weights file {weights} is not a {name} state_dict ({len(missing)} keys missing, "
                         f"{len(unexpected)} unexpected; {which}): is it another architecture?")
    _pool_only_given_maps(model)
    names = COCO_CATEGORY_NAMES if num_classes == len(COCO_CATEGORY_NAMES) else tuple(
        f"class {i}" for i in range(num_classes))
    return model.to(device).eval(), names


def _pool_only_given_maps(model: GeneralizedRCNN) -> None:
    """Make the box pooler name only the feature maps the backbone gives (see :func:`given_feature_maps`). The
    unswapped model computes the same either way: its pooler sees the same maps, and finds the same levels from
    their sizes."""
    pooler = model.roi_heads.box_roi_pool
    used = given_feature_maps(model, pooler.featmap_names)
    if used != list(pooler.featmap_names):
        pooler.featmap_names = used


def given_feature_maps(model: GeneralizedRCNN, names: list[str]) -> list[str]:
    """Those of ``names`` that ``model.backbone`` gives, in their order.

    ``fasterrcnn_mobilenet_v3_large_fpn``'s ``MultiScaleRoIAlign`` names maps "0" to "3" while its backbone gives
    "0", "1" and "pool"; torchvision's pooler skips the missing names silently, roikit's ``RoIPooler`` (what
    ``swap_roi_pooler`` puts in) refuses them. Runs the backbone once on a small image of zeros, in eval mode (in
    training mode BatchNorm would take it into its running statistics).
    """
    backbone = model.backbone
    was_training = backbone.training
    param = next(backbone.parameters(), None)
    backbone.eval()
    try:
        with torch.no_grad():  # the names do not depend on the image size
            out = backbone(torch.zeros(1, 3, 64, 64, device=None if param is None else param.device,
                                       dtype=None if param is None else param.dtype))
    finally:
        backbone.train(was_training)
    given = ["0"] if isinstance(out, torch.Tensor) else out.keys()  # one map: GeneralizedRCNN names it "0"
    return [name for name in names if name in given]


def label_to_category_id(class_names: tuple[str, ...], categories: list[dict], where: str) -> dict[int, int]:
    """The category id of each label of a torchvision detector, for the categories of an annotation file:
    ``{label: category id}`` for the labels that are category ids of the file (torchvision's labels ARE the
    category ids, so the map is the identity; detections of other labels, e.g. COCO's "N/A" ids, have no category
    in the file).

    Args:
        class_names: the names of the model's labels 0..num_classes-1 (:func:`load_torchvision_detector`'s).
        categories: the file's ``categories`` (``id`` and ``name``).
        where: the file, named in errors.

    ValueError when no category id of the file is a label of the model, or, for torchvision's COCO weights, when
    a category of the file has another name than the model's label of that id (the file does not use COCO's ids).
    """
    labels = {c["id"]: c["id"] for c in categories if 1 <= c["id"] < len(class_names)}
    if not labels:
        ids = sorted(c["id"] for c in categories)
        raise ValueError(f"{where}: none of its category ids ({ids[:5]}{'...' if len(ids) > 5 else ''}) is a label "
                         f"of the model (1..{len(class_names) - 1})")
    if class_names == COCO_CATEGORY_NAMES:
        for c in categories:
            if c["id"] in labels and c["name"].strip().lower() != class_names[c["id"]].lower():
                raise ValueError(f"{where}: category id {c['id']} is {c['name']!r}, but COCO's (the model's) id "
                                 f"{c['id']} is {class_names[c['id']]!r}: the file does not use COCO's category ids")
    return labels
