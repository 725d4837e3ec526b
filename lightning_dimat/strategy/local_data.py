"""Each local agent's shard of the training data, and its batches drawn in its own random stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from lightning_dimat.partition import dataset_labels, partition
from lightning_dimat.swarm.loaders import AgentLoader, batches_per_epoch, clone_for_shard
from lightning_dimat.swarm.random_streams import AgentRandomStreams, seeded

Prepare = Callable[[int, Any], Any]
"""Moves one of an agent's raw batches onto the device (transfer hooks, precision): ``(agent id, batch)``."""


class AgentData:
    """The local agents' shards of the training set, their loaders, and batches drawn from them.

    Args:
        num_agents: agents over all processes (the partition covers all of them).
        scheme: the partition scheme's name; ``options`` its options.
        seed: seeds the partition and every agent's shuffling.
    """

    def __init__(self, num_agents: int, scheme: str, options: dict[str, Any], seed: int) -> None:
        self.num_agents = num_agents
        self.scheme = scheme
        self.options = options
        self.seed = seed
        self.shards: list[np.ndarray] | None = None
        self.loaders: dict[int, DataLoader] = {}

    def shard(
        self,
        dataloader: DataLoader,
        agent_ids: list[int],
        streams: AgentRandomStreams,
        batchnorm: bool = False,
    ) -> AgentLoader:
        """Splits ``dataloader``'s dataset over all agents; the loader of the local agents' shards.

        Refuses, naming the agents, shards that cannot train: no full batch under ``drop_last=True``, or
        a last batch of a single sample when ``batchnorm`` (the model has ``BatchNorm1d``, which cannot
        train on one sample).
        """
        labels = dataset_labels(dataloader.dataset)
        self.shards = partition(labels, self.num_agents, self.scheme, self.seed, **self.options)
        batch_size, drop_last = dataloader.batch_size, dataloader.drop_last
        assert batch_size is not None
        sizes = {agent_id: len(shard) for agent_id, shard in enumerate(self.shards)}
        idle = {g: n for g, n in sizes.items() if batches_per_epoch(n, batch_size, drop_last) == 0}
        if idle:
            raise ValueError(
                f"With batch_size={batch_size} and drop_last=True agents {sorted(idle)} get no full batch "
                f"(shard sizes {idle}) and would never train; lower the batch size, set drop_last=False, "
                "or choose a partition that gives every agent enough samples."
            )
        single = {g: n for g, n in sizes.items() if batchnorm and not drop_last and n % batch_size == 1}
        if single:
            raise ValueError(
                f"With batch_size={batch_size} the shards of agents {sorted(single)} (sizes {single}) end "
                "with a batch of one sample, on which BatchNorm cannot train; set drop_last=True in the "
                "training DataLoader or change the batch size."
            )
        self.loaders = {
            agent_id: clone_for_shard(dataloader, self.shards[agent_id], self.seed, agent_id)
            for agent_id in agent_ids
        }
        num_batches = max(batches_per_epoch(n, batch_size, drop_last) for n in sizes.values())
        return AgentLoader(self.loaders, num_batches, streams)

    def _loader(self, agent_id: int) -> DataLoader:
        if agent_id not in self.loaders:
            raise RuntimeError(
                f"Agent {agent_id} has no training data yet: local data exists only while fitting."
            )
        return self.loaders[agent_id]

    def example_batch(self, agent_id: int, prepare: Prepare, device: Any, streams: AgentRandomStreams) -> Any:
        """One batch of the agent's shard, prepared, drawn without touching any random stream: the global
        ones, nor the agent's own, which ``prepare`` (its transfer hooks) runs in."""
        loader = self._loader(agent_id)
        with streams.preserved(agent_id):
            with seeded(0, device):
                batch = next(iter(loader))
            return prepare(agent_id, batch)

    def batches(
        self, agent_id: int, num_batches: int | None, streams: AgentRandomStreams, prepare: Prepare
    ) -> Iterator[Any]:
        """Up to ``num_batches`` of the agent's own batches, prepared, drawn in its random stream."""
        loader = self._loader(agent_id)
        with streams.activate(agent_id):
            iterator = iter(loader)
        count = 0
        while num_batches is None or count < num_batches:
            with streams.activate(agent_id):
                batch = next(iterator, None)
            if batch is None:
                return
            yield prepare(agent_id, batch)
            count += 1
