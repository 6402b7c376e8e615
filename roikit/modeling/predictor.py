"""The box predictor: a region's feature vector -> class scores and class-specific box deltas."""
from __future__ import annotations

from torch import Tensor, nn

from ..utils.checks import check_int

__all__ = ["FastRCNNPredictor"]


class FastRCNNPredictor(nn.Module):
    """Two linear layers side by side, as in Fast R-CNN.

    ``cls_score`` gives ``num_classes + 1`` logits (index 0 is the background); ``bbox_pred`` gives deltas
    (tx, ty, tw, th) for every class, background included, which is the layout torchvision's ``RoIHeads``
    decodes with its box coder. The losses (cross-entropy, smooth L1 on the true class's deltas of foreground
    regions) and the inference (decode, per-class NMS) are ``RoIHeads``'.

    Args:
        in_features (int): the box head's ``out_features``.
        num_classes (int): object classes, without the background.
    """

    def __init__(self, *, in_features: int, num_classes: int) -> None:
        super().__init__()
        check_int(in_features, "FastRCNNPredictor: in_features", minimum=1)
        check_int(num_classes, "FastRCNNPredictor: num_classes", minimum=1)
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, (num_classes + 1) * 4)
        # Detectron's initialisation: small outputs at the start, so early losses are those of a uniform guess
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Tensor[K, in_features] -> (scores Tensor[K, num_classes + 1], deltas Tensor[K, 4 * (num_classes + 1)])."""
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)
