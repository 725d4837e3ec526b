"""Per-agent data: shard samplers, the agent loader, random streams, placement, batch-transfer hooks."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_dimat import DIMATStrategy
from lightning_dimat.comm.placement import agents_on_rank, rank_of_agent
from lightning_dimat.registry import Registry
from lightning_dimat.swarm import (
    AgentBatch,
    AgentLoader,
    AgentRandomStreams,
    ShardSampler,
    batches_per_epoch,
    clone_for_shard,
)


def test_shard_sampler_reshuffles_per_epoch_deterministically() -> None:
    sampler = ShardSampler(range(10, 30), shuffle=True, seed=1, agent_id=2)
    first = list(sampler)
    assert sorted(first) == list(range(10, 30)) and first != list(range(10, 30))
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(ShardSampler(range(10, 30), shuffle=True, seed=1, agent_id=3)) != first
    assert list(ShardSampler([5, 1, 3], shuffle=False)) == [5, 1, 3]


def test_agent_loader_steps_agents_together_and_idles_exhausted_ones() -> None:
    data = TensorDataset(torch.arange(20).float())
    loaders = {
        0: DataLoader(data, batch_size=4, sampler=ShardSampler(range(0, 12), shuffle=False)),
        1: DataLoader(data, batch_size=4, sampler=ShardSampler(range(12, 20), shuffle=False)),
    }
    loader = AgentLoader(loaders, num_batches=3, streams=AgentRandomStreams(0, [0, 1]))
    batches = list(loader)
    assert len(loader) == 3 and all(isinstance(batch, AgentBatch) for batch in batches)
    assert batches[0][0][0].tolist() == [0, 1, 2, 3] and batches[0][1][0].tolist() == [12, 13, 14, 15]
    assert batches[2][0][0].tolist() == [8, 9, 10, 11] and batches[2][1] is None


def test_unequal_shards_give_the_longest_shard_as_epoch_length() -> None:
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, partition="dirichlet", partition_options={"alpha": 0.3})
    )
    trainer.fit(TinyNet(), datamodule=BlobsData(batch_size=8))
    longest = max(len(shard) for shard in trainer.strategy.shards)
    assert trainer.global_step == 2 * batches_per_epoch(longest, 8, drop_last=False)


def test_clone_for_shard_keeps_loader_settings_and_refuses_what_it_cannot_shard() -> None:
    data = TensorDataset(torch.arange(20).float())
    loader = DataLoader(data, batch_size=3, shuffle=True, drop_last=True)
    clone = clone_for_shard(loader, [1, 2, 3, 4, 5, 6, 7], seed=0, agent_id=1)
    assert clone.batch_size == 3 and clone.drop_last and isinstance(clone.sampler, ShardSampler)
    assert clone.sampler.shuffle and len(list(clone)) == 2
    sequential = clone_for_shard(DataLoader(data, batch_size=3), [4, 5], seed=0, agent_id=0)
    assert not sequential.sampler.shuffle
    with pytest.raises(ValueError, match="replacement"):
        clone_for_shard(
            DataLoader(data, sampler=torch.utils.data.RandomSampler(data, replacement=True)), [1], 0, 0
        )
    with pytest.raises(ValueError, match="batch_sampler"):
        batch_sampler = torch.utils.data.BatchSampler(range(20), batch_size=4, drop_last=False)
        clone_for_shard(DataLoader(data, batch_sampler=batch_sampler), [1], 0, 0)


def test_random_streams_are_per_agent_and_leave_the_global_stream_alone() -> None:
    every = ("torch", "numpy", "python")
    streams = AgentRandomStreams(seed=5, agent_ids=[0, 1], libraries=every)
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    with streams.activate(0):
        a0 = (torch.rand(2), np.random.rand(), random.random())
    with streams.activate(1):
        b0 = torch.rand(2)
    with streams.activate(0):
        a1 = torch.rand(2)
        with streams.activate(0):  # re-entrant: continues the same stream
            a2 = torch.rand(2)
    assert torch.equal(torch.rand(3), expected_global)
    assert not torch.equal(a0[0], b0) and not torch.equal(a0[0], a1) and not torch.equal(a1, a2)
    replay = AgentRandomStreams(seed=5, agent_ids=[0, 1], libraries=every)
    with replay.activate(0):
        assert torch.equal(torch.rand(2), a0[0])
        assert np.random.rand() == a0[1] and random.random() == a0[2]


def test_random_streams_round_trip_through_state_dict() -> None:
    streams = AgentRandomStreams(seed=0, agent_ids=[3, 4])
    with streams.activate(3):
        torch.rand(5)
    saved = streams.state_dict()
    with streams.activate(3):
        expected = torch.rand(4)
    restored = AgentRandomStreams(seed=99, agent_ids=[3, 4])
    restored.load_state_dict(saved)
    with restored.activate(3):
        assert torch.equal(torch.rand(4), expected)
    with pytest.raises(KeyError, match="agent 7"):
        AgentRandomStreams(seed=0, agent_ids=[7]).load_state_dict(saved)


class _NumpyNoise(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        noisy = x + torch.from_numpy(np.random.randn(*x.shape).astype("float32"))
        return super().training_step((noisy, y), batch_idx)


def test_untracked_numpy_randomness_warns_and_tracking_it_keeps_agents_independent() -> None:
    with pytest.warns(UserWarning, match=r"random_streams=\('torch', 'numpy', 'python'\)"):
        make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1).fit(
            _NumpyNoise(), datamodule=BlobsData()
        )

    def agent_one(num_agents: int) -> torch.Tensor:
        strategy = DIMATStrategy(num_agents=num_agents, random_streams=("torch", "numpy"), partition="iid")
        trainer = make_trainer(strategy=strategy, max_epochs=1)
        trainer.fit(_NumpyNoise(), datamodule=BlobsData())
        return trainer.strategy.swarm.agent(1).net[0].weight.detach().clone()

    # Agent 1's numpy draws come from its own stream, not from the global one.
    np.random.seed(0)
    first = agent_one(2)
    np.random.seed(1)
    assert torch.equal(first, agent_one(2))


def test_random_streams_option_is_validated() -> None:
    with pytest.raises(ValueError, match="random_streams must include 'torch'"):
        DIMATStrategy(random_streams=("numpy",))
    with pytest.raises(ValueError, match="random_streams must include 'torch'"):
        DIMATStrategy(random_streams=("torch", "jax"))


@pytest.mark.parametrize(("num_agents", "world_size"), [(5, 1), (5, 2), (8, 2), (7, 3), (4, 4)])
def test_placement_gives_contiguous_blocks_covering_every_agent_once(
    num_agents: int, world_size: int
) -> None:
    blocks = [agents_on_rank(num_agents, world_size, rank) for rank in range(world_size)]
    assert [agent for block in blocks for agent in block] == list(range(num_agents))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert all(rank_of_agent(agent, num_agents, world_size) == r for r, b in enumerate(blocks) for agent in b)


def test_placement_refuses_more_processes_than_agents() -> None:
    with pytest.raises(ValueError, match="3 processes for 2 agents"):
        agents_on_rank(2, 3, 0)


class _ScalingData(BlobsData):
    """A datamodule whose batch-transfer hook doubles the inputs: it must see one agent's batch at a time."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        assert not isinstance(batch, AgentBatch), "the datamodule hook got the whole agent batch"
        x, y = batch
        return x * 0 + 7, y


class _SeesSevens(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert torch.all(batch[0] == 7)
        self.saw_training = True
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        assert torch.all(batch[0] == 7)
        super().validation_step(batch, batch_idx)


def test_datamodule_batch_transfer_hooks_apply_to_each_agents_batch() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1)
    trainer.fit(_SeesSevens(), datamodule=_ScalingData())
    assert all(agent.saw_training for _, agent in trainer.strategy.swarm.items())


def test_registry_lookup_aliases_and_errors() -> None:
    registry: Registry[int] = Registry("thing")
    registry.add("one-thing", 1, "uno")
    assert registry.get("ONE_thing") == 1 and registry.get("uno") == 1
    assert "one_thing" in registry and registry.names() == ["one_thing"]
    with pytest.raises(ValueError, match="already registered"):
        registry.add("uno", 2)
    with pytest.raises(ValueError, match=r"Unknown thing 'two'\. Known: one_thing"):
        registry.get("two")
    with pytest.raises(TypeError, match="named by a string"):
        registry.get(3)  # type: ignore[arg-type]
