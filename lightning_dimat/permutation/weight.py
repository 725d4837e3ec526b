"""Weight matching (Git Re-Basin's coordinate descent): per group, a linear assignment on the inner products
of the two models' weights along that group's axes, given the current permutations of all other groups;
repeat over the groups in random order until no assignment improves. Works on any spec, ResNets included.

Examples:
    >>> import torch, torch.nn as nn
    >>> from lightning_dimat.permutation.tracing import permutation_spec
    >>> from lightning_dimat.permutation.apply import permute_state
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> spec = permutation_spec(net, torch.randn(2, 4))
    >>> truth = {group: torch.randperm(16) for group in spec.group_sizes}
    >>> shuffled = permute_state(net.state_dict(), spec, truth)
    >>> found = match_weights(spec, net.state_dict(), shuffled)
    >>> all(torch.equal(permute_state(shuffled, spec, found)[k], v) for k, v in net.state_dict().items())
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_dimat.permutation.apply import identity_permutations, permute_tensor
from lightning_dimat.permutation.assignment import solve_assignment
from lightning_dimat.permutation.spec import PermutationSpec


def _units(tensor: Tensor, axis: int, offset: int, size: int, block: int) -> Tensor:
    """The slice of ``tensor`` along ``axis`` covering one segment, as (units, everything else)."""
    piece = tensor.narrow(axis, offset, size * block).movedim(axis, 0)
    return piece.reshape(size, -1).float()


def _total(score: Tensor, permutation: Tensor, identity_bias: float) -> float:
    """Σ_i (score + identity_bias·I)[i, permutation[i]]: what one group's assignment maximises."""
    arange = torch.arange(len(permutation))
    total = float(score[arange, permutation].sum())
    if identity_bias:
        total += identity_bias * int((permutation == arange).sum())
    return total


def match_weights(
    spec: PermutationSpec,
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    max_iterations: int = 100,
    seed: int = 0,
    *,
    identity_bias: float = 0.0,
) -> dict[str, Tensor]:
    """The permutations bringing ``other``'s weights closest (max Σ ⟨W_ref, P W_other⟩) to ``reference``'s.

    Args:
        spec: the architecture's spec.
        reference: the ``state_dict`` whose basis the result is in.
        other: the ``state_dict`` to align to it.
        max_iterations: sweeps over all groups at most.
        seed: the order in which groups are visited.
        identity_bias: λ added, in each group's assignment, to every unit's score with its own index
            (in the units of the inner products): 0 is plain weight matching, a large λ keeps units in place.
    """
    spec.check_shapes(reference)
    spec.check_shapes(other)
    permutations = identity_permutations(spec)
    members = {
        group: [
            (key, axis, offset, segment)
            for key, axis, offset, segment in spec.members(group)
            if torch.is_floating_point(reference[key])
        ]
        for group in spec.group_sizes
    }
    generator = torch.Generator().manual_seed(seed)
    groups = list(spec.group_sizes)
    for _ in range(max_iterations):
        improved = False
        for position in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[position]
            size = spec.group_sizes[group]
            others = {name: p for name, p in permutations.items() if name != group}
            score = torch.zeros(size, size, dtype=torch.float64)
            for key, axis, offset, segment in members[group]:
                mine = _units(reference[key], axis, offset, segment.size, segment.block)
                # Every other axis gets every current permutation (the group's own included, when it also
                # permutes another axis of this tensor); the scored axis gets all but the group's.
                layouts = spec.axes[key]
                theirs = permute_tensor(
                    other[key], (*layouts[:axis], None, *layouts[axis + 1 :]), permutations
                )
                theirs = permute_tensor(theirs, (None,) * axis + (layouts[axis],), others)
                theirs = _units(theirs, axis, offset, segment.size, segment.block)
                score += (mine @ theirs.T).double().cpu()
            candidate = solve_assignment(score, identity_bias=identity_bias)
            before = _total(score, permutations[group], identity_bias)
            after = _total(score, candidate, identity_bias)
            if after > before + 1e-9 * max(1.0, abs(before)):
                permutations[group] = candidate
                improved = True
        if not improved:
            break
    return permutations
