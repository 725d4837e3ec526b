"""The swarm: the LightningModule that trains this process's agents side by side, and its parts.

- :mod:`~lightning_dimat.swarm.swarm`: :class:`AgentSwarm`, the module Lightning drives, and
  :func:`swarm_class_for`.
- :mod:`~lightning_dimat.swarm.optimizer`: :class:`SwarmOptimizer`, the agents' optimizers as one.
- :mod:`~lightning_dimat.swarm.log_routing`: :class:`AgentLogRouter`, per-agent keys and means over agents.
- :mod:`~lightning_dimat.swarm.random_streams`: :class:`AgentRandomStreams`, one random stream per agent.
- :mod:`~lightning_dimat.swarm.loaders`: :class:`AgentLoader` and the per-agent shard loaders.
- :mod:`~lightning_dimat.swarm.transfer`, :mod:`~lightning_dimat.swarm.checkpoints`: the swarm's
  batch-transfer and checkpoint hooks.
"""

from lightning_dimat.swarm.loaders import (
    AgentBatch,
    AgentLoader,
    ShardSampler,
    batches_per_epoch,
    clone_for_shard,
)
from lightning_dimat.swarm.log_routing import AgentLogRouter, agent_key
from lightning_dimat.swarm.optimizer import SwarmOptimizer
from lightning_dimat.swarm.random_streams import (
    LIBRARIES,
    AgentRandomStreams,
    agent_seed,
    seeded,
    untracked_fingerprint,
)
from lightning_dimat.swarm.swarm import AgentSwarm, swarm_class_for

__all__ = [
    "LIBRARIES",
    "AgentBatch",
    "AgentLoader",
    "AgentLogRouter",
    "AgentRandomStreams",
    "AgentSwarm",
    "ShardSampler",
    "SwarmOptimizer",
    "agent_key",
    "agent_seed",
    "batches_per_epoch",
    "clone_for_shard",
    "seeded",
    "swarm_class_for",
    "untracked_fingerprint",
]
