"""The :class:`Topology` (a validated mixing matrix and its graph) and :func:`build_topology`.

Examples:
    >>> topology = build_topology("ring", num_agents=5)
    >>> topology.neighbors(0), round(topology.weights(0)[1], 4)
    ([1, 4], 0.3333)
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Collection, Sequence
from typing import Any

import networkx as nx
import numpy as np
import numpy.typing as npt

from lightning_dimat.topology.graphs import GRAPHS
from lightning_dimat.topology.mixing import MIXING_RULES, _square_matrix, validate_mixing
from lightning_dimat.validation import check_index, check_int

__all__ = ["InducedMixing", "Topology", "build_topology"]


def _check_num_agents(num_agents: Any) -> int:
    """``num_agents`` as an ``int`` if it is an integer >= 2; else ``ValueError``."""
    return check_int("num_agents", num_agents, minimum=2, hint="DIMAT merges at least 2 agents")


def _agent_index(agent: Any, num_agents: int) -> int:
    """``agent`` as an ``int`` if it is an agent id in ``0..num_agents-1``; else ``IndexError``."""
    try:
        return check_index("agent", agent, num_agents)
    except ValueError as err:
        raise IndexError(str(err)) from None


class Topology:
    """An immutable, validated DIMAT mixing matrix Π and the communication graph it defines.

    Args:
        mixing: NxN symmetric, doubly stochastic, non-negative mixing matrix of a connected graph.
        symmetric: ``False`` for one round of a time-varying schedule in which agent i takes weight π_ij
            from j without j taking from i (still doubly stochastic).
        connected: ``False`` for one round of a schedule whose graph alone is disconnected (a matching).

    Examples:
        >>> topology = Topology.from_name("fully_connected", 4)
        >>> topology.num_agents, topology.degree(0), round(topology.rho, 6)
        (4, 3, 0.0)
    """

    __slots__ = ("_connected", "_eigenvalues", "_mixing", "_second_modulus", "_symmetric")

    def __init__(self, mixing: npt.ArrayLike, *, symmetric: bool = True, connected: bool = True) -> None:
        array = validate_mixing(mixing, symmetric=symmetric, connected=connected)
        array.setflags(write=False)
        if symmetric:
            eigenvalues = np.linalg.eigvalsh(array)[::-1].copy()
            second = float(max(abs(eigenvalues[1]), abs(eigenvalues[-1])))
        else:  # the consensus contraction of a doubly stochastic matrix: its second singular value
            eigenvalues = np.sort(np.linalg.eigvals(array).real)[::-1].copy()
            second = float(np.linalg.svd(array, compute_uv=False)[1])
        eigenvalues.setflags(write=False)
        object.__setattr__(self, "_mixing", array)
        object.__setattr__(self, "_eigenvalues", eigenvalues)
        object.__setattr__(self, "_second_modulus", second)
        object.__setattr__(self, "_symmetric", symmetric)
        object.__setattr__(self, "_connected", connected)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Topology is immutable; cannot set {name!r}.")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Topology is immutable; cannot delete {name!r}.")

    def __reduce__(self) -> Any:
        if self._symmetric and self._connected:
            return type(self), (np.array(self._mixing),)
        return _round_topology, (np.array(self._mixing), self._symmetric, self._connected)

    # ------------------------------------------------------------- constructors

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
        num_agents = _check_num_agents(num_agents)
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

    # ------------------------------------------------------------- matrix and spectrum

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
        links = (self._mixing > 0) | (self._mixing.T > 0)  # (either direction, for a directed round)
        graph.add_edges_from((int(i), int(j)) for i, j in np.argwhere(np.triu(links, k=1)))
        return graph

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of Π, real and sorted descending (λ1 = 1)."""
        return self._eigenvalues.view()

    @property
    def symmetric(self) -> bool:
        """Whether π_ij = π_ji (always, except for a directed round of a schedule)."""
        return self._symmetric

    @property
    def rho(self) -> float:
        """rho = max(|λ2|, |λN|)², the contraction factor of the paper's Assumption 2 (rho < 1); for a
        directed round, the second singular value squared."""
        return self._second_modulus**2

    @property
    def spectral_gap(self) -> float:
        """1 - max(|λ2|, |λN|); larger means faster consensus."""
        return 1.0 - self._second_modulus

    # ------------------------------------------------------------- per-agent views

    def _check_agent(self, i: Any) -> int:
        return _agent_index(i, self.num_agents)

    def neighbors(self, i: int) -> list[int]:
        """Sorted agents j ≠ i with π_ij > 0.

        Examples:
            >>> build_topology("star", 4).neighbors(0)
            [1, 2, 3]
        """
        i = self._check_agent(i)
        return [int(j) for j in np.flatnonzero(self._mixing[i] > 0) if j != i]

    def weights(self, i: int) -> dict[int, float]:
        """Agent ``i``'s merge weights: j → π_ij for j in its neighbours and itself.

        Examples:
            >>> build_topology("star", 4).weights(1)
            {0: 0.25, 1: 0.75}
        """
        i = self._check_agent(i)
        agents = sorted([*self.neighbors(i), i])
        return {j: float(self._mixing[i, j]) for j in agents}

    def receivers(self, j: int) -> list[int]:
        """Sorted agents i ≠ j with π_ij > 0: those that use agent ``j``'s state (its neighbours, unless the
        round is directed).

        Examples:
            >>> build_topology("ring", 5).receivers(0)
            [1, 4]
        """
        j = self._check_agent(j)
        return [int(i) for i in np.flatnonzero(self._mixing[:, j] > 0) if i != j]

    def degree(self, i: int) -> int:
        """Number of neighbours of agent ``i``.

        Examples:
            >>> build_topology("ring", 5).degree(2)
            2
        """
        return len(self.neighbors(i))

    # ------------------------------------------------------------- derived structures

    def spanning_tree(self, root: int = 0, exclude: Collection[int] = ()) -> dict[int, int | None]:
        """A breadth-first spanning tree of the communication graph, as a parent map.

        Agents are visited breadth-first from ``root``, each agent's neighbours in increasing id order; an
        agent's parent is the agent that discovered it. The result is deterministic, covers all N agents
        (the graph is connected) and each agent's depth in the tree is its hop distance to ``root``.

        Args:
            root: the agent at the root of the tree.
            exclude: agents the tree must not pass through (e.g. agents whose weights are not finite):
                they are never visited, so agents reachable only through them are left out too.

        Returns:
            ``{agent: parent}`` in visiting order, with ``root`` first and mapped to ``None``; every parent
            is a neighbour of its child.

        Raises:
            IndexError: if ``root`` is not an agent id in ``0..N-1``.
            ValueError: if ``root`` is one of ``exclude``.

        Examples:
            >>> build_topology("ring", 6).spanning_tree()
            {0: None, 1: 0, 5: 0, 2: 1, 4: 5, 3: 2}
            >>> build_topology("ring", 6).spanning_tree(exclude=[1])
            {0: None, 5: 0, 4: 5, 3: 4, 2: 3}
        """
        root = self._check_agent(root)
        if root in exclude:
            raise ValueError(
                f"The spanning tree's root {root} is one of the excluded agents {sorted(exclude)}."
            )
        parents: dict[int, int | None] = {root: None}
        queue = deque([root])
        while queue:
            agent = queue.popleft()
            for neighbor in self.neighbors(agent):
                if neighbor not in parents and neighbor not in exclude:
                    parents[neighbor] = agent
                    queue.append(neighbor)
        return parents

    def subgraph(self, agents: Sequence[int]) -> InducedMixing:
        """The mixing among a subset of agents only, each present agent's row renormalised to sum to 1.

        For the present agents a_0 < a_1 < … < a_{K-1} (``agents``, sorted), the result's K x K matrix is
        ``M[k, l] = π[a_k, a_l] / Σ_m π[a_k, a_m]``: every present agent keeps its weights on the present
        agents (itself included), in the same proportions, and drops those on absent agents. A present
        agent whose row is all zero among the present agents (π_ii = 0 and no present neighbour) keeps its
        own model: its row is the unit vector on itself. ``M`` is row-stochastic but, unlike Π, in general
        neither symmetric nor doubly stochastic, and its graph may be disconnected, hence an
        :class:`InducedMixing` rather than a :class:`Topology`. With every agent present, ``M`` equals Π.

        Args:
            agents: the distinct ids of the present agents, in any order.

        Returns:
            An :class:`InducedMixing` whose ``agents`` are the sorted ids and whose ``weights``,
            ``neighbors`` and ``degree`` take and return the original agent ids.

        Raises:
            IndexError: if an id is not an agent id in ``0..N-1``.
            ValueError: if ``agents`` is empty or repeats an id.

        Examples:
            >>> present = build_topology("ring", 5).subgraph([3, 0, 1])
            >>> present.agents, present.mixing.round(4).tolist()
            ((0, 1, 3), [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
        """
        present = [self._check_agent(agent) for agent in agents]
        if not present:
            raise ValueError("subgraph needs at least one present agent, got none; pass their ids.")
        repeated = sorted({agent for agent in present if present.count(agent) > 1})
        if repeated:
            raise ValueError(f"subgraph takes each agent once, but agents {repeated} are repeated.")
        present.sort()
        block = self._mixing[np.ix_(present, present)]
        sums = block.sum(axis=1, keepdims=True)
        isolated = sums[:, 0] <= 0
        block = np.where(isolated[:, None], np.eye(len(present)), block / np.where(sums > 0, sums, 1.0))
        return InducedMixing(present, block)

    def __repr__(self) -> str:
        edges = int(np.count_nonzero(np.triu(self._mixing, k=1) > 0))
        return f"Topology(num_agents={self.num_agents}, edges={edges}, rho={self.rho:.4f})"


