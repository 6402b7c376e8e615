"""The box head's feature extractor: pooled region features -> a vector per region.

Three stages, each optional, in the order detectron2's ``FastRCNNConvFCHead`` uses:

    [K, C, PH, PW] --3x3 convs--> [K, C', PH, PW] --head pool--> [K, D] --fc layers--> [K, out_features]

The *head pool* is where a pooling-family layer goes after region pooling:

=====================  ==============================================================================================
``pool``               what it does to each region's ``[C, PH, PW]`` (``pool_options`` are the layer's arguments)
=====================  ==============================================================================================
``none``               flatten: ``C * PH * PW`` (Fast R-CNN's fc6 input, the default)
``global_avg``         global average pooling: ``C`` (a ResNet-style classification head: few weights, no layout)
``global_max``         global max pooling: ``C``
``avg``, ``max``       windowed pooling, ``Pool2d(kernel_size, stride, ...)``, then flatten
``overlapping_max``    kernel 3, stride 2 as in AlexNet (``OverlappingMaxPool2d``): 7x7 -> 3x3, then flatten
``stochastic``         ``StochasticPool2d(kernel_size, stride)``: draws in training, weighted average in eval; needs
                       non-negative features (a ReLU'd backbone or ``conv_dims``)
``bilinear``           ``BilinearPool``: ``C * C`` second-order features (signed sqrt, L2 norm)
``compact_bilinear``   ``CompactBilinearPool(C, output_dim=...)``: the Tensor Sketch of the same, ``output_dim``
``spp``                ``SpatialPyramidPooling(levels, mode)`` on the pooled grid: ``C * sum(l * l)``
=====================  ==============================================================================================

With a global pool, ``fc_dims`` may be empty: the predictor then reads the pooled ``C`` channels directly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import (
    BilinearPool,
    CompactBilinearPool,
    GlobalPool,
    OverlappingMaxPool2d,
    Pool2d,
    SpatialPyramidPooling,
    StochasticPool2d,
)
from ..utils.checks import check_choice, check_int

__all__ = ["FastRCNNConvFCHead", "build_head_pool", "pooled_dim", "HEAD_POOLS"]

HEAD_POOLS = ("none", "global_avg", "global_max", "avg", "max", "overlapping_max", "stochastic", "bilinear",
              "compact_bilinear", "spp")


def _positive_ints(values: Sequence[int], name: str, *, allow_empty: bool) -> tuple[int, ...]:
    values = tuple(values)
    if not values and not allow_empty:
        raise ValueError(f"FastRCNNConvFCHead: {name} must be a non-empty list of positive ints, got []")
    for i, n in enumerate(values):
        check_int(n, f"FastRCNNConvFCHead: {name}[{i}]", minimum=1)
    return values


def build_head_pool(name: str, channels: int, options: Mapping[str, Any] | None = None) -> nn.Module:
    """The pooling-family layer ``name`` (one of :data:`HEAD_POOLS`) for ``channels``-channel region features.

    Returns a module mapping ``Tensor[K, channels, PH, PW]`` to ``Tensor[K, D]`` (flattened where the layer keeps
    a grid). ``options`` are the layer's own keyword arguments; an unknown one is a ``ValueError``.
    """
    options = dict(options or {})
    check_choice(name, "head pool", HEAD_POOLS)
    if name == "none" and options:
        raise ValueError(f"head pool 'none' (flatten) takes no options, got {options}")
    makers = {
        "none": lambda: nn.Flatten(1),
        "global_avg": lambda: GlobalPool("avg", **options),
        "global_max": lambda: GlobalPool("max", **options),
        "avg": lambda: Pool2d(mode="avg", **{"kernel_size": 2, **options}),
        "max": lambda: Pool2d(mode="max", **{"kernel_size": 2, **options}),
        "overlapping_max": lambda: OverlappingMaxPool2d(**options),
        "stochastic": lambda: StochasticPool2d(**{"kernel_size": 2, **options}),
        "bilinear": lambda: BilinearPool(**options),
        "compact_bilinear": lambda: CompactBilinearPool(channels, **{"output_dim": 4096, **options}),
        "spp": lambda: SpatialPyramidPooling(**options),
    }
    try:
        pool = makers[name]()
    except TypeError as e:  # an option the layer does not take
        raise ValueError(f"head pool {name!r}: options {options} do not fit: {e}") from e
    if name in ("avg", "max", "overlapping_max", "stochastic"):
        return nn.Sequential(pool, nn.Flatten(1))
    return pool


def pooled_dim(layers: nn.Module, input_shape: Sequence[int]) -> int:
    """The size of one region's ``[K, D]`` output of ``layers`` for inputs of ``input_shape``, from one probe run
    (in eval mode, without gradients; the layers' mode is restored). A ``ValueError`` when the input does not fit
    (a pooling window larger than the grid)."""
    was_training = layers.training
    layers.eval()
    try:
        with torch.no_grad():
            return int(layers(torch.ones(1, *input_shape)).shape[1])
    except RuntimeError as e:
        raise ValueError(f"does not fit pooled features {list(input_shape)}: {e}") from None
    finally:
        layers.train(was_training)


class FastRCNNConvFCHead(nn.Module):
    """3x3 convolutions, a head pool, then fully connected layers, each with ReLU (see the module docstring).

    Takes the output of any roikit pooler: ``Tensor[K, C, PH, PW]`` from ``roi_pool``/``roi_align``/``prroi_pool``
    or ``Tensor[K, D]`` from ``roi_spp`` (``RoIPooler.output_shape(channels)`` gives ``input_shape`` for both; a
    ``[K, D]`` input takes neither convolutions nor a head pool).

    Args:
        input_shape (Sequence[int]): one region's pooled shape, ``(C, PH, PW)`` or ``(D,)``.
        fc_dims (Sequence[int]): widths of the fully connected layers; ``out_features`` is the last one. May be
            empty: ``out_features`` is then the head pool's output size.
        conv_dims (Sequence[int]): widths of 3x3 convolutions (padding 1) run on the pooled grid first.
        pool (str): the head pool, one of :data:`HEAD_POOLS`.
        pool_options (Mapping): the head pool layer's arguments (e.g. ``{"output_dim": 2048}``).

    Layer ``layers`` is one ``nn.Sequential``: convolutions, the head pool, then the fc layers, so the plain
    Fast R-CNN head (``pool="none"``) is ``[Flatten, Linear, ReLU, Linear, ReLU]``.
    """

    def __init__(self, *, input_shape: Sequence[int], fc_dims: Sequence[int] = (1024, 1024),
                 conv_dims: Sequence[int] = (), pool: str = "none",
                 pool_options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        input_shape = _positive_ints(input_shape, "input_shape", allow_empty=False)
        fc_dims = _positive_ints(fc_dims, "fc_dims", allow_empty=True)
        conv_dims = _positive_ints(conv_dims, "conv_dims", allow_empty=True)
        if len(input_shape) not in (1, 3):
            raise ValueError(f"FastRCNNConvFCHead: input_shape must be (C, PH, PW) or (D,), got {list(input_shape)}")
        if len(input_shape) == 1 and (conv_dims or pool != "none"):
            raise ValueError(f"FastRCNNConvFCHead: features of shape {list(input_shape)} (roi_spp) are already "
                             f"vectors; they take no conv_dims and no head pool (got {list(conv_dims)}, {pool!r})")
        self.input_shape = input_shape
        self.pool = pool
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for width in conv_dims:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(build_head_pool(pool, channels, pool_options))
        try:
            in_features = pooled_dim(nn.Sequential(*layers), input_shape)
        except ValueError as e:
            raise ValueError(f"FastRCNNConvFCHead: head pool {pool!r} with options {dict(pool_options or {})}: {e}"
                             ) from None
        for width in fc_dims:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[K, *input_shape] -> Tensor[K, out_features]."""
        if isinstance(x, Tensor) and tuple(x.shape[1:]) != self.input_shape:  # (not a torch.fx Proxy)
            raise ValueError(f"FastRCNNConvFCHead: expected pooled features [K, {', '.join(map(str, self.input_shape))}"
                             f"], got {list(x.shape)}")
        return self.layers(x)
