"""BatchNorm statistics after a merge: reset, then re-estimated exactly on local data.

Examples:
    >>> import torch
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> recompute_batchnorm(net, torch.randn(16, 3))
    1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dimat.merge.inputs import model_device, model_inputs, to_device


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that track running statistics."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]


def recompute_batchnorm(
    model: nn.Module,
    data: Iterable[Any] | Tensor,
    num_batches: int | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> int:
    """Resets BatchNorm running statistics and re-estimates them with cumulative averages over ``data``.

    Runs forward passes in train mode without gradients (``momentum=None`` gives the exact mean over
    the batches), then restores each layer's momentum and the model's mode. Returns the number of
    batches used (0 when the model has no BatchNorm: no data is read then).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    device = model_device(model)
    used = 0
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
        model.train()
        with torch.no_grad(), forward_context():
            for inputs in model_inputs(data, num_batches):
                model(to_device(inputs, device))
                used += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise ValueError("recompute_batchnorm got no batches: `data` is empty.")
    return used
