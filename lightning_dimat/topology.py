"""Communication graphs and mixing matrices for DIMAT.

Each of the N agents merges its model with its neighbours' using the weights of a symmetric, doubly
stochastic mixing matrix Π (row ``i`` holds agent ``i``'s weights). A :class:`Topology` holds a validated Π.
Graphs come from the ``GRAPHS`` registry (``ring``, ``fully_connected``/``fc``, ``star``, ``torus``,
``exponential``, ``erdos_renyi``); weights come from a rule in the ``MIXING_RULES`` registry
(``metropolis_hastings``, ``uniform``, ``max_degree``). Add your own with the ``register_topology`` and
``register_mixing_rule`` decorators.

Examples:
    >>> topology = build_topology("ring", num_agents=5)
    >>> topology.neighbors(0), round(topology.weights(0)[1], 4)
    ([1, 4], 0.3333)
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np
import numpy.typing as npt

from lightning_dimat.registry import Registry

__all__ = [
    "GRAPHS",
    "MIXING_RULES",
    "Topology",
    "build_topology",
    "register_mixing_rule",
    "register_topology",
    "validate_mixing",
]

GraphBuilder = Callable[..., nx.Graph]
MixingRule = Callable[[np.ndarray], np.ndarray]

GRAPHS: Registry[GraphBuilder] = Registry("topology")
MIXING_RULES: Registry[MixingRule] = Registry("mixing rule")

register_topology = GRAPHS.register
register_mixing_rule = MIXING_RULES.register


# --------------------------------------------------------------------------- graphs


@register_topology("ring")
def ring(num_agents: int) -> nx.Graph:
    """Cycle 0-1-…-(N-1)-0; for N=2 a single edge (so it equals the fully connected graph)."""
    return nx.cycle_graph(num_agents)


@register_topology("fully_connected", "fc")
def fully_connected(num_agents: int) -> nx.Graph:
    """Complete graph: every agent talks to every other."""
    return nx.complete_graph(num_agents)


@register_topology("star")
def star(num_agents: int) -> nx.Graph:
    """Star with agent 0 as the hub."""
    return nx.star_graph(num_agents - 1)


@register_topology("torus")
def torus(num_agents: int, rows: int | None = None) -> nx.Graph:
    """2-D periodic grid of ``rows x cols`` agents; by default the most square factorisation (rows <= cols).

    Agent ``r * cols + c`` sits at row ``r``, column ``c``. A side of length 2 wraps onto itself, so the
    duplicate edge collapses (the graph stays simple).
    """
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(num_agents) + 1) if num_agents % d == 0)
        if rows < 2:
            raise ValueError(
                f"A torus needs num_agents = rows x cols with rows, cols >= 2, but N={num_agents} has no "
                f"such factorisation; pass rows= explicitly or use another topology ('ring', 'exponential')."
            )
    if rows < 2 or num_agents % rows or num_agents // rows < 2:
        raise ValueError(
            f"A torus needs rows >= 2 dividing num_agents into cols >= 2, got rows={rows} for "
            f"N={num_agents}; pass another rows= or use another topology ('ring', 'exponential')."
        )
    cols = num_agents // rows
    graph = nx.Graph()
    graph.add_nodes_from(range(num_agents))
    for r in range(rows):
        for c in range(cols):
            graph.add_edge(r * cols + c, ((r + 1) % rows) * cols + c)
            graph.add_edge(r * cols + c, r * cols + (c + 1) % cols)
    return graph


@register_topology("exponential")
def exponential(num_agents: int) -> nx.Graph:
    """Undirected exponential graph: agent i is linked to (i ± 2^k) mod N for every 2^k < N."""
    graph = nx.Graph()
    graph.add_nodes_from(range(num_agents))
    hop = 1
    while hop < num_agents:
        graph.add_edges_from((i, (i + hop) % num_agents) for i in range(num_agents))
        hop *= 2
    return graph


@register_topology("erdos_renyi")
def erdos_renyi(num_agents: int, p: float | None = None, seed: int = 0, max_tries: int = 100) -> nx.Graph:
    """Random G(N, p) graph, resampled with seed, seed+1, … until connected (at most ``max_tries`` times)."""
    if p is None:
        raise ValueError("The 'erdos_renyi' topology needs an edge probability, e.g. p=0.5.")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
        raise ValueError(f"The 'erdos_renyi' edge probability must satisfy 0 < p <= 1, got p={p!r}.")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}.")
    for attempt in range(max_tries):
        graph = nx.gnp_random_graph(num_agents, float(p), seed=seed + attempt)
        if nx.is_connected(graph):
            return graph
    raise ValueError(
        f"No connected Erdős-Rényi graph with p={p} and N={num_agents} in {max_tries} tries "
        f"(seeds {seed}..{seed + max_tries - 1}); use a larger p (connectivity needs roughly p > ln(N)/N)."
    )


# --------------------------------------------------------------------------- mixing rules


@register_mixing_rule("metropolis_hastings", "metropolis")
def metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
    """π_ij = 1 / (1 + max(d_i, d_j)) on edges, π_ii = 1 - Σ_j π_ij. Doubly stochastic on any graph."""
    adjacency = np.asarray(adjacency, dtype=np.float64)
    degrees = adjacency.sum(axis=1)
    mixing = adjacency / (1.0 + np.maximum.outer(degrees, degrees))
    np.fill_diagonal(mixing, 1.0 - mixing.sum(axis=1))
    return mixing


@register_mixing_rule("uniform")
def uniform(adjacency: np.ndarray) -> np.ndarray:
    """π_ij = 1 / (d_i + 1) for j = i and each neighbour j of i; only doubly stochastic on regular graphs."""
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
    """π_ij = 1 / (1 + d_max) on edges, π_ii = 1 - d_i / (1 + d_max)."""
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


def _check_num_agents(num_agents: int) -> None:
    if isinstance(num_agents, bool) or not isinstance(num_agents, numbers.Integral) or num_agents < 2:
        raise ValueError(f"DIMAT needs at least 2 agents, got num_agents={num_agents!r}.")


def _format_components(components: list[set[int]]) -> str:
    parts = ["{" + ", ".join(map(str, sorted(c))) + "}" for c in sorted(components, key=min)]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def validate_mixing(mixing: npt.ArrayLike, atol: float = 1e-6) -> np.ndarray:
    """Checks that ``mixing`` is a valid DIMAT mixing matrix and returns it as a float64 copy.

    Valid means: square, N >= 2, finite, non-negative, symmetric, rows and columns summing to 1 (all
    within ``atol``) and a connected graph of non-zero off-diagonal weights.

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
    if asymmetry.max() > atol:
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
    links = (array != 0) & ~np.eye(len(array), dtype=bool)
    graph = nx.from_numpy_array(links.astype(np.int8))
    if not nx.is_connected(graph):
        components = _format_components(list(nx.connected_components(graph)))
        raise ValueError(
            f"The communication graph of the mixing matrix is disconnected: agents {components} never "
            f"exchange weights; add a non-zero weight between the groups."
        )
    return array


