"""Models with roikit's ops out of Python: ONNX and ``torch.export``.

* :func:`onnx_export`: ``torch.onnx.export`` with the dynamo exporter (torch's default since 2.9) and
  :func:`onnx_translation_table`, which writes every ``torch.ops.roikit.*`` op as standard ONNX operators
  (``RoiAlign``, ``MaxRoiPool``, ``MatMul``, ...): the model runs in plain onnxruntime, no custom op library.
* :func:`torch_export`: ``torch.export.export`` (``strict=False``) of a model with roikit's ops, e.g. a whole
  detector, under :func:`export_friendly_nms`.
* :func:`export_friendly_nms`: torchvision's ``batched_nms`` without its branch on the number of boxes, which
  ``torch.export`` cannot trace (the count is data-dependent); the same boxes are kept.

See ``docs/export.md`` for the commands, what maps to what and the measured differences.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import ops as _ops  # noqa: F401  (registers torch.ops.roikit.*)

__all__ = ["onnx_translation_table", "onnx_export", "torch_export", "export_friendly_nms", "batched_nms"]


def onnx_translation_table() -> dict[Callable, Callable]:
    """``{torch.ops.roikit.<op>.default: its ONNX translation}`` for ``torch.onnx.export(...,
    custom_translation_table=...)`` (dynamo exporter; needs ``onnxscript``).

    Every op becomes standard ONNX (opset 18 operators): ``roi_align`` (avg) ``RoiAlign``, ``roi_pool``
    ``MaxRoiPool`` (both rounding rules), ``multilevel_roi_align`` the FPN level rule and ``RoiAlign`` per level,
    ``roi_align(pool="max")``, ``prroi_pool``, ``ps_roi_align`` and ``ps_roi_pool`` two ``MatMul``s with per-box
    weight matrices, ``deform_roi_pool`` the same with per-bin weights. ``roi_spp`` is ``roi_pool`` at each level.
    ``roi_align_rotated`` (fixed ``sampling_ratio > 0`` only; adaptive sampling raises ``ValueError``) lays out its
    rotated samples with ``Cos`` / ``Sin``, ``Gather``s their four bilinear taps and pools chunks of boxes in a
    ``Scan``, so memory does not grow with the number of boxes. The translations are for inference: the argmax
    outputs of ``roi_pool`` and ``roi_align(pool="max")`` are not exported (zeros)."""
    from . import _onnx_ops as t
    from ._onnx_rotated import roi_align_rotated

    roikit = torch.ops.roikit
    return {
        roikit.roi_align.default: t.roi_align,
        roikit.roi_pool.default: t.roi_pool,
        roikit.prroi_pool.default: t.prroi_pool,
        roikit.multilevel_roi_align.default: t.multilevel_roi_align,
        roikit.ps_roi_align.default: t.ps_roi_align,
        roikit.ps_roi_pool.default: t.ps_roi_pool,
        roikit.deform_roi_pool.default: t.deform_roi_pool,
        roikit.roi_align_rotated.default: roi_align_rotated,
    }


def onnx_export(model: torch.nn.Module, args: tuple[Any, ...], f: str | None = None, *,
                custom_translation_table: dict[Callable, Callable] | None = None, **kwargs) -> torch.onnx.ONNXProgram:
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with roikit's translations (and yours on top),
    under :func:`export_friendly_nms`. Returns the ``ONNXProgram`` (``.save(path)``; ``f`` also writes it).

    ``kwargs`` go to ``torch.onnx.export`` (``input_names``, ``dynamic_shapes``, ``opset_version``, ...). Put the
    model in eval mode first; the export traces it for the given ``args``. A setting that a translation cannot
    export (``roi_align_rotated`` with adaptive sampling) raises ``ValueError`` with the translation's message.
    """
    table = {**onnx_translation_table(), **(custom_translation_table or {})}
    with export_friendly_nms():
        try:
            return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
        except Exception as error:  # a setting a translation refuses: its own message, not the exporter's report
            refused = _refusal(error)
            if refused is None:
                raise
            raise ValueError(str(refused)) from error


def _refusal(error: BaseException | None) -> BaseException | None:
    """The :class:`~roikit.export._onnx_rotated.UnsupportedExport` in the chain of causes of ``error``, if any."""
    from ._onnx_rotated import UnsupportedExport

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UnsupportedExport):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def torch_export(model: torch.nn.Module, args: tuple[Any, ...], **kwargs) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args, strict=False, ...)`` under :func:`export_friendly_nms`, so that a whole
    torchvision-style detector (RPN, NMS, roikit's pooler, box head, post-processing) exports."""
    kwargs.setdefault("strict", False)
    with export_friendly_nms():
        return torch.export.export(model, args, **kwargs)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms`` without a branch on the number of boxes: NMS per category by moving each
    category's boxes ``idx * (2 M + 1)`` away, ``M`` the largest absolute coordinate (0 without boxes), so no two
    categories overlap. Returns the kept indices, by decreasing score, as torchvision's."""
    from torchvision.ops import nms

    largest = torch.cat([boxes.flatten().abs(), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (2 * largest + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


@contextlib.contextmanager
def export_friendly_nms():
    """Inside the block, ``torchvision.ops.boxes.batched_nms`` (what torchvision's RPN and ``RoIHeads`` call) is
    :func:`batched_nms`. torchvision's own version branches on ``boxes.numel()`` (empty input, and a per-category
    loop above 4000 values on the CPU): under ``torch.export`` the number of boxes left after the score and size
    filters is data-dependent and the branch fails with ``GuardOnDataDependentSymNode``."""
    from torchvision.ops import boxes as box_ops

    previous = box_ops.batched_nms
    box_ops.batched_nms = batched_nms
    try:
        yield
    finally:
        box_ops.batched_nms = previous
