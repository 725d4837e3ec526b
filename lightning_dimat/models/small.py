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

    Example:
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
