"""The box head's feature extractor: pooled region features -> a vector per region (Fast R-CNN's fc6, fc7)."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

__all__ = ["FastRCNNFCHead"]


class FastRCNNFCHead(nn.Module):
    """Flatten each region's pooled features, then fully connected layers with ReLU.

    Takes the output of any roikit pooler: ``Tensor[K, C, PH, PW]`` from ``roi_pool``/``roi_align``/``prroi_pool``
    or ``Tensor[K, D]`` from ``roi_spp`` (``RoIPooler.output_shape(channels)`` gives ``input_shape`` for both).

    Args:
        input_shape (Sequence[int]): one region's pooled shape, ``(C, PH, PW)`` or ``(D,)``.
        fc_dims (Sequence[int]): widths of the fully connected layers; ``out_features`` is the last one.
    """

    def __init__(self, *, input_shape: Sequence[int], fc_dims: Sequence[int] = (1024, 1024)) -> None:
        super().__init__()
        input_shape, fc_dims = tuple(input_shape), tuple(fc_dims)
        if not input_shape or not all(isinstance(n, int) and n > 0 for n in input_shape):
            raise ValueError(f"FastRCNNFCHead: input_shape must be positive ints, got {input_shape}")
        if not fc_dims or not all(isinstance(n, int) and n > 0 for n in fc_dims):
            raise ValueError(f"FastRCNNFCHead: fc_dims must be a non-empty list of positive ints, got {fc_dims}")
        self.input_shape = input_shape
        layers: list[nn.Module] = [nn.Flatten(start_dim=1)]
        in_features = math.prod(input_shape)
        for width in fc_dims:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[K, *input_shape] -> Tensor[K, out_features]."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"FastRCNNFCHead: expected pooled features [K, {', '.join(map(str, self.input_shape))}],"
                             f" got {list(x.shape)}")
        return self.layers(x)
