"""One basis for all agents, built from pairwise alignments along a spanning tree.

Each agent i other than the root aligns itself to its tree parent p(i): a permutation Q_i with
``permute_state(x_i, spec, Q_i)`` in p(i)'s basis. Composing the Q's along the path to the root gives the
permutation R_i that brings agent i into the root's basis: R_root = I, R_i = compose(Q_i, R_p(i)). Only tree
neighbours' weights are needed for the Q's and only permutation indices for the composition.

Examples:
    >>> import torch
    >>> parents = {0: None, 1: 0, 2: 1}
    >>> pairwise = {1: {"h": torch.tensor([1, 0, 2])}, 2: {"h": torch.tensor([0, 2, 1])}}
    >>> paths = basis_permutations(parents, pairwise)
    >>> paths[0], paths[1]["h"].tolist(), paths[2]["h"].tolist()
    ({}, [1, 0, 2], [2, 0, 1])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_dimat.permutation.apply import compose

Permutations = Mapping[str, Tensor]


def basis_permutations(
    parents: Mapping[int, int | None], pairwise: Mapping[int, Permutations]
) -> dict[int, dict[str, Tensor]]:
    """R_i for every agent of the tree ``parents`` (``{agent: parent}``, the root mapped to ``None``).

    Args:
        parents: a spanning tree as a parent map (e.g. ``Topology.spanning_tree``).
        pairwise: Q_i for every non-root agent: the permutations expressing agent i in its parent's basis.

    Returns:
        ``{agent: R_i}``: the permutations expressing each agent in the root's basis (``{}`` for the root).
    """
    roots = [agent for agent, parent in parents.items() if parent is None]
    if len(roots) != 1:
        raise ValueError(f"A spanning tree has exactly one root (parent None), got {roots}.")
    missing = sorted(
        agent for agent, parent in parents.items() if parent is not None and agent not in pairwise
    )
    if missing:
        raise ValueError(f"Agents {missing} have a parent but no permutation to it (pairwise[agent]).")
    paths: dict[int, dict[str, Tensor]] = {roots[0]: {}}

    def path(agent: int, seen: tuple[int, ...] = ()) -> dict[str, Tensor]:
        if agent in paths:
            return paths[agent]
        parent = parents[agent]
        if parent is None or parent not in parents or agent in seen:
            raise ValueError(f"Agent {agent} does not reach the root {roots[0]} through its parents.")
        paths[agent] = compose(pairwise[agent], path(parent, (*seen, agent)))
        return paths[agent]

    for agent in parents:
        path(agent)
    return paths


def moved_fraction(permutations: Permutations) -> float:
    """The fraction of units a permutation moves, averaged over its channel groups (0 for the identity).

    Examples:
        >>> import torch
        >>> moved_fraction({"a": torch.tensor([1, 0, 2, 3]), "b": torch.arange(3)})
        0.25
    """
    if not permutations:
        return 0.0
    fractions = [
        float((permutation != torch.arange(len(permutation), device=permutation.device)).float().mean())
        for permutation in permutations.values()
    ]
    return sum(fractions) / len(fractions)
