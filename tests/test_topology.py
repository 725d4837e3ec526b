"""Tests for lightning_dimat.topology: graphs, mixing rules, spectra and validation errors."""

from __future__ import annotations

import copy
import pickle

import networkx as nx
import numpy as np
import pytest

from lightning_dimat.topology import (
    GRAPHS,
    MIXING_RULES,
    Topology,
    build_topology,
    register_topology,
    validate_mixing,
)


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


@pytest.mark.parametrize("agent", [-1, 5, 1.5])
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
    with pytest.raises(ValueError, match=rf"at least 2 agents, got num_agents={n}"):
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
        with pytest.raises(ValueError, match=rf"0 < p <= 1, got p={p}"):
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
