"""ResNets for small images (He et al. 2016, "Deep residual learning"; "Identity mappings", pre-activation).

CIFAR variant: the ImageNet stem (7x7 stride-2 conv + max-pool) is replaced by one 3x3 stride-1 convolution,
stages of 64/128/256/512 channels (x4 for Bottleneck) with strides 1/2/2/2, global average pooling, linear.
For ``image_size >= 64`` (Tiny ImageNet) the first stage has stride 2 instead of 1: ``conv1`` still sees the
full-resolution image, and from the second stage on every feature map has the size it has for a 32x32
input (64x64 -> 32x32 after ``layer1``, 8x8 before pooling), so the cost is close to the CIFAR model's.
Stride on the 3x3 convolution of a Bottleneck; projection shortcuts (1x1 conv) only where the shape changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastrobust.models.base import NormalizedModel

ActFactory = Callable[[], nn.Module]


def first_stage_stride(image_size: int) -> int:
    """1 for CIFAR-sized inputs, 2 for 64x64 and larger (see the module docstring)."""
    return 2 if image_size >= 64 else 1


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, plus the shortcut, then act."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, act: ActFactory):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = act()
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1-BN-act-conv3x3(stride)-BN-act-conv1x1(x4)-BN, plus the shortcut, then act."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, act: ActFactory):
        super().__init__()
        out_channels = self.expansion * channels
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = act()
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = act()
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.act3 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


class ResNet(NormalizedModel):
    """Post-activation ResNet: conv1-bn1-act, layer1..layer4, global average pooling, fc."""

    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], num_blocks: tuple[int, int, int, int], *,
        num_classes: int, in_channels: int, act: ActFactory, image_size: int, mean=None, std=None,
    ):
        super().__init__(in_channels, mean, std)
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = act()
        self._channels = 64
        strides = (first_stage_stride(image_size), 2, 2, 2)
        self.layer1 = self._stage(block, 64, num_blocks[0], strides[0], act)
        self.layer2 = self._stage(block, 128, num_blocks[1], strides[1], act)
        self.layer3 = self._stage(block, 256, num_blocks[2], strides[2], act)
        self.layer4 = self._stage(block, 512, num_blocks[3], strides[3], act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _stage(self, block, channels: int, count: int, stride: int, act: ActFactory) -> nn.Sequential:
        blocks = []
        for index in range(count):
            blocks.append(block(self._channels, channels, stride if index == 0 else 1, act))
            self._channels = channels * block.expansion
        return nn.Sequential(*blocks)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., "Identity mappings in deep residual networks", 2016):
    BN-act-conv3x3-BN-act-conv3x3 plus the identity; where the shape changes, the 1x1 projection shortcut
    takes the pre-activated input (BN-act(x)), as in the paper's full pre-activation unit."""

    def __init__(self, in_channels: int, channels: int, stride: int, act: ActFactory):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = act()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = act()
        self.conv2 = _conv3x3(channels, channels)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class PreActResNet(NormalizedModel):
    """PreActResNet-18: conv1, layer1..layer4 of PreActBlocks, final BN-act, global average pooling, fc.

    The final BN-act is part of the pre-activation design (the last unit's output is otherwise never
    normalised); it is what Wong et al.'s fast-AT code uses too. 11,172,170 parameters for 10 classes
    (11,171,146 without the final BN).
    """

    def __init__(
        self, num_blocks: tuple[int, int, int, int], *, num_classes: int, in_channels: int, act: ActFactory,
        image_size: int, mean=None, std=None,
    ):
        super().__init__(in_channels, mean, std)
        self.conv1 = _conv3x3(in_channels, 64)
        channels_in = 64
        strides = (first_stage_stride(image_size), 2, 2, 2)
        for index, (channels, count, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, strides), start=1):
            blocks = []
            for block_index in range(count):
                blocks.append(PreActBlock(channels_in, channels, stride if block_index == 0 else 1, act))
                channels_in = channels
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(512)
        self.act = act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.act(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))