class InducedMixing:
    """Row-stochastic merge weights among a subset of agents, from :meth:`Topology.subgraph`.

    Args:
        agents: the distinct present agent ids, ascending (row and column k of ``mixing`` are ``agents[k]``).
        mixing: the K x K non-negative, row-stochastic matrix M among them.

    Examples:
        >>> induced = InducedMixing([2, 5], [[0.5, 0.5], [0.0, 1.0]])
        >>> induced.weights(2), induced.neighbors(5)
        ({2: 0.5, 5: 0.5}, [])
    """

    __slots__ = ("_agents", "_mixing", "_position")

    def __init__(self, agents: Sequence[int], mixing: npt.ArrayLike, atol: float = 1e-6) -> None:
        ids = tuple(check_int("each agent id", agent, minimum=0) for agent in agents)
        if not ids or list(ids) != sorted(set(ids)):
            raise ValueError(f"InducedMixing needs distinct agent ids in increasing order, got {list(ids)}.")
        array = np.array(mixing, dtype=np.float64)
        if array.shape != (len(ids), len(ids)):
            raise ValueError(
                f"InducedMixing over {len(ids)} agents needs a {len(ids)}x{len(ids)} matrix, "
                f"got shape {array.shape}."
            )
        if not np.isfinite(array).all() or (array < 0).any():
            i, j = np.argwhere(~np.isfinite(array) | (array < 0))[0]
            raise ValueError(f"Merge weights must be finite and >= 0, but entry ({i}, {j}) = {array[i, j]}.")
        sums = array.sum(axis=1)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[worst] - 1.0) > atol:
            raise ValueError(
                f"InducedMixing rows must sum to 1, but the row of agent {ids[worst]} sums to "
                f"{sums[worst]:.6g}; divide each row by its sum."
            )
        array.setflags(write=False)
        object.__setattr__(self, "_agents", ids)
        object.__setattr__(self, "_mixing", array)
        object.__setattr__(self, "_position", {agent: k for k, agent in enumerate(ids)})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"InducedMixing is immutable; cannot set {name!r}.")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"InducedMixing is immutable; cannot delete {name!r}.")

    def __reduce__(self) -> tuple[type[InducedMixing], tuple[tuple[int, ...], np.ndarray]]:
        return type(self), (self._agents, np.array(self._mixing))

    @property
    def agents(self) -> tuple[int, ...]:
        """The present agent ids, sorted ascending."""
        return self._agents

    @property
    def num_agents(self) -> int:
        """Number of present agents K."""
        return len(self._agents)

    @property
    def mixing(self) -> np.ndarray:
        """The K x K float64 matrix M (a read-only view); row/column k belongs to ``agents[k]``."""
        return self._mixing.view()

    def __contains__(self, agent: object) -> bool:
        return agent in self._position

    def _row(self, i: Any) -> int:
        """The row of agent ``i`` in ``mixing``; ``IndexError`` unless ``i`` is a present agent id."""
        try:
            position = self._position.get(check_int("agent", i))
        except ValueError:
            position = None
        if position is None:
            raise IndexError(f"agent must be one of the present agents {list(self._agents)}, got {i!r}.")
        return position

    def neighbors(self, i: int) -> list[int]:
        """Sorted present agents j ≠ i with M_ij > 0 (original ids).

        Examples:
            >>> build_topology("ring", 5).subgraph([0, 1, 4]).neighbors(0)
            [1, 4]
        """
        row = self._row(i)
        return [self._agents[k] for k in np.flatnonzero(self._mixing[row] > 0) if k != row]

    def weights(self, i: int) -> dict[int, float]:
        """Agent ``i``'s merge weights j → M_ij for j in its present neighbours and itself; they sum to 1.

        Examples:
            >>> build_topology("star", 4).subgraph([0, 1, 2]).weights(1)
            {0: 0.25, 1: 0.75}
        """
        row = self._row(i)
        agents = sorted([*self.neighbors(i), self._agents[row]])
        return {j: float(self._mixing[row, self._position[j]]) for j in agents}

    def degree(self, i: int) -> int:
        """Number of present neighbours of agent ``i``.

        Examples:
            >>> build_topology("star", 4).subgraph([1, 2]).degree(1)
            0
        """
        return len(self.neighbors(i))

    def __repr__(self) -> str:
        return f"InducedMixing(agents={list(self._agents)})"


def _round_topology(mixing: np.ndarray, symmetric: bool, connected: bool) -> Topology:
    """Rebuilds a pickled round topology (``Topology.__reduce__`` of a relaxed one)."""
    return Topology(mixing, symmetric=symmetric, connected=connected)


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
    num_agents = _check_num_agents(num_agents)
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
