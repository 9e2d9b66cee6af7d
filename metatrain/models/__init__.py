"""Backbones: the built-in CIFAR ResNet, few-shot ConvNet and small CNN, and any timm model by name."""

from __future__ import annotations

import re

from torch import nn

from ..utils import require
from .cifar_resnet import BasicBlock, CifarResNet, ShortcutA
from .conv import ConvNet
from .fewshot import (
    FEWSHOT_HEADS,
    FewShotClassifier,
    MatchingNetHead,
    ProtoNetHead,
    RelationNetHead,
    build_fewshot_model,
    class_means,
)
from .small_cnn import SmallCNN

BUILTIN_MODELS = ("cifar_resnet32", "cifar_resnet<depth>", "conv<depth>", "small_cnn")
_CIFAR_RESNET = re.compile(r"cifar_resnet(\d+)")
_CONV = re.compile(r"conv(\d+)")
_SMALL_CNN_BASE_WIDTH = 32
_CONV_BASE_WIDTH = 32


def build_model(name: str, num_classes: int, in_chans: int = 3, width: int = 1, **kwargs) -> nn.Module:
    """Builds a freshly initialized image classifier that maps `[B, in_chans, H, W]` to logits `[B, num_classes]`.

    Args:
        name (`str`):
            `"cifar_resnet32"` or any `"cifar_resnet<depth>"` with `(depth - 2) % 6 == 0` ([`CifarResNet`]),
            `"conv<depth>"` (MAML's few-shot [`ConvNet`] of `depth` blocks: `"conv4"` for ANIL and Meta-Weight-Net,
            `"conv3"` for WarpGrad), `"small_cnn"` ([`SmallCNN`]), or the name of a timm model (see
            `timm.list_models()`).
        num_classes (`int`):
            Size of the output logits.
        in_chans (`int`, *optional*, defaults to 3):
            Channels of the input images.
        width (`int`, *optional*, defaults to 1):
            Width multiplier of the built-in models (stage widths `16/32/64 * width` for the CIFAR ResNet,
            `32 * width` channels for the ConvNet and the small CNN). timm models take their own options as `kwargs`
            instead, and only accept `width=1`.
        kwargs:
            Passed on to the model's constructor: to [`CifarResNet`] / [`ConvNet`] / [`SmallCNN`] (e.g.
            `norm_layer`) or to `timm.create_model` (e.g. `drop_rate`). timm models are never pretrained: nothing
            is downloaded.

    Returns:
        `nn.Module`: the model.
    """
    match = _CIFAR_RESNET.fullmatch(name)
    if match:
        return CifarResNet(int(match.group(1)), num_classes=num_classes, width=width, in_chans=in_chans, **kwargs)
    match = _CONV.fullmatch(name)
    if match:
        depth = int(match.group(1))
        return ConvNet(depth, num_classes=num_classes, in_chans=in_chans, width=_CONV_BASE_WIDTH * width, **kwargs)
    if name == "small_cnn":
        return SmallCNN(num_classes=num_classes, in_chans=in_chans, width=_SMALL_CNN_BASE_WIDTH * width, **kwargs)
    timm = require("timm", "vision", "timm models")
    if not timm.is_model(name):
        raise ValueError(
            f"Unknown model name {name!r}: choose one of the built-in models {list(BUILTIN_MODELS)} or a timm model "
            "(see `timm.list_models()`)."
        )
    if width != 1:
        raise ValueError(
            f"width={width} only applies to the built-in models {list(BUILTIN_MODELS)}; pass the options of the timm "
            f"model {name!r} as keyword arguments instead."
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


__all__ = [
    "BUILTIN_MODELS",
    "FEWSHOT_HEADS",
    "BasicBlock",
    "CifarResNet",
    "ConvNet",
    "FewShotClassifier",
    "MatchingNetHead",
    "ProtoNetHead",
    "RelationNetHead",
    "ShortcutA",
    "SmallCNN",
    "build_fewshot_model",
    "build_model",
    "class_means",
]
