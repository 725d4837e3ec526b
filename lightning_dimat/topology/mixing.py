"""Mixing rules that weight a graph's edges, and the validators of mixing and push-sum matrices.

A mixing rule maps a symmetric 0/1 adjacency matrix (zero diagonal) to a mixing matrix Π. The built-in rules
in ``MIXING_RULES`` are ``metropolis_hastings`` (alias ``metropolis``), ``uniform`` and ``max_degree``; add
your own with :func:`register_mixing_rule`. :func:`validate_mixing` checks DIMAT's symmetric, doubly
stochastic Π; :func:`column_stochastic` checks a (possibly directed) push-sum matrix P.

Examples:
    >>> MIXING_RULES.get("metropolis")(np.array([[0, 1], [1, 0]])).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np
import numpy.typing as npt

from lightning_dimat.registry import Registry

__all__ = [
    "MIXING_RULES",
    "MixingRule",
    "column_stochastic",
    "max_degree",
    "metropolis_hastings",
    "register_mixing_rule",
    "uniform",
    "validate_mixing",
]

MixingRule = Callable[[np.ndarray], np.ndarray]
"""``rule(adjacency) -> mixing``: an NxN 0/1 adjacency matrix to an NxN mixing matrix."""

MIXING_RULES: Registry[MixingRule] = Registry("mixing rule")
register_mixing_rule = MIXING_RULES.register


# --------------------------------------------------------------------------- rules


@register_mixing_rule("metropolis_hastings", "metropolis")
def metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
    """π_ij = 1 / (1 + max(d_i, d_j)) on edges, π_ii = 1 - Σ_j π_ij. Doubly stochastic on any graph.

    Examples:
        >>> metropolis_hastings(np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])).round(4).tolist()
        [[0.6667, 0.3333, 0.0], [0.3333, 0.3333, 0.3333], [0.0, 0.3333, 0.6667]]
    """
    adjacency = np.asarray(adjacency, dtype=np.float64)
    degrees = adjacency.sum(axis=1)
    mixing = adjacency / (1.0 + np.maximum.outer(degrees, degrees))
    np.fill_diagonal(mixing, 1.0 - mixing.sum(axis=1))
    return mixing


@register_mixing_rule("uniform")
def uniform(adjacency: np.ndarray) -> np.ndarray:
    """π_ij = 1 / (d_i + 1) for j = i and each neighbour j of i; only doubly stochastic on regular graphs.

    Examples:
        >>> uniform(np.ones((3, 3)) - np.eye(3)).round(4).tolist()[0]
        [0.3333, 0.3333, 0.3333]
    """
    adjacency = np.asarray(adjacency, dtype=np.float64)
    degrees = adjacency.sum(axis=1)
    if np.unique(degrees).size > 1:
        found = sorted({int(d) for d in degrees})
        raise ValueError(
            f"The 'uniform' mixing rule is doubly stochastic only on regular graphs, but this graph has "
            f"degrees {found}; use 'metropolis_hastings' instead."
        )
    return (adjacency + np.eye(len(adjacency))) / (degrees[:, None] + 1.0)


@register_mixing_rule("max_degree")
def max_degree(adjacency: np.ndarray) -> np.ndarray:
    """π_ij = 1 / (1 + d_max) on edges, π_ii = 1 - d_i / (1 + d_max).

    Examples:
        >>> max_degree(np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])).round(4).tolist()[0]
        [0.6667, 0.3333, 0.0]
    """
    adjacency = np.asarray(adjacency, dtype=np.float64)
    mixing = adjacency / (1.0 + adjacency.sum(axis=1).max())
    np.fill_diagonal(mixing, 1.0 - mixing.sum(axis=1))
    return mixing


# --------------------------------------------------------------------------- validation


def _square_matrix(matrix: npt.ArrayLike, what: str) -> np.ndarray:
    """Reads ``matrix`` as a float64 square 2-D array with at least 2 rows (a copy)."""
    try:
        array = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"The {what} could not be read as a numeric matrix: {err}") from err
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"The {what} must be a square 2-D matrix, got shape {array.shape}.")
    if array.shape[0] < 2:
        raise ValueError(f"DIMAT needs at least 2 agents, got a {array.shape[0]}x{array.shape[0]} {what}.")
    return array


def _format_components(components: list[set[int]]) -> str:
    """``[{2, 3}, {0, 1}]`` as ``"{0, 1} and {2, 3}"``."""
    parts = ["{" + ", ".join(map(str, sorted(c))) + "}" for c in sorted(components, key=min)]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def validate_mixing(
    mixing: npt.ArrayLike, atol: float = 1e-6, *, symmetric: bool = True, connected: bool = True
) -> np.ndarray:
    """Checks that ``mixing`` is a valid DIMAT mixing matrix and returns it as a float64 copy.

    Valid means: square, N >= 2, finite, non-negative, symmetric, rows and columns summing to 1 (all
    within ``atol``) and a connected graph of non-zero off-diagonal weights. One round of a time-varying
    schedule may be directed (``symmetric=False``: agent i takes π_ij from j, still doubly stochastic, so
    the agents' mean is preserved) and disconnected (``connected=False``: a matching); the union of a
    schedule's period is checked for connectivity instead.

    Args:
        mixing: the candidate NxN matrix Π (nested lists or an array).
        atol: tolerance of the symmetry and row/column-sum checks.
        symmetric: require π_ij = π_ji.
        connected: require a connected graph.

    Returns:
        A float64 copy of ``mixing``.

    Raises:
        ValueError: naming the first offending entry, row, column or group of agents.

    Examples:
        >>> validate_mixing([[0.5, 0.5], [0.5, 0.5]]).dtype
        dtype('float64')
    """
    array = _square_matrix(mixing, "mixing matrix")
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        i, j = bad[0]
        raise ValueError(
            f"The mixing matrix has {len(bad)} non-finite entries, e.g. ({i}, {j}) = {array[i, j]}; "
            f"all weights must be finite numbers."
        )
    negative = np.argwhere(array < 0)
    if negative.size:
        i, j = negative[0]
        raise ValueError(
            f"Mixing weights must be non-negative, but entry ({i}, {j}) = {array[i, j]:.6g}; "
            f"set negative weights to 0 and renormalise."
        )
    asymmetry = np.abs(array - array.T)
    if symmetric and asymmetry.max() > atol:
        i, j = np.unravel_index(np.argmax(asymmetry), asymmetry.shape)
        raise ValueError(
            f"The mixing matrix must be symmetric, but ({i}, {j}) = {array[i, j]:.6g} and "
            f"({j}, {i}) = {array[j, i]:.6g}; use the same weight in both directions."
        )
    for axis, name in ((1, "row"), (0, "column")):
        sums = array.sum(axis=axis)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[worst] - 1.0) > atol:
            raise ValueError(
                f"The mixing matrix must be doubly stochastic, but {name} {worst} sums to {sums[worst]:.6g} "
                f"instead of 1; rescale the weights, or build the matrix from a graph with "
                f"Topology.from_graph / Topology.from_adjacency and a mixing rule."
            )
    if not connected:
        return array
    links = (array != 0) & ~np.eye(len(array), dtype=bool)
    graph = nx.from_numpy_array((links | links.T).astype(np.int8))
    if not nx.is_connected(graph):
        components = _format_components(list(nx.connected_components(graph)))
        raise ValueError(
            f"The communication graph of the mixing matrix is disconnected: agents {components} never "
            f"exchange weights; add a non-zero weight between the groups."
        )
    return array


def column_stochastic(mixing: npt.ArrayLike, atol: float = 1e-6) -> np.ndarray:
    """Checks that ``mixing`` is a valid push-sum matrix P and returns it as a float64 copy.

    ``P[i][j]`` is the share of its mass that agent j pushes to agent i, so the graph may be directed. Valid
    means: square N x N with N >= 2, finite, non-negative, every column summing to 1 (within ``atol``), a
    positive diagonal (every agent keeps a share of its own mass) and a strongly connected directed graph
    of positive entries; otherwise a push-sum weight can reach 0 and the de-biased model diverges.

    Args:
        mixing: the candidate N x N matrix P (nested lists or an array).
        atol: tolerance of the column-sum check.

    Returns:
        A float64 copy of ``mixing``.

    Raises:
        ValueError: naming the first offending entry, column, diagonal entry or the disconnected groups.

    Examples:
        >>> column_stochastic([[0.5, 0.25], [0.5, 0.75]]).sum(axis=0)
        array([1., 1.])
        >>> column_stochastic([[0.5, 0.5], [0.5, 0.0]])
        Traceback (most recent call last):
        ...
        ValueError: The push-sum matrix must be column-stochastic ..., but column 1 sums to 0.5; ...
    """
    try:
        array = np.array(mixing, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"The push-sum matrix could not be read as a numeric matrix: {err}") from err
    if array.ndim != 2 or array.shape[0] != array.shape[1] or len(array) < 2:
        raise ValueError(f"The push-sum matrix must be square N × N with N >= 2, got shape {array.shape}.")
    invalid = np.argwhere(~np.isfinite(array) | (array < 0))
    if invalid.size:
        i, j = invalid[0]
        raise ValueError(f"Push-sum shares must be finite and >= 0, but entry ({i}, {j}) = {array[i, j]}.")
    sums = array.sum(axis=0)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > atol:
        raise ValueError(
            f"The push-sum matrix must be column-stochastic (what agent j pushes sums to 1), but column "
            f"{worst} sums to {sums[worst]:.6g}; divide each column by its sum."
        )
    missing = np.flatnonzero(np.diag(array) <= 0)
    if missing.size:
        k = missing[0]
        raise ValueError(
            f"Every agent must keep a share of its own push-sum mass, but P[{k}][{k}] = {array[k, k]}; "
            f"give the diagonal positive weights (e.g. 1/(out-degree + 1))."
        )
    graph = nx.from_numpy_array((array > 0).astype(np.int8), create_using=nx.DiGraph)
    if not nx.is_strongly_connected(graph):
        parts = sorted(sorted(part) for part in nx.strongly_connected_components(graph))
        raise ValueError(
            f"The push-sum graph must be strongly connected (every agent reaches every other), but it splits "
            f"into {parts}; add links so that mass flows between them, or the de-biasing weights vanish."
        )
    return array
