"""Small networks for the quick-start and tests."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_dimat.models.registry import register_model


@register_model("mlp")
def mlp(
    in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (128, 128), batch_norm: bool = True
) -> nn.Sequential:
    """Flatten → [Linear → BatchNorm1d → ReLU] × len(hidden) → Linear.

    Examples:
        >>> mlp(in_features=64, num_classes=10, hidden=(32,))
        Sequential(...)
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(nn.ReLU())
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("small_cnn")
def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Sequential:
    """Two conv blocks (Conv → BatchNorm → ReLU → MaxPool) and a linear head, for small images.

    Examples:
        >>> import torch
        >>> small_cnn(in_channels=3, num_classes=20)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 20])
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
