"""MergeCallback(basis="shared"): all agents brought into one basis along a spanning tree, once."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import BlobsData, TinyNet, agent_states, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dimat import ActivationMatcher, DIMATStrategy, MergeCallback
from lightning_dimat.permutation import permute_state, random_permutations
from lightning_dimat.permutation.cache import spec_for
from lightning_dimat.permutation.shared_basis import basis_permutations, moved_fraction

PROBE = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))


class _PermuteAgentsAtStart(Callback):
    """Turns the agents (copies of one model) into randomly permuted copies: the same function, N bases."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        generator = torch.Generator().manual_seed(3)
        for agent_id, agent in trainer.strategy.swarm.items():
            spec = spec_for(agent, PROBE)
            if agent_id > 0:
                permuted = permute_state(agent.state_dict(), spec, random_permutations(spec, generator))
                agent.load_state_dict(permuted)


class _RecordingMerge(MergeCallback):
    """Checks, around entering the shared basis, that functions and the next SGD step do not change."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.entered = 0
        self.output_change = 0.0
        self.step_change = 0.0

    def enter_shared_basis(self, trainer: Trainer) -> tuple[float, float]:
        swarm = trainer.strategy.swarm
        before = {}
        for agent_id, agent in swarm.items():
            twin = copy.deepcopy(agent)
            optimizer = swarm.swarm_optimizer.optimizers[agent_id]
            twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
            twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            before[agent_id] = (twin, twin_optimizer)
        received = super().enter_shared_basis(trainer)
        self.received = received[0]
        self.entered += 1
        x, y = PROBE, torch.arange(len(PROBE)) % 4
        for agent_id, agent in swarm.items():
            twin, twin_optimizer = before[agent_id]
            with torch.no_grad():
                self.output_change = max(
                    self.output_change, float((agent.eval()(x) - twin.eval()(x)).abs().max())
                )
            # One SGD-momentum step for each (a copy of the agent, so that training is not disturbed).
            stepped = copy.deepcopy(agent)
            stepped_optimizer = torch.optim.SGD(stepped.parameters(), lr=0.1, momentum=0.9)
            stepped_optimizer.load_state_dict(
                copy.deepcopy(swarm.swarm_optimizer.optimizers[agent_id].state_dict())
            )
            for model, model_optimizer in ((stepped, stepped_optimizer), (twin, twin_optimizer)):
                model.train()
                model_optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                model_optimizer.step()
            with torch.no_grad():
                self.step_change = max(
                    self.step_change, float((stepped.eval()(x) - twin.eval()(x)).abs().max())
                )
            agent.train()
        return received


def _fit(
    callbacks: list[Callback],
    max_epochs: int = 1,
    lr: float = 0.1,
    partition: str = "by_class",
    agent_init: str = "copy",
) -> Trainer:
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=6, topology="ring", partition=partition, agent_init=agent_init),
        callbacks=callbacks,
        max_epochs=max_epochs,
    )
    torch.manual_seed(0)  # the module the agents are copies of
    trainer.fit(TinyNet(lr=lr, momentum=0.9, dropout=0.0), datamodule=BlobsData())
    return trainer


def test_entering_the_shared_basis_changes_no_function_and_no_next_step() -> None:
    merge = _RecordingMerge(every_n_epochs=1, method="activation", num_batches=2, basis="shared")
    _fit([merge])
    assert merge.entered == 1 and merge.basis_built
    assert merge.output_change <= 1e-4
    assert merge.step_change <= 1e-4


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_permuted_copies_of_one_model_become_identical_weights_on_a_ring_of_6(method: str) -> None:
    # (IID shards: every hidden unit varies on every agent's data, so activations identify each unit.)
    merge = MergeCallback(every_n_epochs=1, method=method, num_batches=3, basis="shared")
    trainer = _fit([_PermuteAgentsAtStart(), merge], lr=0.0, partition="iid")
    states = agent_states(trainer)
    names = [name for name, _ in trainer.strategy.swarm.agent(0).named_parameters()]
    for agent_id in states:
        for name in names:
            assert torch.allclose(states[agent_id][name], states[0][name], atol=1e-6), (agent_id, name)
    # In one basis, the merge itself moved nothing.
    assert float(trainer.callback_metrics["merge/permuted_fraction"]) == 0.0


def test_in_their_own_bases_permuted_copies_keep_permuting_every_merge() -> None:
    merge = MergeCallback(every_n_epochs=1, method="activation", num_batches=2, basis="own")
    trainer = _fit([_PermuteAgentsAtStart(), merge], lr=0.0)
    assert float(trainer.callback_metrics["merge/permuted_fraction"]) > 0.5


def test_at_identity_bias_0_the_shared_basis_gives_the_own_bases_functions() -> None:
    # Matching is equivariant: re-matching at λ = 0 picks, in the shared basis, the same units the own basis
    # picks (relabelled), so every agent computes the same function under both — only the labels differ.
    # What a shared basis changes comes from λ > 0 or rematch_every (tested above and below).
    def fit(basis: str) -> Trainer:
        merge = MergeCallback(
            every_n_epochs=1, method="activation", num_batches=2, basis=basis, rematch_every=1
        )
        return _fit([merge], max_epochs=3, agent_init="reinit")  # agents initialised independently

    own, shared = fit("own"), fit("shared")
    assert float(own.callback_metrics["merge/permuted_fraction"]) > 0.5  # own bases: re-permuted every round
    largest = 0.0
    for agent_id, agent in own.strategy.swarm.items():
        twin = shared.strategy.swarm.agent(agent_id)
        with torch.no_grad():
            largest = max(largest, float((agent.eval()(PROBE) - twin.eval()(PROBE)).abs().max()))
    assert largest <= 1e-4
    different_weights = [
        agent_id
        for agent_id, agent in own.strategy.swarm.items()
        if not torch.allclose(agent.net[0].weight, shared.strategy.swarm.agent(agent_id).net[0].weight)
    ]
    assert different_weights  # the same functions in different bases, not the same run twice


def test_an_infinite_identity_bias_is_plain_averaging() -> None:
    never_moves = MergeCallback(every_n_epochs=1, method=ActivationMatcher(identity_bias=1e9), num_batches=2)
    average = MergeCallback(every_n_epochs=1, method="average", num_batches=2)
    biased, plain = (
        agent_states(_fit([never_moves], max_epochs=2)),
        agent_states(_fit([average], max_epochs=2)),
    )
    for agent_id in plain:
        for key in plain[agent_id]:
            assert torch.allclose(biased[agent_id][key], plain[agent_id][key], atol=1e-6), (agent_id, key)


@pytest.mark.parametrize("probes", ["pre_activation", "stage_output"])
def test_entering_the_shared_basis_moves_no_unit_of_copies_of_one_model_only_before_the_relu(
    probes: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Why "pre_activation" stays the default: six copies of one model, each trained one epoch on its own
    # classes, are still aligned unit for unit. Matched on their (2 batches of) pre-activations none of their
    # units moves; after the ReLU, where a unit is zero on much of an agent's data, 22 % of them do — the
    # spurious re-matching a shared basis then pays for at every merge.
    merge = MergeCallback(every_n_epochs=1, method=ActivationMatcher(probes=probes), num_batches=2)
    with caplog.at_level(logging.INFO):
        _fit([merge], max_epochs=1)
    (message,) = [record.getMessage() for record in caplog.records if "shared basis:" in record.getMessage()]
    moved = re.search(r"(\d+)% of their units moved", message)
    assert moved is not None, message
    assert (int(moved.group(1)) == 0) == (probes == "pre_activation"), message


class _ForwardsPerRound(MergeCallback):
    """Records the extra forward samples (matching + BatchNorm) each merge round counted."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.by_agent: list[dict[int, int]] = []

    def merge(self, trainer: Trainer, pl_module: LightningModule) -> None:
        before = dict(self.ledger.state_dict()["forward_samples"])
        super().merge(trainer, pl_module)
        after = self.ledger.state_dict()["forward_samples"]
        self.by_agent.append({g: after[g] - before.get(g, 0) for g in after})

    @property
    def forwards(self) -> list[int]:
        """The forward samples of each round, over all agents."""
        return [sum(counts.values()) for counts in self.by_agent]