# --------------------------------------------------------------------------- topology


class Topology:
    """An immutable, validated DIMAT mixing matrix Π and the communication graph it defines.

    Args:
        mixing: NxN symmetric, doubly stochastic, non-negative mixing matrix of a connected graph.

    Examples:
        >>> topology = Topology.from_name("fully_connected", 4)
        >>> topology.num_agents, topology.degree(0), round(topology.rho, 6)
        (4, 3, 0.0)
    """

    __slots__ = ("_eigenvalues", "_mixing")

    def __init__(self, mixing: npt.ArrayLike) -> None:
        array = validate_mixing(mixing)
        array.setflags(write=False)
        eigenvalues = np.linalg.eigvalsh(array)[::-1].copy()
        eigenvalues.setflags(write=False)
        object.__setattr__(self, "_mixing", array)
        object.__setattr__(self, "_eigenvalues", eigenvalues)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Topology is immutable; cannot set {name!r}.")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Topology is immutable; cannot delete {name!r}.")

    def __reduce__(self) -> tuple[type[Topology], tuple[np.ndarray]]:
        return type(self), (np.array(self._mixing),)

    @classmethod
    def from_graph(cls, graph: nx.Graph, rule: str = "metropolis_hastings") -> Topology:
        """Builds a topology from an undirected graph, weighting its edges with a mixing ``rule``.

        Nodes that are not exactly 0..N-1 are relabelled in sorted order; self-loops are ignored.

        Examples:
            >>> Topology.from_graph(nx.path_graph(3)).neighbors(1)
            [0, 2]
        """
        if graph.is_directed():
            raise ValueError(
                "DIMAT needs an undirected communication graph, got a directed one; "
                "convert it with graph.to_undirected()."
            )
        nodes = list(graph.nodes)
        if set(nodes) != set(range(len(nodes))):
            try:
                nodes = sorted(nodes)
            except TypeError as err:
                raise ValueError(
                    f"Graph nodes must be sortable to be relabelled as agents 0..N-1: {err}"
                ) from err
        else:
            nodes = list(range(len(nodes)))
        adjacency = nx.to_numpy_array(graph, nodelist=nodes, weight=None) > 0
        return cls.from_adjacency(adjacency, rule=rule)

    @classmethod
    def from_adjacency(cls, adjacency: npt.ArrayLike, rule: str = "metropolis_hastings") -> Topology:
        """Builds a topology from a symmetric 0/1 (or boolean) adjacency matrix; the diagonal is ignored.

        Examples:
            >>> Topology.from_adjacency([[0, 1], [1, 0]]).mixing.tolist()
            [[0.5, 0.5], [0.5, 0.5]]
        """
        array = _square_matrix(adjacency, "adjacency matrix")
        not_binary = np.argwhere((array != 0) & (array != 1))
        if not_binary.size:
            i, j = not_binary[0]
            raise ValueError(
                f"An adjacency matrix holds only 0/1 (or booleans), but entry ({i}, {j}) = {array[i, j]}; "
                f"pass weights as a mixing matrix to Topology(...) instead."
            )
        asymmetric = np.argwhere(array != array.T)
        if asymmetric.size:
            i, j = asymmetric[0]
            raise ValueError(
                f"The adjacency matrix must be symmetric (undirected links), but "
                f"({i}, {j}) = {array[i, j]:g} and ({j}, {i}) = {array[j, i]:g}."
            )
        np.fill_diagonal(array, 0.0)
        return cls(MIXING_RULES.get(rule)(array))

    @classmethod
    def from_name(
        cls, name: str, num_agents: int, rule: str = "metropolis_hastings", **options: Any
    ) -> Topology:
        """Builds the registered graph ``name`` on ``num_agents`` agents and weights it with ``rule``.

        Examples:
            >>> Topology.from_name("torus", 6).degree(0)
            3
        """
        _check_num_agents(num_agents)
        builder = GRAPHS.get(name)
        try:
            inspect.signature(builder).bind(num_agents, **options)
        except TypeError as err:
            raise ValueError(f"Bad options {options} for topology {name!r}: {err}") from err
        graph = builder(num_agents, **options)
        if graph.number_of_nodes() != num_agents:
            raise ValueError(
                f"Topology {name!r} built {graph.number_of_nodes()} nodes for num_agents={num_agents}."
            )
        return cls.from_graph(graph, rule=rule)

    @property
    def num_agents(self) -> int:
        """Number of agents N."""
        return len(self._mixing)

    @property
    def mixing(self) -> np.ndarray:
        """The NxN float64 mixing matrix Π (a read-only view)."""
        return self._mixing.view()

    @property
    def graph(self) -> nx.Graph:
        """A fresh undirected graph with an edge wherever π_ij > 0, i ≠ j."""
        graph = nx.Graph()
        graph.add_nodes_from(range(self.num_agents))
        graph.add_edges_from((int(i), int(j)) for i, j in np.argwhere(np.triu(self._mixing, k=1) > 0))
        return graph

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of Π, real and sorted descending (λ1 = 1)."""
        return self._eigenvalues.view()

    @property
    def _second_modulus(self) -> float:
        return float(max(abs(self._eigenvalues[1]), abs(self._eigenvalues[-1])))

    @property
    def rho(self) -> float:
        """rho = max(|λ2|, |λN|)², the contraction factor of the paper's Assumption 2 (rho < 1)."""
        return self._second_modulus**2

    @property
    def spectral_gap(self) -> float:
        """1 - max(|λ2|, |λN|); larger means faster consensus."""
        return 1.0 - self._second_modulus

    def _check_agent(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < self.num_agents:
            raise IndexError(f"Agent {i!r} is out of range; valid agents are 0..{self.num_agents - 1}.")

    def neighbors(self, i: int) -> list[int]:
        """Sorted agents j ≠ i with π_ij > 0."""
        self._check_agent(i)
        return [int(j) for j in np.flatnonzero(self._mixing[i] > 0) if j != i]

    def weights(self, i: int) -> dict[int, float]:
        """Agent ``i``'s merge weights: j → π_ij for j in its neighbours and itself."""
        agents = sorted([*self.neighbors(i), int(i)])
        return {j: float(self._mixing[i, j]) for j in agents}

    def degree(self, i: int) -> int:
        """Number of neighbours of agent ``i``."""
        return len(self.neighbors(i))

    def __repr__(self) -> str:
        edges = int(np.count_nonzero(np.triu(self._mixing, k=1) > 0))
        return f"Topology(num_agents={self.num_agents}, edges={edges}, rho={self.rho:.4f})"


def _check_size(size: int, num_agents: int, what: str) -> None:
    if size != num_agents:
        raise ValueError(f"The topology {what} has {size} agents but num_agents={num_agents}.")


def _is_adjacency(matrix: np.ndarray) -> bool:
    return bool(np.all((matrix == 0) | (matrix == 1)) and not np.any(np.diag(matrix)))


def build_topology(
    topology: str | Topology | nx.Graph | npt.ArrayLike,
    num_agents: int,
    rule: str = "metropolis_hastings",
    **options: Any,
) -> Topology:
    """Builds a :class:`Topology` from a registry name, a ``Topology``, a graph or a matrix.

    A matrix whose entries are all 0/1 with a zero diagonal is read as an adjacency matrix and weighted
    with ``rule``; any other matrix (non-zero diagonal, fractional weights) is read as the mixing matrix
    itself. ``rule`` is ignored for mixing matrices and ``Topology`` objects; ``options`` go only to
    name-based graph builders.

    Examples:
        >>> build_topology([[0, 1, 1], [1, 0, 1], [1, 1, 0]], num_agents=3).mixing[0].round(4).tolist()
        [0.3333, 0.3333, 0.3333]
    """
    _check_num_agents(num_agents)
    if isinstance(topology, str):
        return Topology.from_name(topology, num_agents, rule=rule, **options)
    if options:
        raise ValueError(
            f"Options {sorted(options)} only apply to a topology given by name, "
            f"not to a {type(topology).__name__}; drop them or pass the topology's name."
        )
    if isinstance(topology, Topology):
        _check_size(topology.num_agents, num_agents, "Topology")
        return topology
    if isinstance(topology, nx.Graph):
        _check_size(topology.number_of_nodes(), num_agents, "graph")
        return Topology.from_graph(topology, rule=rule)
    matrix = _square_matrix(topology, "topology matrix")
    _check_size(len(matrix), num_agents, "matrix")
    return Topology.from_adjacency(matrix, rule=rule) if _is_adjacency(matrix) else Topology(matrix)
