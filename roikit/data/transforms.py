"""Detection transforms: callables ``(image, target) -> (image, target)`` that keep boxes in step with the image.

``image`` is a Tensor[3, H, W] (``CocoDetection`` already makes it one); ``target["boxes"]`` is Tensor[L, 4]
x1, y1, x2, y2 in pixels. Randomness comes from torch's generator, so DataLoader workers get their own streams.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Compose", "RandomHorizontalFlip"]


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; a box [x1, x2] becomes [W - x2, W - x1]."""

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be a number in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if torch.rand(()) >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"
