"""The CIFAR ResNet of He et al. (option-A shortcuts), the backbone of Meta-Weight-Net's CIFAR experiments."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ShortcutA(nn.Module):
    """The parameter-free "option A" shortcut of He et al.: subsample the spatial grid by `stride` and zero-pad the
    channels from `in_chans` to `out_chans` (half of the padding before the input channels, the rest after).

    Args:
        in_chans (`int`):
            Channels of the input.
        out_chans (`int`):
            Channels of the output; at least `in_chans`.
        stride (`int`, *optional*, defaults to 2):
            Spatial subsampling step.
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int = 2):
        super().__init__()
        if out_chans < in_chans:
            raise ValueError(f"ShortcutA pads channels, so out_chans ({out_chans}) must be >= in_chans ({in_chans}).")
        self.stride = stride
        self.pad_before = (out_chans - in_chans) // 2
        self.pad_after = out_chans - in_chans - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with a residual connection; the shortcut is [`ShortcutA`] when the shape changes.

    Args:
        in_chans (`int`):
            Channels of the input.
        out_chans (`int`):
            Channels of the output.
        stride (`int`, *optional*, defaults to 1):
            Stride of the first convolution.
        norm_layer (`Callable[[int], nn.Module]`, *optional*, defaults to `nn.BatchNorm2d`):
            Builds a normalization layer from a channel count.
    """

    def __init__(
        self, in_chans: int, out_chans: int, stride: int = 1, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(out_chans)
        if stride != 1 or in_chans != out_chans:
            self.shortcut = ShortcutA(in_chans, out_chans, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # In place, as the reference code: no batch norm backward reads its output, and it saves one activation-sized
        # temporary per block (the same values as `out + shortcut`).
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. ("Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2), as used
    by Meta-Weight-Net: a 3x3 conv stem, three stages of `(depth - 2) / 6` [`BasicBlock`]s with widths 16, 32, 64
    (times `width`) and strides 1, 2, 2, parameter-free option-A shortcuts ([`ShortcutA`]), global average pooling
    and a linear head. Convolution and linear weights get Kaiming-normal initialization.

    ResNet-32 (`depth=32`, 5 blocks per stage) has 464,154 parameters at `width=1` with 10 classes (0.46M), and
    470,004 with 100 classes.

    Args:
        depth (`int`, *optional*, defaults to 32):
            Number of weighted layers; `(depth - 2) % 6 == 0` (20, 32, 44, 56, 110, ...).
        num_classes (`int`, *optional*, defaults to 10):
            Size of the output logits.
        width (`int`, *optional*, defaults to 1):
            Multiplier of the stage widths 16, 32, 64.
        in_chans (`int`, *optional*, defaults to 3):
            Channels of the input images.
        norm_layer (`Callable[[int], nn.Module]`, *optional*, defaults to `nn.BatchNorm2d`):
            Builds a normalization layer from a channel count.
    """

    def __init__(
        self,
        depth: int = 32,
        num_classes: int = 10,
        width: int = 1,
        in_chans: int = 3,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CifarResNet needs depth = 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got depth={depth}."
            )
        if width < 1:
            raise ValueError(f"CifarResNet needs width >= 1, got width={width}.")
        blocks_per_stage = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        stages, chans = [], widths[0]
        for out_chans, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(chans, out_chans, stride if i == 0 else 1, norm_layer=norm_layer))
                chans = out_chans
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans, num_classes)
        self.num_classes = num_classes
        self.num_features = chans
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images `[B, in_chans, H, W]` to logits `[B, num_classes]`."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
