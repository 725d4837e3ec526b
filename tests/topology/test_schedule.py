"""Time-varying topologies: schedules of graphs per round, their checks, and merges on them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.comm.transport import plan_exchange
from lightning_dimat.topology import SCHEDULES, Topology, TopologySchedule, build_schedule, build_topology
from tests.helpers import BlobsData, TinyNet, make_trainer

PAIRS_A = np.kron(np.eye(2), np.full((2, 2), 0.5))  # {0, 1} and {2, 3} average
PAIRS_B = PAIRS_A[[0, 2, 1, 3]][:, [0, 2, 1, 3]]  # {0, 2} and {1, 3} average


def test_one_peer_exponential_on_8_agents() -> None:
    schedule = build_schedule("one_peer_exponential", 8)
    assert schedule is not None and schedule.period == 3
    for round_index, hop in enumerate([1, 2, 4, 1]):
        topology = schedule(round_index)
        assert [topology.neighbors(i) for i in range(8)] == [[(i + hop) % 8] for i in range(8)]
        assert topology.receivers(0) == [(0 - hop) % 8]  # directed: one message out, one in
        np.testing.assert_allclose(topology.mixing.sum(0), 1.0)  # doubly stochastic
    product = np.eye(8)
    for round_index in range(schedule.period):
        product = schedule(round_index).mixing @ product
    np.testing.assert_allclose(product, np.full((8, 8), 1 / 8), atol=1e-12)  # exact average


def test_random_matching_is_seeded_perfect_and_changes_per_round() -> None:
    schedule = build_schedule("random_matching", 6, seed=3)
    again = build_schedule("random_matching", 6, seed=3)
    other = build_schedule("random_matching", 6, seed=4)
    assert schedule is not None and again is not None and other is not None
    for round_index in range(5):
        topology = schedule(round_index)
        assert all(topology.degree(i) == 1 for i in range(6))  # a perfect matching
        np.testing.assert_array_equal(topology.mixing, again(round_index).mixing)
        np.testing.assert_allclose(topology.mixing, topology.mixing.T)
    assert any(not np.array_equal(schedule(r).mixing, schedule(r + 1).mixing) for r in range(4))
    assert any(not np.array_equal(schedule(r).mixing, other(r).mixing) for r in range(4))
    odd = build_schedule("random_matching", 5)
    assert odd is not None and sorted(odd(0).degree(i) for i in range(5)) == [0, 1, 1, 1, 1]


def test_a_list_of_topologies_alternates_as_declared() -> None:
    strategy = DIMATStrategy(num_agents=4, topology=[PAIRS_A.tolist(), PAIRS_B.tolist()])
    for round_index in range(5):
        expected = PAIRS_A if round_index % 2 == 0 else PAIRS_B
        np.testing.assert_array_equal(strategy.topology_for_round(round_index).mixing, expected)
    assert strategy.topology.neighbors(0) == [1, 2]  # the union over the period
    assert build_schedule("ring", 4) is None  # a static graph is not a schedule
    assert "one_peer_exponential" in SCHEDULES and "random_matching" in SCHEDULES


def test_schedules_refuse_a_union_that_leaves_agents_apart_and_bad_rounds() -> None:
    with pytest.raises(ValueError, match=r"never connects agents \{0, 1\} and \{2, 3\}"):
        DIMATStrategy(num_agents=4, topology=[PAIRS_A.tolist(), PAIRS_A.tolist()])
    not_stochastic = PAIRS_A.copy()
    not_stochastic[0, 0] = 0.9
    with pytest.raises(ValueError, match=r"Round 1 of the schedule: .*row 0 sums to 1\.4"):
        TopologySchedule(lambda r: PAIRS_B if r == 0 else not_stochastic, 4, period=2)
    with pytest.raises(ValueError, match="needs period="):
        TopologySchedule(lambda r: PAIRS_A, 4)
    with pytest.raises(ValueError, match="at least one topology"):
        TopologySchedule([], 4)


def test_directed_rounds_plan_consistent_exchanges_between_processes() -> None:
    """What rank a receives from rank b is exactly what b sends to a, on a directed round."""
    schedule = build_schedule("one_peer_exponential", 8)
    assert schedule is not None
    for round_index in range(3):
        plans = [plan_exchange(schedule(round_index), 2, rank) for rank in range(2)]
        for rank, peer in ((0, 1), (1, 0)):
            assert plans[rank].receives.get(peer, []) == plans[peer].sends.get(rank, [])
        pickled = Topology(schedule(round_index).mixing, symmetric=False, connected=False)
        assert pickled.__reduce__()[0](*pickled.__reduce__()[1]).neighbors(0) == pickled.neighbors(0)


class Parameters(Callback):
    """Every agent's parameters (not BatchNorm statistics) after each epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[int, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs.append(
            {
                agent_id: torch.cat([p.detach().flatten().clone() for p in agent.parameters()])
                for agent_id, agent in trainer.strategy.swarm.items()
            }
        )


def test_merges_follow_the_schedule_round_by_round() -> None:
    """No learning (lr=0): round 0 averages pairs {0,1},{2,3}; round 1 pairs {0,2},{1,3} — the mean of all."""
    seen = Parameters()
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=4, topology=[PAIRS_A.tolist(), PAIRS_B.tolist()]),
        callbacks=[MergeCallback(every_n_epochs=1, method="average"), seen],
        max_epochs=2,
    )
    model = TinyNet(lr=0.0, dropout=0.0)
    initial: dict[int, torch.Tensor] = {}

    class Initial(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            for agent_id, agent in trainer.strategy.swarm.items():
                initial[agent_id] = torch.cat([p.detach().flatten().clone() for p in agent.parameters()])

    trainer.callbacks.insert(0, Initial())
    trainer.fit(model, datamodule=BlobsData())
    first, second = seen.epochs
    torch.testing.assert_close(first[0], (initial[0] + initial[1]) / 2)
    torch.testing.assert_close(first[2], (initial[2] + initial[3]) / 2)
    mean = sum(initial.values()) / 4
    for agent_id in range(4):
        torch.testing.assert_close(second[agent_id], mean)


def test_a_static_topology_behaves_as_before() -> None:
    strategy = DIMATStrategy(num_agents=5, topology="ring")
    assert strategy.schedule is None
    assert strategy.topology_for_round(7) is strategy.topology
    np.testing.assert_array_equal(strategy.topology.mixing, build_topology("ring", 5).mixing)


def test_a_run_on_a_schedule_resumes_on_the_same_schedule_only(tmp_path: Any) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(topology: Any, epochs: int, ckpt_path: Any = None) -> None:
        trainer = make_trainer(
            strategy=DIMATStrategy(num_agents=4, topology=topology),
            callbacks=[MergeCallback(every_n_epochs=1), ModelCheckpoint(dirpath=tmp_path, filename="last")],
            enable_checkpointing=True,
            max_epochs=epochs,
        )
        trainer.fit(TinyNet(), datamodule=BlobsData(), ckpt_path=ckpt_path)

    fit("one_peer_exponential", 1)
    fit("one_peer_exponential", 2, ckpt_path=tmp_path / "last.ckpt")  # the same schedule: resumes
    with pytest.raises(ValueError, match=r"topology \(schedule: checkpoint 'one_peer_exponential'"):
        fit("random_matching", 3, ckpt_path=tmp_path / "last.ckpt")
