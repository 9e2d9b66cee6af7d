"""The few-shot convolutional backbone of MAML (`conv4`), the network of ANIL's and WarpGrad's experiments."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ConvNet(nn.Module):
    """The backbone of Finn et al. ("Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017):
    `depth` blocks of 3x3 convolution (padding 1, `width` channels), norm, ReLU and 2x2 max-pooling, then global
    average pooling and a linear head. Convolutions have no bias (the norm that follows cancels it); the average
    pooling replaces MAML's flatten, so the head's size does not depend on the image size.

    The blocks are `features.0` to `features.{depth - 1}` (each `conv, norm, relu, pool`), the head is `head`. With
    `C` input channels, width `w` and `K` classes it has `9 C w + 9 w^2 (depth - 1) + 2 w depth + (w + 1) K`
    parameters: 28,933 for `depth=4`, `w=32`, `C=3` and 5 classes. Images need at least `2**depth` pixels a side.

    Args:
        depth (`int`, *optional*, defaults to 4):
            Number of blocks (4 for ANIL and Meta-Weight-Net, 3 for WarpGrad in HyperDistill's experiments).
        num_classes (`int`, *optional*, defaults to 5):
            Size of the output logits.
        in_chans (`int`, *optional*, defaults to 3):
            Channels of the input images.
        width (`int`, *optional*, defaults to 32):
            Channels of every convolution.
        norm_layer (`Callable[[int], nn.Module]`, *optional*, defaults to `nn.BatchNorm2d`):
            Builds a normalization layer from a channel count.
    """

    def __init__(
        self,
        depth: int = 4,
        num_classes: int = 5,
        in_chans: int = 3,
        width: int = 32,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}.")

        def block(cin: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, width, 3, padding=1, bias=False), norm_layer(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )  # fmt: skip

        self.features = nn.Sequential(*(block(in_chans if i == 0 else width) for i in range(depth)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)
        self.depth = depth
        self.num_classes = num_classes
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images `[B, in_chans, H, W]` (H, W >= `2**depth`) to logits `[B, num_classes]`."""
        if min(x.shape[-2:]) < 2**self.depth:
            raise ValueError(
                f"ConvNet of depth {self.depth} halves the image {self.depth} times, so it needs images of at least "
                f"{2**self.depth} pixels a side, got {tuple(x.shape[-2:])}: use a shallower network or larger images."
            )
        return self.head(torch.flatten(self.pool(self.features(x)), 1))