def test_never_rematching_in_the_shared_basis_is_an_infinite_identity_bias_without_its_forwards() -> None:
    options = {"every_n_epochs": 1, "num_batches": 2, "basis": "shared"}
    never = MergeCallback(method="activation", rematch_every=None, **options)
    biased = MergeCallback(method=ActivationMatcher(identity_bias=1e9), rematch_every=1, **options)
    thin, full = _fit([never], max_epochs=3), _fit([biased], max_epochs=3)
    expected, actual = agent_states(full), agent_states(thin)
    for agent_id in expected:
        for key in expected[agent_id]:
            assert torch.allclose(actual[agent_id][key], expected[agent_id][key], atol=1e-6), (agent_id, key)
    # Both align once; only the biased one runs its neighbours' forward passes at every round after.
    thin_forwards = float(thin.callback_metrics["comm/forward_samples"])
    full_forwards = float(full.callback_metrics["comm/forward_samples"])
    assert thin_forwards < full_forwards


def test_entering_the_shared_basis_counts_one_message_per_tree_edge() -> None:
    merge = _RecordingMerge(every_n_epochs=1, method="activation", num_batches=2, basis="shared")
    trainer = _fit([merge])
    metrics = trainer.callback_metrics
    # 6 agents on a ring: its spanning tree has 5 edges, each carrying the parent's state to the child once;
    # then the merge round sends each agent's state to its 2 neighbours.
    assert metrics["comm/messages_sent"] == 5 + 6 * 2
    state_bytes = metrics["comm/bytes_sent"] / (5 + 6 * 2)
    assert merge.received == 5 * state_bytes  # (what enter_shared_basis returned)
    assert metrics["merge/bytes"] == metrics["comm/bytes_sent"]  # the first merge's bytes include the tree's


