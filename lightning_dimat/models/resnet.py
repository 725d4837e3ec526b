"""Residual networks: the CIFAR ResNet-20 of the DIMAT paper and a bottleneck ResNet-50.

Every network here is plain enough for :func:`torch.fx.symbolic_trace`: convolutions, batch norms,
ReLUs, pooling, one flatten, a linear head and residual additions, with no data-dependent control
flow, so the permutation engine can read the weight symmetries off the traced graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lightning_dimat.models.registry import register_model

Shortcut = Literal["conv1x1", "conv3x3"]
Stem = Literal["cifar", "imagenet"]

_SHORTCUT_KERNELS = {"conv1x1": 1, "conv3x3": 3}
_STEMS = ("cifar", "imagenet")


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) init for every conv in ``module``; batch norms get weight 1, bias 0.

    Linear layers keep PyTorch's default init.

    Examples:
        >>> block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> init_weights(block)
        >>> block[1].weight.unique().tolist(), block[1].bias.unique().tolist()
        ([1.0], [0.0])
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def _shortcut(in_channels: int, out_channels: int, stride: int, kind: Shortcut) -> nn.Sequential | None:
    """Conv + BN projection when the shape changes (``None``, i.e. identity, otherwise)."""
    if kind not in _SHORTCUT_KERNELS:
        raise ValueError(f"Unknown shortcut {kind!r}; expected one of {sorted(_SHORTCUT_KERNELS)}.")
    if stride == 1 and in_channels == out_channels:
        return None
    kernel = _SHORTCUT_KERNELS[kind]
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU.

    Args:
        in_channels: input channels.
        planes: output channels (``expansion`` is 1).
        stride: stride of the first conv and of the projection shortcut.
        shortcut: kernel of the projection shortcut used when the shape changes.

    Examples:
        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, shortcut: Shortcut = "conv1x1"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_channels, planes, stride, shortcut)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """conv1×1 → BN → ReLU → conv3×3 (strided) → BN → ReLU → conv1×1 (×4) → BN, plus shortcut, then ReLU.

    Args:
        in_channels: input channels.
        planes: inner width; the block outputs ``planes * expansion`` channels.
        stride: stride of the 3×3 conv and of the projection shortcut.
        shortcut: kernel of the projection shortcut used when the shape changes.

    Examples:
        >>> block = Bottleneck(64, 64)
        >>> block(torch.zeros(1, 64, 8, 8)).shape
        torch.Size([1, 256, 8, 8])
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, shortcut: Shortcut = "conv1x1"
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """Stem → stages of residual blocks → global average pool → flatten → linear head.

    Stage ``i`` holds ``depths[i]`` blocks of width ``widths[i]``; the first stage keeps the
    resolution, each later one halves it in its first block.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        depths: blocks per stage.
        widths: ``planes`` per stage (a bottleneck stage outputs four times as many channels).
        num_classes: outputs of the linear head.
        in_channels: image channels.
        stem_channels: output channels of the stem conv.
        stem: ``"cifar"`` (3×3 conv, stride 1, no max-pool) or ``"imagenet"`` (7×7 conv, stride 2,
            then 3×3 max-pool, stride 2).
        shortcut: kernel of the projection shortcuts (``"conv1x1"`` or ``"conv3x3"``).

    Examples:
        >>> net = ResNet(BasicBlock, depths=(1, 1), widths=(8, 16), num_classes=5, stem_channels=8)
        >>> net(torch.zeros(2, 3, 16, 16)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        stem_channels: int = 16,
        stem: Stem = "cifar",
        shortcut: Shortcut = "conv1x1",
    ) -> None:
        super().__init__()
        if stem not in _STEMS:
            raise ValueError(f"Unknown stem {stem!r}; expected one of {list(_STEMS)}.")
        if len(depths) != len(widths):
            raise ValueError(f"depths {list(depths)} and widths {list(widths)} differ in length.")
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        stages: list[nn.Module] = []
        channels = stem_channels
        for index, (depth, planes) in enumerate(zip(depths, widths, strict=True)):
            blocks: list[nn.Module] = []
            for position in range(depth):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(channels, planes, stride, shortcut))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


@register_model("resnet20")
def resnet20(
    width: int = 1, num_classes: int = 10, shortcut: Shortcut = "conv1x1", in_channels: int = 3
) -> ResNet:
    """CIFAR ResNet-20 (He et al. 2016, §4.2): 3 stages of 3 basic blocks, 16·w, 32·w, 64·w channels.

    The stem is a 3×3 conv (stride 1, no max-pool); global average pooling makes any input of at
    least 8×8 work (32×32 CIFAR, 64×64 Tiny ImageNet). Where a block changes shape its shortcut is
    a projection conv + BN: ``shortcut="conv1x1"`` is the common "option B" (1×1 conv);
    ``shortcut="conv3x3"`` uses a 3×3 conv (padding 1), the variant of the DIMAT paper's official
    code. The paper's runs used ``resnet20(width=8, shortcut="conv3x3")``.

    Args:
        width: channel multiplier.
        num_classes: outputs of the linear head.
        shortcut: ``"conv1x1"`` or ``"conv3x3"`` projection shortcuts.
        in_channels: image channels.

    Examples:
        >>> net = resnet20(width=1, num_classes=10)
        >>> sum(p.numel() for p in net.parameters())
        272474
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNet(
        BasicBlock,
        depths=(3, 3, 3),
        widths=(16 * width, 32 * width, 64 * width),
        num_classes=num_classes,
        in_channels=in_channels,
        stem_channels=16 * width,
        stem="cifar",
        shortcut=shortcut,
    )


@register_model("resnet50")
def resnet50(num_classes: int = 10, stem: Stem = "cifar", width: int = 1, in_channels: int = 3) -> ResNet:
    """Bottleneck ResNet-50: stages of [3, 4, 6, 3] blocks, widths 64·w … 512·w, expansion 4.

    Projection shortcuts (1×1 conv + BN) where the shape changes; the stride sits on each block's
    3×3 conv. ``stem="cifar"`` is a 3×3 stride-1 conv with no max-pool (for 32×32 and 64×64
    inputs); ``stem="imagenet"`` is the 7×7 stride-2 conv and 3×3 stride-2 max-pool. With
    ``stem="imagenet"`` and ``num_classes=1000`` it has the parameter count of torchvision's
    ``resnet50`` (25,557,032). Every batch norm starts at weight 1 (no zero-init of the last one).

    Args:
        num_classes: outputs of the linear head.
        stem: ``"cifar"`` or ``"imagenet"``.
        width: channel multiplier.
        in_channels: image channels.

    Examples:
        >>> resnet50(num_classes=100).fc
        Linear(in_features=2048, out_features=100, bias=True)
    """
    return ResNet(
        Bottleneck,
        depths=(3, 4, 6, 3),
        widths=(64 * width, 128 * width, 256 * width, 512 * width),
        num_classes=num_classes,
        in_channels=in_channels,
        stem_channels=64 * width,
        stem=stem,
        shortcut="conv1x1",
    )
