"""Aligning and merging plain models (no Lightning, no agents): :func:`align` and :func:`merge`.

Examples:
    >>> import torch, torch.nn as nn
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> merged = merge([a, b], [0.5, 0.5], method="average")
    >>> torch.allclose(merged.weight, (a.weight + b.weight) / 2)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn

from lightning_dimat.merge.batchnorm import recompute_batchnorm
from lightning_dimat.merge.combine import merge_into_basis
from lightning_dimat.merge.inputs import LimitedBatches
from lightning_dimat.merge.matchers import Matcher, matcher_spec, resolve_matcher
from lightning_dimat.merge.state import copy_holding
from lightning_dimat.permutation.apply import permute_state
from lightning_dimat.permutation.spec import PermutationSpec

ModelT = TypeVar("ModelT", bound=nn.Module)


def align(
    reference: nn.Module,
    other: ModelT,
    method: str | Matcher = "activation",
    data: Iterable[Any] | Tensor | None = None,
    spec: PermutationSpec | None = None,
) -> ModelT:
    """A copy of ``other`` expressed in ``reference``'s basis (functionally identical to ``other``).

    Args:
        reference: the model whose basis the result is in.
        other: the model to permute (same architecture).
        method: a matcher or its name: ``"activation"`` (correlation of activations on ``data``),
            ``"weight"`` (weights only; ``data`` or ``spec`` for the architecture) or ``"average"``.
        data: a DataLoader, an iterable of batches whose first element is the input, or a tensor.
        spec: a hand-written :class:`~lightning_dimat.permutation.PermutationSpec` (default: derived).

    Examples:
        >>> import torch
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> aligned = align(a, b, method="average")
        >>> torch.equal(aligned.weight, b.weight)
        True
    """
    matcher = _matcher_with_data(method, data)
    spec = matcher_spec(matcher, reference, data, spec)
    (found,) = matcher.match(reference, [other.state_dict()], data, spec=spec)
    if not found:
        return copy.deepcopy(other)
    assert spec is not None  # (a matcher that permutes uses a spec)
    return copy_holding(other, permute_state(other.state_dict(), spec, found))


def merge(
    models: Sequence[ModelT],
    weights: Sequence[float] | None = None,
    method: str | Matcher = "activation",
    data: Iterable[Any] | Tensor | None = None,
    num_batches: int | None = None,
    spec: PermutationSpec | None = None,
) -> ModelT:
    """Σ_j w_j P_j x_j in ``models[0]``'s basis, as a new model of ``models[0]``'s class.

    Args:
        models: models of one architecture; the first one fixes the basis (P_0 = I).
        weights: one weight per model (default: uniform); they should sum to 1.
        method: a matcher or its name (``"activation"``, ``"weight"``, ``"average"``).
        data: batches for matching and for BatchNorm re-estimation (skipped when ``None``); must be
            re-iterable (a DataLoader, a list, a tensor).
        num_batches: how many batches of ``data`` to use (default: all).
        spec: a hand-written :class:`~lightning_dimat.permutation.PermutationSpec` (default: derived).
    """
    if not models:
        raise ValueError("merge() needs at least one model.")
    weights = [1.0 / len(models)] * len(models) if weights is None else list(weights)
    matcher = _matcher_with_data(method, data)
    limited = None if data is None else LimitedBatches(data, num_batches)
    reference = models[0]
    state, _ = merge_into_basis(
        reference,
        reference.state_dict(),
        [model.state_dict() for model in models[1:]],
        weights,
        matcher,
        limited,
        spec=spec,
    )
    merged = copy_holding(reference, state)
    if limited is not None:
        recompute_batchnorm(merged, limited)
    return merged


def _matcher_with_data(method: str | Matcher, data: Any) -> Matcher:
    matcher = resolve_matcher(method)
    if matcher.requires_data and data is None:
        raise ValueError(
            f"Merge method {method!r} matches activations and needs `data=` (batches of inputs)."
        )
    return matcher
