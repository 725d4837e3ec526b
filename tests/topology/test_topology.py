"""Tests for lightning_dimat.topology: graphs, mixing rules, spectra, derived structures and errors."""

from __future__ import annotations

import copy
import pickle

import networkx as nx
import numpy as np
import pytest

import lightning_dimat.topology as topology_package
from lightning_dimat.topology import (
    GRAPHS,
    MIXING_RULES,
    InducedMixing,
    Topology,
    build_topology,
    column_stochastic,
    register_topology,
    validate_mixing,
)
from lightning_dimat.topology import graphs as graphs_module
from lightning_dimat.topology import mixing as mixing_module


def assert_valid_mixing(mixing: np.ndarray) -> None:
    assert mixing.dtype == np.float64
    np.testing.assert_allclose(mixing, mixing.T, atol=1e-12)
    np.testing.assert_allclose(mixing.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(mixing.sum(axis=1), 1.0, atol=1e-12)
    assert (mixing >= 0).all()
    assert nx.is_connected(nx.from_numpy_array((mixing > 0) & ~np.eye(len(mixing), dtype=bool)))


# --------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("n", range(3, 13))
def test_ring_spectrum_matches_closed_form(n: int) -> None:
    topology = build_topology("ring", n)
    np.testing.assert_allclose(topology.mixing[topology.mixing > 0], 1 / 3)
    expected = np.sort(1 / 3 + 2 / 3 * np.cos(2 * np.pi * np.arange(n) / n))[::-1]
    np.testing.assert_allclose(topology.eigenvalues, expected, atol=1e-12)
    second = max(abs(expected[1]), abs(expected[-1]))
    assert topology.rho == pytest.approx(second**2)
    assert topology.spectral_gap == pytest.approx(1 - second)
    assert 0 < topology.rho < 1


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_fully_connected_spectrum(n: int) -> None:
    topology = build_topology("fc", n)
    np.testing.assert_allclose(topology.mixing, np.full((n, n), 1 / n))
    np.testing.assert_allclose(topology.eigenvalues, [1.0] + [0.0] * (n - 1), atol=1e-12)
    assert topology.rho == pytest.approx(0.0, abs=1e-20)
    assert topology.spectral_gap == pytest.approx(1.0)


def test_star_by_hand() -> None:
    # Hub degree 3, leaves degree 1: every edge gets 1/(1+3), the hub keeps 1/4, the leaves 3/4.
    expected = np.array([[1, 1, 1, 1], [1, 3, 0, 0], [1, 0, 3, 0], [1, 0, 0, 3]]) / 4
    for rule in ("metropolis_hastings", "max_degree"):
        topology = build_topology("star", 4, rule=rule)
        np.testing.assert_allclose(topology.mixing, expected)
        np.testing.assert_allclose(topology.eigenvalues, [1, 3 / 4, 3 / 4, 0], atol=1e-12)
        assert topology.rho == pytest.approx(9 / 16)


def test_max_degree_differs_from_metropolis_by_hand() -> None:
    # Star on 0..3 plus the edge 1-2: degrees (3, 2, 2, 1).
    graph = nx.star_graph(3)
    graph.add_edge(1, 2)
    max_deg = np.array([[1, 1, 1, 1], [1, 2, 1, 0], [1, 1, 2, 0], [1, 0, 0, 3]]) / 4
    np.testing.assert_allclose(Topology.from_graph(graph, rule="max_degree").mixing, max_deg)
    metropolis = np.array([[3, 3, 3, 3], [3, 5, 4, 0], [3, 4, 5, 0], [3, 0, 0, 9]]) / 12
    np.testing.assert_allclose(Topology.from_graph(graph, rule="metropolis").mixing, metropolis)


def test_two_agents_ring_equals_fully_connected() -> None:
    half = [[0.5, 0.5], [0.5, 0.5]]
    np.testing.assert_array_equal(build_topology("ring", 2).mixing, half)
    np.testing.assert_array_equal(build_topology("fully_connected", 2).mixing, half)
    np.testing.assert_array_equal(build_topology("exponential", 2).mixing, half)


# --------------------------------------------------------------------------- graphs


@pytest.mark.parametrize(
    ("name", "n", "options", "degrees"),
    [
        ("ring", 7, {}, [2] * 7),
        ("fully_connected", 6, {}, [5] * 6),
        ("star", 6, {}, [5, 1, 1, 1, 1, 1]),
        ("torus", 12, {}, [4] * 12),  # 3 x 4
        ("torus", 9, {}, [4] * 9),  # 3 x 3
        ("torus", 6, {}, [3] * 6),  # 2 x 3: the row wrap collapses
        ("torus", 12, {"rows": 2}, [3] * 12),  # 2 x 6
        ("exponential", 8, {}, [5] * 8),  # ±1, ±2, 4
        ("exponential", 10, {}, [6] * 10),  # ±1, ±2, ±4, ±8 = ∓2
        ("exponential", 5, {}, [4] * 5),  # ±1, ±2, ±4 = ∓1
    ],
)
def test_graph_degrees(name: str, n: int, options: dict, degrees: list[int]) -> None:
    topology = build_topology(name, n, **options)
    assert topology.num_agents == n
    assert [topology.degree(i) for i in range(n)] == degrees
    assert topology.graph.number_of_edges() == sum(degrees) // 2
    assert_valid_mixing(topology.mixing)


def test_exponential_neighbours() -> None:
    assert build_topology("exponential", 8).neighbors(0) == [1, 2, 4, 6, 7]


def test_torus_layout() -> None:
    graph = GRAPHS.get("torus")(12)  # rows=3, cols=4; agent r*4 + c
    assert sorted(graph[5]) == [1, 4, 6, 9]
    assert sorted(graph[0]) == [1, 3, 4, 8]


@pytest.mark.parametrize("name", ["ring", "fully_connected", "star", "torus", "exponential"])
@pytest.mark.parametrize("rule", ["metropolis_hastings", "max_degree"])
@pytest.mark.parametrize("n", [4, 9, 16])
def test_every_graph_gives_valid_mixing(name: str, rule: str, n: int) -> None:
    topology = build_topology(name, n, rule=rule)
    assert_valid_mixing(topology.mixing)
    assert 0 <= topology.rho < 1
    assert topology.spectral_gap == pytest.approx(1 - np.sqrt(topology.rho))
    assert topology.eigenvalues[0] == pytest.approx(1.0)
    assert list(topology.eigenvalues) == sorted(topology.eigenvalues, reverse=True)


@pytest.mark.parametrize("name", ["ring", "fully_connected", "torus", "exponential"])
def test_uniform_rule_on_regular_graphs_matches_metropolis(name: str) -> None:
    uniform = build_topology(name, 9, rule="uniform")
    np.testing.assert_allclose(uniform.mixing, build_topology(name, 9).mixing)


def test_erdos_renyi_deterministic_and_connected() -> None:
    first = build_topology("erdos_renyi", 12, p=0.3, seed=3)
    second = build_topology("erdos_renyi", 12, p=0.3, seed=3)
    np.testing.assert_array_equal(first.mixing, second.mixing)
    assert nx.is_connected(first.graph)
    assert_valid_mixing(first.mixing)
    graph = GRAPHS.get("erdos_renyi")(12, p=0.3, seed=3)
    assert nx.utils.graphs_equal(graph, first.graph)


def test_erdos_renyi_resamples_until_connected() -> None:
    seeds = range(50)
    first_connected = next(s for s in seeds if nx.is_connected(nx.gnp_random_graph(10, 0.25, seed=s)))
    assert first_connected > 0  # otherwise this test would not exercise resampling
    graph = GRAPHS.get("erdos_renyi")(10, p=0.25, seed=0)
    assert nx.utils.graphs_equal(graph, nx.gnp_random_graph(10, 0.25, seed=first_connected))


def test_registry_names_and_aliases() -> None:
    assert {"ring", "fully_connected", "star", "torus", "exponential", "erdos_renyi"} <= set(GRAPHS.names())
    assert {"metropolis_hastings", "uniform", "max_degree"} <= set(MIXING_RULES.names())
    assert GRAPHS.get("fc") is GRAPHS.get("fully_connected")
    assert MIXING_RULES.get("metropolis") is MIXING_RULES.get("metropolis_hastings")


# --------------------------------------------------------------------------- accessors


def test_ring_neighbors_and_weights() -> None:
    topology = build_topology("ring", 5)
    assert topology.neighbors(0) == [1, 4]
    assert topology.neighbors(2) == [1, 3]
    assert topology.weights(0) == pytest.approx({0: 1 / 3, 1: 1 / 3, 4: 1 / 3})
    assert set(topology.weights(0)) == {0, 1, 4}


def test_star_neighbors_and_weights() -> None:
    topology = build_topology("star", 5)
    assert topology.neighbors(0) == [1, 2, 3, 4]
    assert topology.neighbors(3) == [0]
    assert topology.weights(3) == pytest.approx({0: 0.2, 3: 0.8})
    assert sum(topology.weights(0).values()) == pytest.approx(1.0)


@pytest.mark.parametrize("agent", [-1, 5, 1.5, True, "0"])
def test_out_of_range_agent(agent: object) -> None:
    with pytest.raises(IndexError, match=r"0\.\.4"):
        build_topology("ring", 5).neighbors(agent)  # type: ignore[arg-type]


def test_mixing_cannot_be_mutated() -> None:
    topology = build_topology("ring", 4)
    with pytest.raises(ValueError, match="read-only"):
        topology.mixing[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        topology.eigenvalues[0] = 0.0
    with pytest.raises(AttributeError):
        topology._mixing = np.eye(4)  # type: ignore[misc]
    np.testing.assert_allclose(topology.mixing[0, 0], 1 / 3)


def test_constructor_copies_its_input() -> None:
    source = np.full((2, 2), 0.5)
    topology = Topology(source)
    source[0, 0] = 9.0
    assert topology.mixing[0, 0] == 0.5


def test_pickle_and_deepcopy() -> None:
    topology = build_topology("star", 5)
    for clone in (pickle.loads(pickle.dumps(topology)), copy.deepcopy(topology)):
        np.testing.assert_array_equal(clone.mixing, topology.mixing)
        assert not clone.mixing.flags.writeable


def test_repr() -> None:
    assert repr(build_topology("fc", 3)) == "Topology(num_agents=3, edges=3, rho=0.0000)"


# --------------------------------------------------------------------------- build_topology inputs


def test_build_from_adjacency_mixing_graph_and_topology() -> None:
    ring = build_topology("ring", 4)
    adjacency = [[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]]
    np.testing.assert_allclose(build_topology(adjacency, 4).mixing, ring.mixing)
    np.testing.assert_allclose(build_topology(np.array(adjacency, dtype=bool), 4).mixing, ring.mixing)
    np.testing.assert_allclose(build_topology(ring.mixing.tolist(), 4).mixing, ring.mixing)
    np.testing.assert_allclose(build_topology(nx.cycle_graph(4), 4).mixing, ring.mixing)
    assert build_topology(ring, 4) is ring


def test_two_agent_swap_matrix_is_read_as_adjacency() -> None:
    np.testing.assert_array_equal(build_topology([[0, 1], [1, 0]], 2).mixing, [[0.5, 0.5], [0.5, 0.5]])


def test_from_graph_relabels_and_ignores_self_loops() -> None:
    graph = nx.Graph([("c", "b"), ("b", "a"), ("a", "a")])
    topology = Topology.from_graph(graph)
    assert topology.neighbors(1) == [0, 2]  # a=0, b=1, c=2
    assert topology.neighbors(0) == [1]


def test_user_registered_topology() -> None:
    @register_topology("test_topology_path", override=True)
    def path(num_agents: int, reverse: bool = False) -> nx.Graph:
        return nx.path_graph(num_agents)

    topology = build_topology("test-topology-path", 3, reverse=True)
    assert [topology.degree(i) for i in range(3)] == [1, 2, 1]
    with pytest.raises(ValueError, match="sideways"):
        build_topology("test_topology_path", 3, sideways=True)


# --------------------------------------------------------------------------- errors


def test_unknown_topology_name() -> None:
    with pytest.raises(ValueError, match=r"Unknown topology 'hypercube'.*ring"):
        build_topology("hypercube", 4)


def test_unknown_rule() -> None:
    with pytest.raises(ValueError, match=r"Unknown mixing rule 'sinkhorn'.*metropolis_hastings"):
        build_topology("ring", 4, rule="sinkhorn")


@pytest.mark.parametrize("n", [1, 0, -3])
def test_too_few_agents(n: int) -> None:
    with pytest.raises(ValueError, match=rf"num_agents must be an integer >= 2 \(.*2 agents\), got {n}\."):
        build_topology("ring", n)


def test_one_by_one_mixing() -> None:
    with pytest.raises(ValueError, match="at least 2 agents"):
        validate_mixing([[1.0]])


def test_not_square() -> None:
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        validate_mixing(np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"square.*\(4,\)"):
        Topology(np.ones(4))


def test_non_finite() -> None:
    with pytest.raises(ValueError, match=r"non-finite.*\(0, 1\) = nan"):
        validate_mixing([[0.5, np.nan], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"\(1, 1\) = inf"):
        validate_mixing([[0.5, 0.5], [0.5, np.inf]])


def test_negative_weights() -> None:
    with pytest.raises(ValueError, match=r"non-negative.*\(0, 1\) = -0\.25"):
        validate_mixing([[1.25, -0.25], [-0.25, 1.25]])


def test_not_symmetric() -> None:
    mixing = [[0.5, 0.3, 0.2], [0.3, 0.5, 0.2], [0.2, 0.2, 0.6]]
    mixing[0][2], mixing[0][1] = 0.3, 0.2  # rows still sum to 1
    with pytest.raises(ValueError, match=r"symmetric.*\(0, 1\) = 0\.2 and \(1, 0\) = 0\.3"):
        validate_mixing(mixing)


def test_not_doubly_stochastic() -> None:
    with pytest.raises(ValueError, match=r"row 1 sums to 1\.1"):
        validate_mixing([[0.5, 0.5, 0.0], [0.5, 0.3, 0.3], [0.0, 0.3, 0.7]])
    with pytest.raises(ValueError, match=r"row 0 sums to 3"):  # adjacency + identity is not a mixing matrix
        build_topology(np.ones((3, 3)), 3)


def test_disconnected() -> None:
    two_pairs = np.kron(np.eye(2), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"disconnected.*\{0, 1\} and \{2, 3\}"):
        validate_mixing(two_pairs)
    with pytest.raises(ValueError, match=r"\{0\}, \{1\} and \{2\}"):
        Topology(np.eye(3))
    with pytest.raises(ValueError, match=r"\{0, 1\} and \{2\}"):
        Topology.from_graph(nx.Graph([(0, 1), (2, 2)]))


def test_uniform_on_irregular_graph() -> None:
    with pytest.raises(ValueError, match=r"regular graphs.*degrees \[1, 4\].*metropolis_hastings"):
        build_topology("star", 5, rule="uniform")


@pytest.mark.parametrize("n", [7, 13])
def test_torus_prime(n: int) -> None:
    with pytest.raises(ValueError, match=rf"N={n}.*rows="):
        build_topology("torus", n)


def test_torus_bad_rows() -> None:
    with pytest.raises(ValueError, match=r"rows=5 for N=12"):
        build_topology("torus", 12, rows=5)
    for rows in (1, 12):  # a side of length 1 is not a torus
        with pytest.raises(ValueError, match=rf"rows={rows} for N=12"):
            build_topology("torus", 12, rows=rows)


def test_erdos_renyi_errors() -> None:
    with pytest.raises(ValueError, match=r"p=0\.01 and N=20.*larger p"):
        build_topology("erdos_renyi", 20, p=0.01, max_tries=3)
    for p in (0, 0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=rf"probability p must be a number in \(0, 1\], got {p}\."):
            build_topology("erdos_renyi", 5, p=p)
    with pytest.raises(ValueError, match="needs an edge probability"):
        build_topology("erdos_renyi", 5)


def test_num_agents_mismatch() -> None:
    with pytest.raises(ValueError, match=r"4 agents but num_agents=5"):
        build_topology(build_topology("ring", 4), 5)
    with pytest.raises(ValueError, match=r"3 agents but num_agents=4"):
        build_topology(nx.cycle_graph(3), 4)
    with pytest.raises(ValueError, match=r"2 agents but num_agents=3"):
        build_topology([[0.5, 0.5], [0.5, 0.5]], 3)


def test_options_with_non_name_topology() -> None:
    with pytest.raises(ValueError, match=r"Options \['rows'\] only apply to a topology given by name"):
        build_topology([[0.5, 0.5], [0.5, 0.5]], 2, rows=2)
    with pytest.raises(ValueError, match=r"Options \['p'\]"):
        build_topology(nx.cycle_graph(3), 3, p=0.5)


def test_directed_graph_refused() -> None:
    with pytest.raises(ValueError, match=r"undirected.*to_undirected"):
        Topology.from_graph(nx.DiGraph([(0, 1), (1, 0)]))


def test_bad_adjacency() -> None:
    with pytest.raises(ValueError, match=r"0/1.*\(0, 1\) = 0\.5"):
        Topology.from_adjacency([[0, 0.5], [0.5, 0]])
    with pytest.raises(ValueError, match=r"symmetric.*\(0, 2\) = 1 and \(2, 0\) = 0"):
        Topology.from_adjacency([[0, 1, 1], [1, 0, 1], [0, 1, 0]])
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        Topology.from_adjacency([[0, 1, 1], [1, 0, 1]])


@pytest.mark.parametrize("n", [2.5, True, "4", None])
def test_num_agents_must_be_an_integer(n: object) -> None:
    with pytest.raises(ValueError, match=rf"num_agents must be an integer >= 2 .*got {n!r}\."):
        build_topology("ring", n)  # type: ignore[arg-type]


def test_graph_options_must_be_integers() -> None:
    with pytest.raises(ValueError, match=r"rows must be an integer \(a divisor of num_agents=12\), got 2\.5"):
        build_topology("torus", 12, rows=2.5)
    for max_tries in (0, 1.5):
        with pytest.raises(ValueError, match=rf"max_tries must be an integer >= 1 .*got {max_tries}\."):
            build_topology("erdos_renyi", 5, p=0.5, max_tries=max_tries)


# --------------------------------------------------------------------------- package layout


def test_package_reexports_the_names_of_the_former_module() -> None:
    names = {
        "GRAPHS": graphs_module.GRAPHS,
        "MIXING_RULES": mixing_module.MIXING_RULES,
        "register_topology": graphs_module.register_topology,
        "register_mixing_rule": mixing_module.register_mixing_rule,
        "validate_mixing": mixing_module.validate_mixing,
        "GraphBuilder": graphs_module.GraphBuilder,
        "MixingRule": mixing_module.MixingRule,
        **{name: getattr(graphs_module, name) for name in ("ring", "fully_connected", "star", "torus")},
        **{name: getattr(graphs_module, name) for name in ("exponential", "erdos_renyi")},
        **{name: getattr(mixing_module, name) for name in ("metropolis_hastings", "uniform", "max_degree")},
    }
    for name, value in names.items():
        assert getattr(topology_package, name) is value, name
    former_all = {"GRAPHS", "MIXING_RULES", "Topology", "build_topology", "register_mixing_rule"}
    assert former_all | {"register_topology", "validate_mixing"} <= set(topology_package.__all__)
    assert GRAPHS.get("torus") is graphs_module.torus


# --------------------------------------------------------------------------- spanning_tree


def tree_depth(parents: dict[int, int | None], agent: int) -> int:
    """Hops from ``agent`` up to the root; fails on a cycle."""
    depth = 0
    while parents[agent] is not None:
        agent = parents[agent]  # type: ignore[assignment]
        depth += 1
        assert depth <= len(parents), "the parent map has a cycle"
    return depth


@pytest.mark.parametrize(
    ("topology", "root"),
    [
        (build_topology("ring", 6), 0),
        (build_topology("ring", 6), 4),
        (build_topology("star", 6), 0),
        (build_topology("star", 6), 3),
        (Topology.from_graph(nx.path_graph(5)), 0),
        (Topology.from_graph(nx.path_graph(5)), 2),
        (build_topology("torus", 12), 5),
        (build_topology("exponential", 10), 7),
        (build_topology("erdos_renyi", 12, p=0.3, seed=3), 11),
    ],
)
def test_spanning_tree_is_a_bfs_tree(topology: Topology, root: int) -> None:
    parents = topology.spanning_tree(root)
    assert set(parents) == set(range(topology.num_agents))
    assert next(iter(parents)) == root
    assert parents[root] is None
    assert [agent for agent, parent in parents.items() if parent is None] == [root]
    distance = nx.single_source_shortest_path_length(topology.graph, root)
    for agent, parent in parents.items():
        if parent is not None:
            assert parent in topology.neighbors(agent)
        assert tree_depth(parents, agent) == distance[agent]
    assert [distance[agent] for agent in parents] == sorted(distance.values())  # breadth-first order


def test_spanning_tree_exact_parents() -> None:
    assert build_topology("ring", 6).spanning_tree() == {0: None, 1: 0, 5: 0, 2: 1, 4: 5, 3: 2}
    assert list(build_topology("ring", 6).spanning_tree()) == [0, 1, 5, 2, 4, 3]
    assert build_topology("star", 5).spanning_tree(3) == {3: None, 0: 3, 1: 0, 2: 0, 4: 0}
    assert build_topology("star", 5).spanning_tree() == {0: None, 1: 0, 2: 0, 3: 0, 4: 0}
    path = Topology.from_graph(nx.path_graph(5))
    assert path.spanning_tree(2) == {2: None, 1: 2, 3: 2, 0: 1, 4: 3}
    assert path.spanning_tree(4) == {4: None, 3: 4, 2: 3, 1: 2, 0: 1}


def test_spanning_tree_breaks_ties_by_smallest_id() -> None:
    # Agent 2 of the 4-cycle is two hops from 0 through 1 and through 3: the smaller id is its parent.
    assert build_topology("ring", 4).spanning_tree(0)[2] == 1
    assert build_topology("ring", 4).spanning_tree(np.int64(2))[0] == 1
    grid = build_topology("torus", 9)  # 3 x 3: agent 4 is two hops from 0 through 1 and through 3
    assert grid.spanning_tree(0)[4] == 1


@pytest.mark.parametrize("root", [-1, 6, 1.0, True])
def test_spanning_tree_bad_root(root: object) -> None:
    with pytest.raises(IndexError, match=rf"agent id in 0\.\.5, got {root!r}"):
        build_topology("ring", 6).spanning_tree(root)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- subgraph


@pytest.mark.parametrize(
    ("topology", "agents"),
    [
        (build_topology("ring", 8), [0, 1, 2, 5]),
        (build_topology("ring", 8), [7, 3, 0]),
        (build_topology("star", 6), [0, 2, 4]),
        (build_topology("star", 6), [1, 5]),
        (build_topology("torus", 12), [0, 1, 4, 5, 6, 11]),
        (build_topology("erdos_renyi", 10, p=0.4, seed=1), list(range(1, 10, 2))),
    ],
)
def test_subgraph_renormalises_rows_over_present_agents(topology: Topology, agents: list[int]) -> None:
    induced = topology.subgraph(agents)
    present = sorted(agents)
    assert induced.agents == tuple(present)
    assert induced.num_agents == len(present)
    assert induced.mixing.shape == (len(present), len(present))
    np.testing.assert_allclose(induced.mixing.sum(axis=1), 1.0, atol=1e-12)
    block = topology.mixing[np.ix_(present, present)]
    np.testing.assert_allclose(induced.mixing, block / block.sum(axis=1, keepdims=True))
    for agent in present:
        weights = induced.weights(agent)
        assert set(weights) <= set(present)
        assert sum(weights.values()) == pytest.approx(1.0)
        assert induced.neighbors(agent) == [j for j in topology.neighbors(agent) if j in present]
        assert induced.degree(agent) == len(induced.neighbors(agent))
        assert agent in induced
        for j, weight in weights.items():  # same proportions as in the full topology
            assert weight * sum(topology.mixing[agent, present]) == pytest.approx(topology.mixing[agent, j])
    for absent in set(range(topology.num_agents)) - set(present):
        assert absent not in induced
        with pytest.raises(IndexError, match="present agents"):
            induced.weights(absent)


def test_subgraph_by_hand() -> None:
    ring = build_topology("ring", 5)  # every weight is 1/3
    induced = ring.subgraph([3, 0, 1])
    np.testing.assert_allclose(induced.mixing, [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert induced.weights(0) == pytest.approx({0: 0.5, 1: 0.5})
    assert induced.weights(3) == {3: 1.0}  # both neighbours absent: agent 3 keeps its own model
    assert induced.neighbors(3) == []
    star = build_topology("star", 4)  # the hub keeps 1/4 and gives 1/4 to each leaf
    assert star.subgraph([0, 2]).weights(0) == pytest.approx({0: 0.5, 2: 0.5})
    assert star.subgraph([0, 2]).weights(2) == pytest.approx({0: 0.25, 2: 0.75})


def test_subgraph_of_every_agent_is_the_topology() -> None:
    topology = build_topology("erdos_renyi", 9, p=0.5, seed=2)
    induced = topology.subgraph(range(9))
    np.testing.assert_allclose(induced.mixing, topology.mixing, atol=1e-12)
    for agent in range(9):
        assert induced.weights(agent) == pytest.approx(topology.weights(agent))


def test_subgraph_agent_without_weight_on_present_agents_keeps_itself() -> None:
    swap = Topology([[0.0, 1.0], [1.0, 0.0]])  # a valid mixing matrix with a zero diagonal
    assert swap.subgraph([1]).mixing.tolist() == [[1.0]]
    assert swap.subgraph([1]).weights(1) == {1: 1.0}
    assert swap.subgraph([0, 1]).mixing.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_subgraph_result_is_read_only_and_picklable() -> None:
    induced = build_topology("ring", 6).subgraph([0, 1, 2])
    with pytest.raises(ValueError, match="read-only"):
        induced.mixing[0, 0] = 1.0
    with pytest.raises(AttributeError, match="immutable"):
        induced._mixing = np.eye(3)  # type: ignore[misc]
    clone = pickle.loads(pickle.dumps(induced))
    assert clone.agents == induced.agents
    np.testing.assert_array_equal(clone.mixing, induced.mixing)
    assert repr(induced) == "InducedMixing(agents=[0, 1, 2])"


def test_subgraph_errors() -> None:
    ring = build_topology("ring", 5)
    with pytest.raises(IndexError, match=r"agent id in 0\.\.4, got 5"):
        ring.subgraph([0, 5])
    with pytest.raises(IndexError, match=r"got 1\.5"):
        ring.subgraph([0, 1.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one present agent"):
        ring.subgraph([])
    with pytest.raises(ValueError, match=r"agents \[1, 3\] are repeated"):
        ring.subgraph([1, 3, 1, 3, 2])


def test_induced_mixing_validates_its_input() -> None:
    with pytest.raises(ValueError, match=r"increasing order, got \[2, 1\]"):
        InducedMixing([2, 1], np.eye(2))
    with pytest.raises(ValueError, match=r"2x2 matrix, got shape \(3, 3\)"):
        InducedMixing([0, 1], np.eye(3))
    with pytest.raises(ValueError, match=r"row of agent 4 sums to 0\.5"):
        InducedMixing([1, 4], [[1.0, 0.0], [0.25, 0.25]])
    with pytest.raises(ValueError, match=r"entry \(0, 1\) = -0\.5"):
        InducedMixing([0, 1], [[1.5, -0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"agent id must be an integer >= 0, got -1"):
        InducedMixing([-1, 0], np.eye(2))


# --------------------------------------------------------------------------- column_stochastic

DIRECTED_RING = [[0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]


def test_column_stochastic_accepts_a_directed_matrix() -> None:
    source = np.array(DIRECTED_RING)
    checked = column_stochastic(source)
    assert checked.dtype == np.float64
    np.testing.assert_array_equal(checked, source)
    np.testing.assert_allclose(checked.sum(axis=0), 1.0)
    assert not np.array_equal(checked, checked.T)  # the graph is directed
    checked[0, 0] = 9.0
    assert source[0, 0] == 0.5  # a copy
    lopsided = [[0.5, 0.5, 0.0], [0.5, 0.25, 0.5], [0.0, 0.25, 0.5]]  # rows sum to 1, 1.25, 0.75
    np.testing.assert_array_equal(column_stochastic(lopsided), lopsided)


def test_column_stochastic_accepts_mixing_matrices_and_tolerance() -> None:
    mixing = build_topology("star", 5).mixing
    np.testing.assert_array_equal(column_stochastic(mixing), mixing)
    nearly = [[0.5, 0.5], [0.5, 0.5 + 1e-9]]
    np.testing.assert_array_equal(column_stochastic(nearly), nearly)
    with pytest.raises(ValueError, match="column 1"):
        column_stochastic(nearly, atol=1e-12)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.full((2, 3), 0.5), r"square N × N with N >= 2, got shape \(2, 3\)"),
        ([[1.0]], r"square N × N with N >= 2, got shape \(1, 1\)"),
        ([0.5, 0.5], r"got shape \(2,\)"),
        ([[0.5, 0.5], [0.5]], "could not be read as a numeric matrix"),
        ([[0.5, np.nan], [0.5, 1.0]], r"finite and >= 0, but entry \(0, 1\) = nan"),
        ([[0.5, 0.5], [0.5, np.inf]], r"entry \(1, 1\) = inf"),
        ([[1.5, 0.5], [-0.5, 0.5]], r"finite and >= 0, but entry \(1, 0\) = -0\.5"),
        (
            [[0.5, 0.0, 0.5], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]],
            r"column-stochastic .* column 2 sums to 1\.5; divide each column by its sum",
        ),
        (
            [[0.5, 1.0, 0.0], [0.0, 0.0, 0.5], [0.5, 0.0, 0.5]],
            r"own push-sum mass, but P\[1\]\[1\] = 0\.0; give the diagonal positive weights",
        ),
        (
            [[0.5, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]],
            r"strongly connected .* splits into \[\[0\], \[1, 2\]\]; add links",
        ),
        (np.eye(3), r"splits into \[\[0\], \[1\], \[2\]\]"),
    ],
    ids=[
        "not-square",
        "one-agent",
        "one-dimensional",
        "ragged",
        "nan",
        "inf",
        "negative",
        "column-sum",
        "zero-diagonal",
        "not-strongly-connected",
        "identity",
    ],
)
def test_column_stochastic_rejects(matrix: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        column_stochastic(matrix)  # type: ignore[arg-type]
