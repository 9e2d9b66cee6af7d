"""A small convolutional network for tiny images such as the 8x8 scikit-learn digits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three 3x3 conv-norm-ReLU layers for tiny images: `conv(in_chans, w)`, `conv(w, 2w)`, 2x2 max-pool,
    `conv(2w, 2w)`, global average pooling and a linear head. Convolutions have no bias (a norm layer follows).

    With `width=32`, `in_chans=1` and 10 classes (the 8x8 digits) it has 56,554 parameters.

    Args:
        num_classes (`int`, *optional*, defaults to 10):
            Size of the output logits.
        in_chans (`int`, *optional*, defaults to 1):
            Channels of the input images.
        width (`int`, *optional*, defaults to 32):
            Channels of the first convolution; the others have `2 * width`.
        norm_layer (`Callable[[int], nn.Module]`, *optional*, defaults to `nn.BatchNorm2d`):
            Builds a normalization layer from a channel count.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        width: int = 32,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"SmallCNN needs width >= 1, got width={width}.")

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_chans, width), *conv(width, 2 * width), nn.MaxPool2d(2), *conv(2 * width, 2 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        self.num_classes = num_classes
        self.num_features = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images `[B, in_chans, H, W]` (H, W >= 2) to logits `[B, num_classes]`."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
