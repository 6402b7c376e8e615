"""Backbones: a small CNN that trains from scratch on a CPU, and torchvision's ResNet + FPN for real data.

Every backbone maps ``Tensor[N, 3, H, W]`` to an ordered dict of feature maps and has ``out_channels`` (the same for
every map), which is what torchvision's RPN and ``RoIHeads`` expect.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..utils.checks import check_choice, check_int

__all__ = ["SmallConvNet", "resnet_fpn", "NORMS"]

NORMS = ("bn", "gn", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


def _conv(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none"),
        _norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class SmallConvNet(nn.Module):
    """A VGG-style CNN: a stride-2 stem, then stages of (3x3 stride-2 conv, ``depth - 1`` 3x3 convs).

    ``log2(stride)`` stride-2 steps in all: ``stride=16`` is the stem and 3 stages, ``stride=32`` adds a fourth.
    Stage ``i`` has ``channels[i]`` channels (the stem ``channels[0]``); the output is the last stage's map, named
    ``"0"``.

    Args:
        stride (int): 16 or 32, the output's stride in image pixels.
        channels (Sequence[int]): one width per stride-2 step (4 for stride 16, 5 for stride 32).
        depth (int): convolutions per stage (the first one downsamples).
        norm (str): ``"bn"`` (BatchNorm), ``"gn"`` (GroupNorm, for small batches) or ``"none"``.
    """

    def __init__(self, *, stride: int = 16, channels: Sequence[int] = (16, 32, 64, 128), depth: int = 2,
                 norm: str = "bn") -> None:
        super().__init__()
        if stride not in (16, 32):
            raise ValueError(f"SmallConvNet: stride must be 16 or 32, got {stride!r}")
        steps = stride.bit_length() - 1
        channels = list(channels)
        if len(channels) != steps:
            raise ValueError(f"SmallConvNet: stride {stride} needs {steps} positive channel widths, got {channels}")
        for i, c in enumerate(channels):
            check_int(c, f"SmallConvNet: channels[{i}]", minimum=1)
        check_int(depth, "SmallConvNet: depth", minimum=1)
        check_choice(norm, "SmallConvNet: norm", NORMS)
        layers = [_conv(3, channels[0], 2, norm)]  # stem, stride 2
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers.append(_conv(c_in, c_out, 2, norm))
            layers.extend(_conv(c_out, c_out, 1, norm) for _ in range(depth - 1))
        self.body = nn.Sequential(*layers)
        self.stride = stride
        self.out_channels = channels[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.body(x))])


def resnet_fpn(*, depth: int = 50, weights: str | None = None, trainable_layers: int = 3,
               out_channels: int = 256) -> nn.Module:
    """torchvision's ResNet + FPN (``BackboneWithFPN``): maps ``"0"``-``"3"`` (strides 4-32) and ``"pool"``.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        weights (str, optional): ImageNet weights of the ResNet: a local file (a ResNet ``state_dict``, or a dict
            holding one under ``"model"`` or ``"state_dict"``), or a torchvision weights name such as
            ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloaded, so only where the machine is online); ``None``:
            random initialisation.
        trainable_layers (int): 0-5, how many of the last stages train; the others and all BatchNorms are frozen
            (torchvision's ``FrozenBatchNorm2d``), as torchvision does for detection.
    """
    from torchvision.models import get_model, get_weight
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"resnet_fpn: depth must be 18, 34, 50, 101 or 152, got {depth!r}")
    if check_int(trainable_layers, "resnet_fpn: trainable_layers", minimum=0) > 5:
        raise ValueError(f"resnet_fpn: trainable_layers must be <= 5 (ResNet has 5 stages), got {trainable_layers}")
    tv_weights = None
    state = None
    if weights is not None:
        if Path(weights).is_file():
            state = _load_state_dict(weights)
        elif "_Weights." in weights:
            try:
                tv_weights = get_weight(weights)
            except (ValueError, KeyError) as e:
                raise ValueError(f"resnet_fpn: unknown torchvision weights {weights!r}") from e
        else:
            raise ValueError(f"resnet_fpn: weights file not found: {weights}")
    resnet = get_model(f"resnet{depth}", weights=tv_weights, norm_layer=FrozenBatchNorm2d)
    if state is not None:
        missing, unexpected = resnet.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        unexpected = [k for k in unexpected if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"resnet_fpn: {weights} is not a resnet{depth} state dict: "
                             f"{len(missing)} missing keys (e.g. {missing[:2]}), "
                             f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")

    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in resnet.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)

    stage_channels = resnet.inplanes // 8  # layer1's output width: 64 (basic blocks) or 256 (bottlenecks)
    return BackboneWithFPN(
        resnet,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[stage_channels * 2**i for i in range(4)],
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _load_state_dict(path: str) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"cannot read weights file {path}: {e}") from e
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict")
    return state
