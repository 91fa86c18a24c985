"""Small convolutional networks: ``tinycnn`` (for fast CPU tests) and ``smallcnn`` (TRADES' MNIST network)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastrobust.errors import ConfigError
from fastrobust.models.base import NormalizedModel

ActFactory = Callable[[], nn.Module]


class _ConvBNAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int, act: ActFactory):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = act()


class TinyCNN(NormalizedModel):
    """Four 3x3 conv-BN-activation layers, global average pooling and a linear head (~61k parameters at width 16).

    Channels (w, 2w, 4w, 4w) with strides (2, 1, 2, 2): a 32x32 input is 16x16 after ``conv1``, 4x4 at
    the end. Names: ``conv1`` (the first convolution, before its BN and activation), ``layer1`` (the first
    block after it), ``layer2``, ``layer3``, ``fc``. Built to be fast on a CPU: a forward+backward of 128
    CIFAR images takes a few hundredths of a second on two cores.
    """

    def __init__(self, *, num_classes: int, in_channels: int, act: ActFactory, mean=None, std=None, width: int = 16):
        super().__init__(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = act()
        self.layer1 = _ConvBNAct(width, 2 * width, 1, act)
        self.layer2 = _ConvBNAct(2 * width, 4 * width, 2, act)
        self.layer3 = _ConvBNAct(4 * width, 4 * width, 2, act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def smallcnn_feature_size(image_size: int) -> int:
    """Side of SmallCNN's last feature map: two unpadded 3x3 convs and a 2x2 max-pool, twice."""
    side = image_size
    for _ in range(2):
        side = (side - 4) // 2
    return side


class SmallCNN(NormalizedModel):
    """The SmallCNN of TRADES (Zhang et al. 2019) for MNIST: conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc.

    Unpadded 3x3 convolutions and 2x2 max-pooling, so the first fully connected layer's input size depends
    on ``image_size`` (64*4*4 for 28x28, 64*5*5 for 32x32); the model accepts only that image size.
    Dropout (0.5 in TRADES) after the first fully connected layer. Names: ``conv1``; ``layer1`` = conv2 +
    activation + pool (the first block after conv1); ``layer2`` = conv3, conv4 + pool; ``fc1``, ``fc2``, ``fc3``.
    """

    def __init__(
        self, *, num_classes: int, in_channels: int, act: ActFactory, image_size: int, mean=None, std=None,
        dropout: float = 0.5,
    ):
        super().__init__(in_channels, mean, std)
        side = smallcnn_feature_size(image_size)
        if side < 1:
            raise ConfigError(f"smallcnn needs image_size >= 14 (its convolutions are unpadded), got {image_size}")
        self.image_size = image_size
        self.conv1 = nn.Conv2d(in_channels, 32, 3)
        self.act1 = act()
        self.layer1 = nn.Sequential()
        self.layer1.add_module("conv", nn.Conv2d(32, 32, 3))
        self.layer1.add_module("act", act())
        self.layer1.add_module("pool", nn.MaxPool2d(2, 2))
        self.layer2 = nn.Sequential()
        self.layer2.add_module("conv1", nn.Conv2d(32, 64, 3))
        self.layer2.add_module("act1", act())
        self.layer2.add_module("conv2", nn.Conv2d(64, 64, 3))
        self.layer2.add_module("act2", act())
        self.layer2.add_module("pool", nn.MaxPool2d(2, 2))
        self.fc1 = nn.Linear(64 * side * side, 200)
        self.act_fc1 = act()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(200, 200)
        self.act_fc2 = act()
        self.fc3 = nn.Linear(200, num_classes)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"smallcnn was built for {self.image_size}x{self.image_size} inputs, got "
                f"{tuple(x.shape[-2:])}: create it with image_size={x.shape[-1]}"
            )
        out = self.layer2(self.layer1(self.act1(self.conv1(x))))
        out = self.dropout(self.act_fc1(self.fc1(torch.flatten(out, 1))))
        return self.fc3(self.act_fc2(self.fc2(out)))
