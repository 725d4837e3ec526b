"""Named communication graphs: the ``GRAPHS`` registry and its built-in builders.

A graph builder maps ``(num_agents, **options)`` to an undirected :class:`networkx.Graph` on the nodes
``0..num_agents-1``. Register your own with :func:`register_topology`; :func:`build_topology` then accepts
its name.

Examples:
    >>> sorted(GRAPHS.get("ring")(4).edges)
    [(0, 1), (0, 3), (1, 2), (2, 3)]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import networkx as nx

from lightning_dimat.registry import Registry
from lightning_dimat.validation import check_int, check_real

__all__ = [
    "GRAPHS",
    "GraphBuilder",
    "erdos_renyi",
    "exponential",
    "fully_connected",
    "register_topology",
    "ring",
    "star",
    "torus",
]

GraphBuilder = Callable[..., nx.Graph]
"""``builder(num_agents, **options) -> nx.Graph`` on the nodes ``0..num_agents-1``."""

GRAPHS: Registry[GraphBuilder] = Registry("topology")
register_topology = GRAPHS.register


@register_topology("ring")
def ring(num_agents: int) -> nx.Graph:
    """Cycle 0-1-…-(N-1)-0; for N=2 a single edge (so it equals the fully connected graph).

    Examples:
        >>> sorted(ring(3).edges)
        [(0, 1), (0, 2), (1, 2)]
    """
    return nx.cycle_graph(num_agents)


@register_topology("fully_connected", "fc")
def fully_connected(num_agents: int) -> nx.Graph:
    """Complete graph: every agent talks to every other.

    Examples:
        >>> fully_connected(4).number_of_edges()
        6
    """
    return nx.complete_graph(num_agents)


@register_topology("star")
def star(num_agents: int) -> nx.Graph:
    """Star with agent 0 as the hub.

    Examples:
        >>> sorted(star(4)[0])
        [1, 2, 3]
    """
    return nx.star_graph(num_agents - 1)


@register_topology("torus")
def torus(num_agents: int, rows: int | None = None) -> nx.Graph:
    """2-D periodic grid of ``rows x cols`` agents; by default the most square factorisation (rows <= cols).

    Agent ``r * cols + c`` sits at row ``r``, column ``c``. A side of length 2 wraps onto itself, so the
    duplicate edge collapses (the graph stays simple).

    Examples:
        >>> sorted(torus(6)[0])  # 2 x 3: the row wrap collapses
        [1, 2, 3]
    """
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(num_agents) + 1) if num_agents % d == 0)
        if rows < 2:
            raise ValueError(
                f"A torus needs num_agents = rows x cols with rows, cols >= 2, but N={num_agents} has no "
                f"such factorisation; pass rows= explicitly or use another topology ('ring', 'exponential')."
            )
    rows = check_int("The torus option rows", rows, hint=f"a divisor of num_agents={num_agents}")
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
    """Undirected exponential graph: agent i is linked to (i ± 2^k) mod N for every 2^k < N.

    Examples:
        >>> sorted(exponential(8)[0])
        [1, 2, 4, 6, 7]
    """
    graph = nx.Graph()
    graph.add_nodes_from(range(num_agents))
    hop = 1
    while hop < num_agents:
        graph.add_edges_from((i, (i + hop) % num_agents) for i in range(num_agents))
        hop *= 2
    return graph


@register_topology("erdos_renyi")
def erdos_renyi(num_agents: int, p: float | None = None, seed: int = 0, max_tries: int = 100) -> nx.Graph:
    """Random G(N, p) graph, resampled with seed, seed+1, … until connected (at most ``max_tries`` times).

    Examples:
        >>> nx.is_connected(erdos_renyi(8, p=0.5, seed=1))
        True
    """
    if p is None:
        raise ValueError("The 'erdos_renyi' topology needs an edge probability, e.g. p=0.5.")
    p = check_real("The 'erdos_renyi' edge probability p", p, 0, 1, low_open=True)
    max_tries = check_int("max_tries", max_tries, minimum=1, hint="how many graphs to draw before giving up")
    for attempt in range(max_tries):
        graph = nx.gnp_random_graph(num_agents, p, seed=seed + attempt)
        if nx.is_connected(graph):
            return graph
    raise ValueError(
        f"No connected Erdős-Rényi graph with p={p} and N={num_agents} in {max_tries} tries "
        f"(seeds {seed}..{seed + max_tries - 1}); use a larger p (connectivity needs roughly p > ln(N)/N)."
    )
