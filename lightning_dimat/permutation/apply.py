"""Applying permutations to ``state_dict``s and optimizer state.

A permutation of group g is a ``LongTensor`` ``p`` with ``permuted[i] = original[p[i]]`` along every axis
the spec lists for g (for a block segment, unit i's whole block moves).

Examples:
    >>> import torch.nn as nn
    >>> from lightning_dimat.permutation.spec import PermutationSpec
    >>> mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> spec = PermutationSpec.from_groups(mlp, {"h": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]})
    >>> permuted = permute_state(mlp.state_dict(), spec, {"h": torch.tensor([3, 2, 1, 0])})
    >>> torch.equal(permuted["0.bias"], mlp[0].bias.flip(0))
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_dimat.permutation.spec import Layout, PermutationSpec

Permutations = Mapping[str, Tensor]


def layout_index(layout: Layout, permutations: Permutations, device: torch.device) -> Tensor | None:
    """The gather index that applies ``permutations`` to an axis with ``layout`` (``None``: identity)."""
    pieces, offset, moved = [], 0, False
    for segment in layout:
        permutation = permutations.get(segment.group) if segment.group is not None else None
        if permutation is None:
            pieces.append(torch.arange(offset, offset + segment.length, device=device))
        else:
            moved = True
            units = permutation.to(device=device, dtype=torch.long)
            within = torch.arange(segment.block, device=device)
            pieces.append((offset + units[:, None] * segment.block + within[None, :]).reshape(-1))
        offset += segment.length
    return torch.cat(pieces) if moved else None


def permute_tensor(tensor: Tensor, layouts: tuple[Layout | None, ...], permutations: Permutations) -> Tensor:
    """``tensor`` with every axis that has a layout gathered by its permutation."""
    for axis, layout in enumerate(layouts):
        if layout is None:
            continue
        index = layout_index(layout, permutations, tensor.device)
        if index is not None:
            tensor = tensor.index_select(axis, index)
    return tensor


def permute_state(
    state: Mapping[str, Tensor], spec: PermutationSpec, permutations: Permutations
) -> dict[str, Tensor]:
    """A new ``state_dict`` with ``permutations`` applied (entries outside the spec are shared)."""
    return {
        key: permute_tensor(value, spec.axes[key], permutations) if key in spec.axes else value
        for key, value in state.items()
    }


def permute_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, spec: PermutationSpec, permutations: Permutations
) -> None:
    """Permutes, in place, the per-parameter state tensors (momentum, Adam moments) of ``model``'s parameters.

    Use it when a model is permuted in place and training continues with the same optimizer. Entries
    shaped like their parameter are permuted; scalars such as Adam's ``step`` are left alone.
    """
    for name, parameter in model.named_parameters():
        if name not in spec.axes or parameter not in optimizer.state:
            continue
        for key, value in optimizer.state[parameter].items():
            if isinstance(value, Tensor) and value.shape == parameter.shape:
                optimizer.state[parameter][key] = permute_tensor(value, spec.axes[name], permutations).clone()


def random_permutations(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One uniformly random permutation per group."""
    return {group: torch.randperm(size, generator=generator) for group, size in spec.group_sizes.items()}


def identity_permutations(spec: PermutationSpec) -> dict[str, Tensor]:
    """The identity permutation of every group."""
    return {group: torch.arange(size) for group, size in spec.group_sizes.items()}


def invert(permutation: Tensor) -> Tensor:
    """The inverse permutation: ``invert(p)[p[i]] = i``."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(len(permutation), device=permutation.device)
    return inverse


def invert_permutations(permutations: Permutations) -> dict[str, Tensor]:
    """Every group's permutation inverted: applying the result undoes ``permutations``.

    Examples:
        >>> p = {"h": torch.tensor([2, 0, 1])}
        >>> invert_permutations(p)["h"]
        tensor([1, 2, 0])
        >>> compose(p, invert_permutations(p))["h"]
        tensor([0, 1, 2])
    """
    return {group: invert(permutation) for group, permutation in permutations.items()}


def compose(first: Permutations, second: Permutations) -> dict[str, Tensor]:
    """The permutations equal to applying ``first``, then ``second`` (a missing group is the identity).

    ``permute_state(permute_state(s, spec, first), spec, second)`` equals
    ``permute_state(s, spec, compose(first, second))``: per group, ``compose(first, second)[g][i]`` is
    ``first[g][second[g][i]]``.

    Examples:
        >>> first = {"h": torch.tensor([1, 2, 0])}
        >>> second = {"h": torch.tensor([0, 2, 1]), "k": torch.arange(2)}
        >>> x = torch.tensor([10, 20, 30])
        >>> composed = compose(first, second)
        >>> composed["h"], torch.equal(x[first["h"]][second["h"]], x[composed["h"]]), sorted(composed)
        (tensor([1, 0, 2]), True, ['h', 'k'])

    Raises:
        ValueError: if a group's two permutations differ in length.
    """
    composed = dict(first)
    for group, after in second.items():
        before = first.get(group)
        if before is None:
            composed[group] = after
            continue
        if before.shape != after.shape:
            raise ValueError(
                f"Cannot compose group {group!r}: its permutations have {len(before)} and {len(after)} units."
            )
        composed[group] = before[after.to(before.device)]
    return composed
