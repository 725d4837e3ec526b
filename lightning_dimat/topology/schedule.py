"""Time-varying topologies: a graph per round, from a list used in turn, a callable or a named schedule.

A round's mixing matrix must be doubly stochastic (so merging keeps the agents' mean) but may be directed
(agent i takes π_ij from j) and disconnected (a matching); instead the union of the graphs over a period
must connect every agent, or some agents would never hear of each other. Built-in schedules live in the
``SCHEDULES`` registry:

- ``one_peer_exponential``: in round r agent i takes half its weights from agent i + 2^(r mod ⌈log2 N⌉)
  (SGP's one-peer exponential graph): one message per agent and round, and for N a power of 2 the product of
  one period's matrices is exact averaging;
- ``random_matching``: a fresh random perfect matching each round (seeded; with N odd one agent sits out),
  matched agents average.

Examples:
    >>> schedule = build_schedule("one_peer_exponential", num_agents=8)
    >>> [schedule(r).neighbors(0) for r in range(4)]
    [[1], [2], [4], [1]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import numpy.typing as npt

from lightning_dimat.registry import Registry
from lightning_dimat.topology.mixing import MIXING_RULES, _format_components
from lightning_dimat.topology.topology import Topology, _is_adjacency, build_topology
from lightning_dimat.validation import check_int

__all__ = ["SCHEDULES", "TopologySchedule", "build_schedule", "register_schedule"]

RoundMatrix = Callable[[int], npt.ArrayLike]
"""A schedule's matrix of round r (a function of the round index)."""

SCHEDULES: Registry[Callable[..., TopologySchedule]] = Registry("schedule")
"""Named time-varying topologies: ``name -> builder(num_agents, **options) -> TopologySchedule``."""


ScheduleBuilder = Callable[..., "TopologySchedule"]


def register_schedule(name: str) -> Callable[[ScheduleBuilder], ScheduleBuilder]:
    """Registers a schedule builder ``(num_agents, **options) -> TopologySchedule`` under ``name``."""
    return SCHEDULES.register(name)


class TopologySchedule:
    """The topology of every round: ``schedule(r)`` is a :class:`Topology` (directed or disconnected allowed).

    Args:
        rounds: the topologies used in turn (round r uses ``rounds[r % len(rounds)]``), or a callable
            ``r -> Topology`` (or a mixing matrix).
        num_agents: number of agents N.
        period: rounds over which the union of the graphs must be connected (default: ``len(rounds)``; a
            callable needs it).
        name: how the schedule describes itself (in checkpoints and errors).

    Raises:
        ValueError: when a round's matrix is not doubly stochastic, or the union of one period's graphs
            leaves agents apart (naming the groups).

    Examples:
        >>> ring, star = build_topology("ring", 4), build_topology("star", 4)
        >>> schedule = TopologySchedule([ring, star], num_agents=4)
        >>> schedule(0) is ring, schedule(3) is star, schedule.union.num_agents
        (True, True, 4)
    """

    def __init__(
        self,
        rounds: Sequence[Topology | npt.ArrayLike] | Callable[[int], Topology | npt.ArrayLike],
        num_agents: int,
        period: int | None = None,
        name: str | None = None,
    ) -> None:
        self.num_agents = check_int("num_agents", num_agents, minimum=2)
        if callable(rounds):
            if period is None:
                raise ValueError(
                    "A callable schedule needs period=<rounds after which its graphs have connected every "
                    "agent>, e.g. TopologySchedule(fn, num_agents, period=4)."
                )
            self._fixed: list[Topology] | None = None
            self._function: Callable[[int], Any] | None = rounds
        else:
            if len(rounds) == 0:
                raise ValueError("A topology schedule needs at least one topology; got an empty list.")
            self._fixed = [self._checked(topology, r) for r, topology in enumerate(rounds)]
            self._function = None
        self.period = check_int("period", len(rounds) if period is None else period, minimum=1)  # type: ignore[arg-type]
        self.name = name or (f"{len(self._fixed)} topologies in turn" if self._fixed else "callable")
        self._cache: dict[int, Topology] = {}
        self.union = self._union()
        """The union of one period's graphs, Metropolis–Hastings weighted: connected by construction."""

    def __call__(self, round_index: int) -> Topology:
        """The topology of round ``round_index`` (0-based)."""
        round_index = check_int("round_index", round_index, minimum=0)
        if self._fixed is not None:
            return self._fixed[round_index % len(self._fixed)]
        if round_index not in self._cache:
            assert self._function is not None
            self._cache[round_index] = self._checked(self._function(round_index), round_index)
        return self._cache[round_index]

    def describe(self) -> dict[str, Any]:
        """What identifies the schedule: its name, period and the matrices of its first period."""
        return {
            "schedule": self.name,
            "period": self.period,
            "rounds": [self(r).mixing.tolist() for r in range(self.period)],
        }

    def __repr__(self) -> str:
        return f"TopologySchedule({self.name!r}, num_agents={self.num_agents}, period={self.period})"

    def _checked(self, topology: Topology | npt.ArrayLike, round_index: int) -> Topology:
        is_topology = isinstance(topology, Topology)
        matrix = topology.mixing if is_topology else np.asarray(topology, dtype=np.float64)
        if matrix.shape != (self.num_agents, self.num_agents):
            raise ValueError(
                f"Round {round_index} of the schedule has a {matrix.shape} matrix but num_agents="
                f"{self.num_agents}; give one row and column per agent."
            )
        if is_topology:
            return topology
        try:
            return Topology(matrix, symmetric=bool(np.allclose(matrix, matrix.T)), connected=False)
        except ValueError as error:
            raise ValueError(f"Round {round_index} of the schedule: {error}") from None

    def _union(self) -> Topology:
        links = np.zeros((self.num_agents, self.num_agents), dtype=bool)
        for r in range(self.period):
            mixing = self(r).mixing
            links |= (mixing > 0) | (mixing.T > 0)
        np.fill_diagonal(links, False)
        graph = nx.from_numpy_array(links.astype(np.int8))
        if not nx.is_connected(graph):
            components = _format_components(list(nx.connected_components(graph)))
            raise ValueError(
                f"Over a period of {self.period} rounds the schedule {self.name!r} never connects agents "
                f"{components}: they would never exchange weights. Add links between the groups (or a "
                "longer period)."
            )
        return Topology.from_adjacency(links.astype(np.int8))


