"""The model registry: configs name networks (``mlp``, …) and pass their options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_dimat.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


def build_model(name: str, **options: Any) -> nn.Module:
    """Builds the registered network ``name`` with ``options``.

    Examples:
        >>> build_model("mlp", in_features=64, num_classes=10).__class__.__name__
        'Sequential'
    """
    return MODELS.get(name)(**options)
