"""Each agent's view of the training data: a shard sampler and a loader that zips the agents' loaders.

The user's training ``DataLoader`` is cloned once per agent with a :class:`ShardSampler` over that
agent's shard (same batch size, workers, collate function, ``drop_last``). :class:`AgentLoader` steps
all local agents' loaders together: one Lightning batch is an :class:`AgentBatch` ``{agent id: batch}``.
An epoch is one pass of every agent over its own shard; an agent whose shard is exhausted before the
longest one sits the remaining steps out (its entry is ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from lightning_dimat.swarm.random_streams import AgentRandomStreams, agent_seed


class ShardSampler(Sampler[int]):
    """Yields one agent's shard, reshuffled every epoch from ``(seed, agent id, epoch)`` when ``shuffle``.

    Args:
        indices: the dataset indices of the agent's shard.
        shuffle: reshuffle the shard every epoch (else yield it in the given order).
        seed: the run seed.
        agent_id: the agent's global id.

    Examples:
        >>> sampler = ShardSampler([4, 7, 9], shuffle=False)
        >>> list(sampler)
        [4, 7, 9]
    """

    def __init__(self, indices: Sequence[int], shuffle: bool, seed: int = 0, agent_id: int = 0) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.shuffle = shuffle
        self.seed = seed
        self.agent_id = agent_id
        self.epoch = 0
        self.start = 0
        """Positions of the epoch's order to skip in the next pass only (resuming mid-epoch)."""

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order :meth:`__iter__` yields (Lightning calls it every epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = self.indices
        if self.shuffle:
            generator = np.random.default_rng(agent_seed(self.seed, self.agent_id, 1, self.epoch))
            order = order[generator.permutation(len(order))]
        start, self.start = self.start, 0
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        return len(self.indices)


class AgentBatch(dict):
    """One training step's batches, ``{global agent id: batch or None}`` (``None``: that agent sits out)."""


class _EpochSetter:
    """What Lightning's ``_set_sampler_epoch`` finds as ``loader.sampler``: forwards ``set_epoch``."""

    def __init__(self, samplers: Sequence[ShardSampler]) -> None:
        self._samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        """Sets ``epoch`` on every agent's sampler."""
        for sampler in self._samplers:
            sampler.set_epoch(epoch)


class AgentLoader:
    """Steps the local agents' loaders together for ``num_batches`` steps per epoch.

    Args:
        loaders: ``{global agent id: DataLoader over that agent's shard}`` for the local agents.
        num_batches: steps per epoch, the longest shard's batch count over *all* agents (also remote
            ones), so that every process runs the same number of steps.
        streams: the agents' random streams; each agent's data is drawn inside its own stream.
    """

    def __init__(
        self, loaders: Mapping[int, DataLoader], num_batches: int, streams: AgentRandomStreams
    ) -> None:
        self.loaders = dict(loaders)
        self.num_batches = num_batches
        self.streams = streams
        self.sampler = _EpochSetter([loader.sampler for loader in self.loaders.values()])
        self._skip = 0

    def __len__(self) -> int:
        return self.num_batches

    def resume_after(self, batches: int) -> None:
        """Makes the next pass start after its first ``batches`` steps, as if they had been drawn: the
        rest of an epoch interrupted by a mid-epoch checkpoint. Every agent's shard order is a function
        of (seed, agent, epoch), so skipping positions of it reproduces the batches the uninterrupted
        run draws; the iterators are created without drawing from the agents' random streams, which the
        checkpoint restored to their state at that step."""
        self._skip = batches

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the position in an epoch is restored by the strategy from the fit loop's progress
        (:meth:`resume_after`). Having the method tells Lightning that this loader resumes mid-epoch."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`state_dict`."""

    def __iter__(self) -> Iterator[AgentBatch]:
        skip, self._skip = self._skip, 0
        iterators: dict[int, Iterator[Any] | None] = {}
        for agent_id, loader in self.loaders.items():
            with self.streams.activate(agent_id):
                if not skip:
                    iterators[agent_id] = iter(loader)
                    continue
                assert isinstance(loader.sampler, ShardSampler) and loader.batch_size is not None
                loader.sampler.start = skip * loader.batch_size
                state = torch.get_rng_state()  # creating an iterator draws a seed: not this time
                iterators[agent_id] = iter(loader)
                torch.set_rng_state(state)
        for _ in range(self.num_batches - skip):
            batch = AgentBatch()
            for agent_id in self.loaders:
                batch[agent_id] = self._next(agent_id, iterators)
            yield batch

    def _next(self, agent_id: int, iterators: dict[int, Iterator[Any] | None]) -> Any:
        """Agent ``agent_id``'s next batch, drawn in its stream; ``None`` once its shard is exhausted."""
        iterator = iterators[agent_id]
        if iterator is None:
            return None
        with self.streams.activate(agent_id):
            try:
                return next(iterator)
            except StopIteration:
                iterators[agent_id] = None
                return None


def batches_per_epoch(shard_size: int, batch_size: int, drop_last: bool) -> int:
    """Number of batches a loader over ``shard_size`` items yields.

    Examples:
        >>> batches_per_epoch(10, 4, drop_last=False), batches_per_epoch(10, 4, drop_last=True)
        (3, 2)
    """
    return shard_size // batch_size if drop_last else math.ceil(shard_size / batch_size)


def clone_for_shard(dataloader: DataLoader, indices: Sequence[int], seed: int, agent_id: int) -> DataLoader:
    """The user's loader with its sampler replaced by one over ``indices`` (shuffled iff the original was).

    Raises:
        ValueError: for an iterable-style dataset, a custom sampler or a custom batch sampler, which
            cannot be restricted to a shard without changing their meaning.
    """
    if not isinstance(dataloader, DataLoader):
        raise ValueError(
            f"DIMATStrategy shards a torch DataLoader across agents, got a {type(dataloader).__name__}. "
            "Return a torch.utils.data.DataLoader from train_dataloader()."
        )
    if dataloader.batch_size is None:
        raise ValueError(
            "DIMATStrategy needs the training DataLoader to batch with `batch_size=...`; a custom "
            f"batch_sampler ({type(dataloader.batch_sampler).__name__}) cannot be restricted to a shard."
        )
    sampler = dataloader.sampler
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler._num_samples is not None:
            raise ValueError(
                "DIMATStrategy cannot shard a RandomSampler with replacement or num_samples; "
                "use DataLoader(shuffle=True)."
            )
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    else:
        raise ValueError(
            f"DIMATStrategy builds each agent's sampler from its shard and cannot keep the training "
            f"DataLoader's {type(sampler).__name__}. Use DataLoader(shuffle=True) or shuffle=False."
        )
    return _update_dataloader(dataloader, ShardSampler(indices, shuffle, seed, agent_id))
