"""VGG-16 for CIFAR-size images, with or without batch norm.

The feature map is flattened straight into the classifier (no adaptive pooling): at 64×64 input the
first linear layer sees 512 channels × 2 × 2 positions, so the permutation engine must permute its
input features in blocks of four. The network traces with :func:`torch.fx.symbolic_trace`.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_dimat.models.registry import register_model
from lightning_dimat.models.resnet import init_weights

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
"""Channels of each conv3×3 → (BN) → ReLU; ``"M"`` is a 2×2 max-pool."""


class VGG(nn.Module):
    """``features`` (convs and max-pools) → ``torch.flatten(x, 1)`` → ``classifier`` (three linears).

    Args:
        config: conv widths and ``"M"`` (max-pool) markers; five pools divide the input size by 32.
        num_classes: outputs of the last linear layer.
        batch_norm: put a BatchNorm2d after each conv.
        input_size: side of the square input, a multiple of 32.
        in_channels: image channels.
        hidden: width of the two hidden linear layers.
        dropout: dropout probability after each hidden linear layer.

    Examples:
        >>> net = VGG((8, "M", 16, "M"), num_classes=3, input_size=8, hidden=32)
        >>> net(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        config: tuple[int | str, ...] = VGG16_CONFIG,
        num_classes: int = 10,
        batch_norm: bool = True,
        input_size: int = 32,
        in_channels: int = 3,
        hidden: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        factor = 2 ** config.count("M")
        if input_size <= 0 or input_size % factor:
            raise ValueError(f"input_size must be a positive multiple of {factor}, got {input_size}.")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            width = int(item)
            layers.append(nn.Conv2d(channels, width, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            channels = width
        self.features = nn.Sequential(*layers)
        side = input_size // factor
        self.classifier = nn.Sequential(
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.classifier(x)


@register_model("vgg16", "vgg16_bn")
def vgg16(
    num_classes: int = 10,
    batch_norm: bool = True,
    input_size: int = 32,
    in_channels: int = 3,
    hidden: int = 512,
    dropout: float = 0.5,
) -> VGG:
    """CIFAR VGG-16 (batch norm by default): 13 conv3×3 layers, 5 max-pools, a 3-layer classifier.

    The 512 × (input_size/32)² feature map is flattened into ``Linear(512·s², hidden) → ReLU →
    Dropout → Linear(hidden, hidden) → ReLU → Dropout → Linear(hidden, num_classes)``. Convs keep
    their bias even with batch norm (as torchvision's ``vgg16_bn`` does). ``batch_norm=False`` gives
    plain VGG-16.

    Args:
        num_classes: outputs of the last linear layer.
        batch_norm: put a BatchNorm2d after each conv.
        input_size: side of the square input: a multiple of 32 (32 for CIFAR, 64 for Tiny ImageNet).
        in_channels: image channels.
        hidden: width of the two hidden linear layers.
        dropout: dropout probability in the classifier.

    Examples:
        >>> net = vgg16(num_classes=10, input_size=64)
        >>> net.classifier[0]
        Linear(in_features=2048, out_features=512, bias=True)
        >>> net.eval()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """
    return VGG(
        VGG16_CONFIG,
        num_classes=num_classes,
        batch_norm=batch_norm,
        input_size=input_size,
        in_channels=in_channels,
        hidden=hidden,
        dropout=dropout,
    )
