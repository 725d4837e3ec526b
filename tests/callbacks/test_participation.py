"""Agents that drop out of a round: ``MergeCallback(participation=p)``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

from lightning_dimat import DIMATStrategy, MergeCallback
from tests.helpers import BlobsData, TinyNet, agent_states, make_trainer

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class StatesAtEpochEnd(Callback):
    """Every agent's state at each epoch end (placed before or after the merge callback)."""

    def __init__(self) -> None:
        self.epochs: list[dict[int, dict[str, torch.Tensor]]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs.append(agent_states(trainer))


def fit(participation: float | None, epochs: int = 2, seed: int = 0) -> tuple[Any, MergeCallback, list]:
    options = {} if participation is None else {"participation": participation}
    merge = MergeCallback(every_n_epochs=1, method="average", **options)
    before, after = StatesAtEpochEnd(), StatesAtEpochEnd()
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=5, topology="ring", partition="by_class", seed=seed),
        callbacks=[before, merge, after],
        max_epochs=epochs,
    )
    trainer.fit(TinyNet(dropout=0.0), datamodule=BlobsData())
    return trainer, merge, [before.epochs, after.epochs]


def test_participation_one_is_todays_behaviour() -> None:
    default, _, _ = fit(None)
    everyone, merge, _ = fit(1.0)
    assert merge.absent_agents == []
    for agent_id, state in agent_states(default).items():
        for key, value in state.items():
            assert torch.equal(value, agent_states(everyone)[agent_id][key]), (agent_id, key)


def test_absent_agents_are_unchanged_and_neighbours_renormalise_over_those_present() -> None:
    trainer, merge, (before, after) = fit(0.5, epochs=1)
    absent = merge.absent_agents
    assert 0 < len(absent) < 5, "the draw for seed 0 should leave some agents out and keep some in"
    assert trainer.callback_metrics["merge/absent_agents"] == len(absent)
    for agent_id in absent:
        for key, value in before[0][agent_id].items():
            assert torch.equal(value, after[0][agent_id][key]), (agent_id, key)
    topology = trainer.strategy.topology
    present = [g for g in range(5) if g not in absent]
    for agent_id in present:
        used = [j for j in [agent_id, *topology.neighbors(agent_id)] if j not in absent]
        weights = torch.tensor([topology.weights(agent_id)[j] for j in used])
        weights = weights / weights.sum()
        for key, value in after[0][agent_id].items():
            if key.endswith(BUFFERS):
                continue  # re-estimated
            expected = sum(w * before[0][j][key] for w, j in zip(weights.tolist(), used, strict=True))
            torch.testing.assert_close(value, expected, msg=f"agent {agent_id} {key}")


def test_absent_agents_send_and_receive_nothing_in_the_counts() -> None:
    trainer, merge, _ = fit(0.5, epochs=1, seed=2)
    absent, metrics = merge.absent_agents, trainer.callback_metrics
    assert absent == [0, 2]  # (seed 2's draw: agent 1 is present but has no present neighbour)
    topology = trainer.strategy.topology
    present = [g for g in range(5) if g not in absent]
    state_bytes = metrics["comm/bytes_sent"] / sum(
        sum(i not in absent for i in topology.receivers(g)) for g in present
    )
    pairs = sum(j not in absent for g in present for j in topology.neighbors(g))
    # The merge's bytes are what the present agents received from present neighbours: the ledger's bytes sent.
    assert metrics["merge/bytes"] == metrics["comm/bytes_sent"] == pairs * state_bytes > 0
    for g in range(5):  # an absent agent took part in no round
        assert float(metrics.get(f"comm/agent_{g}/rounds", 0)) == (0 if g in absent else 1), g


def test_draws_are_seeded_and_change_per_round() -> None:
    _, first, _ = fit(0.6, epochs=1)
    _, again, _ = fit(0.6, epochs=1)
    assert first.absent_agents == again.absent_agents
    draws = set()
    merge = MergeCallback(participation=0.6)
    strategy = DIMATStrategy(num_agents=5)
    for merge.round in range(6):
        draws.add(tuple(sorted(merge._absent_this_round(strategy))))
    assert len(draws) > 1


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, "half"])
def test_participation_outside_zero_one_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"participation must be a number in \(0.0, 1.0\]"):
        MergeCallback(participation=bad)
