"""One merge of one agent: find the P_ij, permute, take the weighted sum — x_i ← Σ_j π_ij P_ij x_j.

Every caller (the merge callback, the consensus export, :func:`~lightning_dimat.merge.merge`, benchmarks)
goes through :func:`merge_into_basis`, so the rule is written once.

Examples:
    >>> import torch, torch.nn as nn
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> average = resolve_matcher("average")
    >>> merged, _ = merge_into_basis(a, a.state_dict(), [b.state_dict()], [0.5, 0.5], average)
    >>> torch.allclose(merged["weight"], (a.weight + b.weight) / 2)
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from torch import Tensor, nn

from lightning_dimat.merge.matchers import (
    ForwardContext,
    Matcher,
    Permutations,
    matcher_spec,
    resolve_matcher,
)
from lightning_dimat.merge.state import StateDict, weighted_state
from lightning_dimat.permutation.apply import permute_state
from lightning_dimat.permutation.spec import PermutationSpec

__all__ = ["combine", "merge_into_basis", "resolve_matcher"]


def combine(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    permutations: Sequence[Mapping[str, Tensor]],
    spec: PermutationSpec | None,
) -> StateDict:
    """Σ_j w_j P_j x_j; ``states[0]`` is the reference (P_0 = I), ``permutations[j - 1]`` for ``states[j]``.

    An empty permutation mapping is the identity (no spec needed then).
    """
    if len(permutations) != len(states) - 1:
        raise ValueError(
            f"Got {len(states) - 1} neighbour states but {len(permutations)} permutation mappings."
        )
    aligned = [states[0]]
    for state, found in zip(states[1:], permutations, strict=True):
        if not found:
            aligned.append(state)
        elif spec is None:
            raise ValueError("Permutations were given without the spec that says which axes they move.")
        else:
            aligned.append(permute_state(state, spec, found))
    return weighted_state(aligned, weights)


def merge_into_basis(
    reference: nn.Module,
    own: Mapping[str, Tensor],
    neighbours: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    matcher: Matcher,
    data: Iterable[Any] | Tensor | None = None,
    *,
    spec: PermutationSpec | None = None,
    forward_context: ForwardContext = nullcontext,
) -> tuple[StateDict, list[Permutations]]:
    """``own`` and ``neighbours`` merged in ``reference``'s basis, and the permutations found.

    Args:
        reference: a model holding ``own`` (its activations are the matching reference).
        own: the merging agent's state (weight ``weights[0]``).
        neighbours: the other states (weights ``weights[1:]``).
        weights: the row of the mixing matrix, own weight first.
        matcher: finds the permutations (:class:`~lightning_dimat.merge.matchers.Matcher`).
        data: the merging agent's batches (for matchers that read data, or to derive the spec).
        spec: the architecture's spec (default: derived when the matcher needs one).
        forward_context: wraps forward passes (e.g. Lightning's autocast context).
    """
    spec = matcher_spec(matcher, reference, data, spec)
    found = matcher.match(reference, neighbours, data, spec=spec, forward_context=forward_context)
    return combine([own, *neighbours], weights, found, spec), found
