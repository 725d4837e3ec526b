"""Each agent's view of the training data (swarm/loaders.py): shard samplers, the agent loader, epoch length
with unequal shards, and cloning the user's loader for a shard."""

from __future__ import annotations

import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_dimat import DIMATStrategy
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