def test_rematch_every_thins_the_rounds_that_match() -> None:
    options = {"every_n_epochs": 1, "method": "activation", "num_batches": 2, "rematch_every": 2}
    shared = _ForwardsPerRound(basis="shared", **options)
    _fit([shared], max_epochs=4)
    # Rounds 0 and 2 run the neighbours on each agent's data; rounds 1 and 3 only re-estimate BatchNorm.
    # Round 0 also enters the shared basis: every agent but the tree's root runs its parent's model and its
    # own on its batches — twice the samples its BatchNorm re-estimation forwards.
    matching, averaging = shared.forwards[2], shared.forwards[1]
    assert shared.forwards[1:] == [averaging, matching, averaging] and averaging < matching
    first, third, batchnorm = shared.by_agent[0], shared.by_agent[2], shared.by_agent[1]
    assert sorted((first[g] - third[g]) / batchnorm[g] for g in first) == [0, 2, 2, 2, 2, 2]
    own = _ForwardsPerRound(basis="own", **options)  # agents in their own bases must always match
    _fit([own], max_epochs=2)
    assert own.forwards == [matching, matching]
    with pytest.raises(ValueError, match="rematch_every"):
        MergeCallback(rematch_every=0)


def test_resuming_keeps_the_shared_basis_and_the_weights(tmp_path: Path) -> None:
    def run(max_epochs: int, merge: MergeCallback, **fit: Any) -> Trainer:
        checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(
            strategy=DIMATStrategy(num_agents=4, topology="ring", partition="by_class"),
            callbacks=[merge, checkpoints],
            max_epochs=max_epochs,
            enable_checkpointing=True,
        )
        trainer.fit(TinyNet(momentum=0.9, dropout=0.0), datamodule=BlobsData(), **fit)
        return trainer

    options = {"every_n_epochs": 1, "method": "activation", "num_batches": 2, "basis": "shared"}
    uninterrupted = run(3, _RecordingMerge(**options))
    resumed_merge = _RecordingMerge(**options)
    (checkpoint,) = tmp_path.glob("epoch=1-*.ckpt")
    resumed = run(3, resumed_merge, ckpt_path=checkpoint)
    assert resumed_merge.basis_built and resumed_merge.entered == 0  # not rebuilt after resuming
    expected, actual = agent_states(uninterrupted), agent_states(resumed)
    for agent_id in expected:
        for key in expected[agent_id]:
            assert torch.equal(expected[agent_id][key], actual[agent_id][key]), (agent_id, key)


def test_tree_composition_and_moved_fraction() -> None:
    parents = {0: None, 1: 0, 2: 1, 3: 0}
    pairwise = {g: {"h": torch.randperm(5, generator=torch.Generator().manual_seed(g))} for g in (1, 2, 3)}
    paths = basis_permutations(parents, pairwise)
    x = torch.arange(5) * 10
    # Agent 2 → its parent 1's basis → the root's basis.
    assert torch.equal(x[paths[2]["h"]], x[pairwise[2]["h"]][pairwise[1]["h"]])
    assert paths[0] == {} and moved_fraction({}) == 0.0
    with pytest.raises(ValueError, match="exactly one root"):
        basis_permutations({0: None, 1: None}, {})
    with pytest.raises(ValueError, match=r"Agents \[2\] have a parent but no permutation"):
        basis_permutations({0: None, 1: 0, 2: 1}, {1: pairwise[1]})
