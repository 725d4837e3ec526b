"""Model inputs from batches: what merging reads from data (a tensor, ``(x, y, ...)`` tuples, loaders).

Examples:
    >>> import torch
    >>> batches = [(torch.zeros(4, 2), torch.zeros(4)), (torch.ones(4, 2), torch.ones(4))]
    >>> [x.sum().item() for x in model_inputs(batches)]
    [0.0, 8.0]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn


def model_inputs(data: Any, num_batches: int | None = None) -> Iterator[Any]:
    """Model inputs from ``data``: a tensor or a tuple ``(x, y, ...)`` of tensors (one batch), or an iterable
    of batches whose first element is the input (Lightning's ``(x, y)`` convention; a bare tensor batch is
    its own input).
    """
    for batch in batches_of(data, num_batches):
        if isinstance(batch, Tensor):
            yield batch
        elif isinstance(batch, (tuple, list)) and batch:
            yield batch[0]
        else:
            raise TypeError(
                f"Cannot find the model input in a batch of type {type(batch).__name__}: expected a tensor "
                "or a tuple/list whose first element is the input."
            )


def num_samples(data: Any) -> int:
    """How many samples the inputs of ``data`` hold (the first dimension of each input).

    Examples:
        >>> num_samples([(torch.zeros(3, 2), None), (torch.zeros(5, 2), None)])
        8
    """
    return sum(x.shape[0] if isinstance(x, Tensor) else len(x) for x in model_inputs(data))


def to_device(inputs: Any, device: torch.device) -> Any:
    """``inputs`` (a tensor or a collection of them) on ``device``."""
    return apply_to_collection(inputs, Tensor, lambda tensor: tensor.to(device))


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or buffer) lives; the CPU for a model without tensors."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def peek_inputs(model: nn.Module, data: Iterable[Any] | Tensor | None) -> tuple[Any, Iterator[Any]]:
    """The first model input (on the model's device) and an iterator over all of them, first included."""
    if data is None:
        raise ValueError("This matcher needs `data`: batches (or a tensor) of model inputs.")
    device = model_device(model)
    inputs = (to_device(batch, device) for batch in model_inputs(data))
    first = next(inputs, None)
    if first is None:
        raise ValueError("This matcher got empty `data`: give at least one batch.")
    return first, itertools.chain([first], inputs)


def first_input(model: nn.Module, data: Iterable[Any] | Tensor) -> Any:
    """The first model input in ``data``, on ``model``'s device."""
    return peek_inputs(model, data)[0]


def batches_of(data: Any, num_batches: int | None = None) -> Iterator[Any]:
    """The batches of ``data`` (a tensor or a tuple of tensors is one batch), at most ``num_batches``."""
    if isinstance(data, Tensor) or (
        isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data)
    ):
        yield data
        return
    if num_batches is not None and num_batches <= 0:
        return
    for index, batch in enumerate(data):
        yield batch
        if num_batches is not None and index + 1 >= num_batches:
            return  # stop before fetching (and e.g. decoding) one batch too many


class LimitedBatches:
    """Re-iterable view of the first ``num_batches`` batches of ``data`` (a one-shot iterator is read once
    and kept, since merging reads the data twice: for matching and for BatchNorm)."""

    def __init__(self, data: Iterable[Any] | Tensor, num_batches: int | None) -> None:
        self.data = list(batches_of(data, num_batches)) if isinstance(data, Iterator) else data
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[Any]:
        return batches_of(self.data, self.num_batches)