def build_schedule(
    topology: str | Sequence[Any] | Callable[[int], Any],
    num_agents: int,
    rule: str = "metropolis_hastings",
    **options: Any,
) -> TopologySchedule | None:
    """A schedule from a ``SCHEDULES`` name, a list of topologies (names, graphs, matrices) used in turn, or
    a callable ``round -> topology``; ``None`` for a single static topology (see ``build_topology``).

    Examples:
        >>> build_schedule("ring", 4) is None
        True
        >>> build_schedule(["ring", "fully_connected"], 4).period
        2
    """
    if isinstance(topology, TopologySchedule):
        return topology
    if isinstance(topology, str):
        if topology not in SCHEDULES:
            return None
        return SCHEDULES.get(topology)(num_agents, **options)
    if callable(topology) and not isinstance(topology, (Topology, nx.Graph)):
        period = options.pop("period", None)
        if options:
            raise ValueError(f"Options {sorted(options)} do not apply to a callable schedule (only period).")
        return TopologySchedule(topology, num_agents, period=period, name=getattr(topology, "__name__", None))
    if _is_list_of_topologies(topology):
        return TopologySchedule(
            [_round_of(item, num_agents, rule, options) for item in topology],
            num_agents,
            name=" / ".join(item if isinstance(item, str) else type(item).__name__ for item in topology),
        )
    return None


def _round_of(item: Any, num_agents: int, rule: str, options: dict[str, Any]) -> Topology | np.ndarray:
    """One listed round: a named graph or a ``Topology`` as it is; a graph or matrix, which may be
    disconnected in a single round, as its mixing matrix (an adjacency matrix weighted with ``rule``)."""
    if isinstance(item, (str, Topology)):
        return build_topology(item, num_agents, rule=rule, **options)
    if isinstance(item, nx.Graph):
        item = nx.to_numpy_array(item, nodelist=sorted(item.nodes), weight=None)
    matrix = np.array(item, dtype=np.float64)
    if _is_adjacency(matrix):
        np.fill_diagonal(matrix, 0.0)
        return MIXING_RULES.get(rule)(matrix)
    return matrix


def _is_list_of_topologies(topology: Any) -> bool:
    """A list whose items are topologies (names, ``Topology``, graphs or matrices), not one matrix's rows."""
    if not isinstance(topology, (list, tuple)) or not topology:
        return False
    return all(isinstance(item, (str, Topology, nx.Graph)) or np.ndim(item) == 2 for item in topology)


# ----------------------------------------------------------------------------------- built-in schedules
@dataclass(frozen=True)
class _OnePeerRound:
    """Round r of ``one_peer_exponential`` (a class, not a closure: a strategy must pickle)."""

    num_agents: int
    period: int

    def __call__(self, round_index: int) -> np.ndarray:
        hop = 2 ** (round_index % self.period)
        matrix = np.eye(self.num_agents) / 2
        for i in range(self.num_agents):
            matrix[i, (i + hop) % self.num_agents] += 0.5
        return matrix


@dataclass(frozen=True)
class _RandomMatchingRound:
    """Round r of ``random_matching``: a perfect matching drawn from seed ``(seed, r)``."""

    num_agents: int
    seed: int

    def __call__(self, round_index: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, round_index]).permutation(self.num_agents)
        matrix = np.eye(self.num_agents)
        for a, b in zip(order[0::2], order[1::2], strict=False):
            matrix[a, a] = matrix[b, b] = matrix[a, b] = matrix[b, a] = 0.5
        return matrix


@register_schedule("one_peer_exponential")
def one_peer_exponential(num_agents: int) -> TopologySchedule:
    """Round r: agent i keeps half of its weights and takes half from agent i + 2^(r mod ⌈log2 N⌉)."""
    num_agents = check_int("num_agents", num_agents, minimum=2)
    period = max(1, math.ceil(math.log2(num_agents)))
    rounds = _OnePeerRound(num_agents, period)
    return TopologySchedule(rounds, num_agents, period=period, name="one_peer_exponential")


@register_schedule("random_matching")
def random_matching(num_agents: int, seed: int = 0, period: int | None = None) -> TopologySchedule:
    """Round r: a random perfect matching drawn from seed ``(seed, r)``; matched agents average, an agent
    left out (N odd) keeps its weights. ``period`` (default ``max(4, 2⌈log2 N⌉)``) is the number of rounds
    whose union is checked for connectivity."""
    num_agents = check_int("num_agents", num_agents, minimum=2)
    seed = check_int("seed", seed, minimum=0)
    period = period if period is not None else max(4, 2 * math.ceil(math.log2(num_agents)))
    rounds = _RandomMatchingRound(num_agents, seed)
    return TopologySchedule(rounds, num_agents, period=period, name=f"random_matching(seed={seed})")
