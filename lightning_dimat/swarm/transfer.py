"""The swarm's batch-transfer hooks: each agent's batch goes through the transfer hooks on its own.

Lightning calls ``on_before_batch_transfer``, ``transfer_batch_to_device`` and ``on_after_batch_transfer``
on the module it drives. A training batch is an :class:`~lightning_dimat.swarm.loaders.AgentBatch`, so the
user's hooks (the datamodule's if it overrides them, else the agent's, as in Lightning) run once per agent
batch, inside that agent's random stream. An evaluation batch is shared by all agents and goes through the
hooks once. Without custom hooks, Lightning's defaults move the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_dimat.swarm.loaders import AgentBatch

if TYPE_CHECKING:
    from lightning_dimat.swarm.random_streams import AgentRandomStreams


class AgentBatchTransferHooks(LightningModule):
    """Batch-transfer hooks of :class:`~lightning_dimat.swarm.AgentSwarm` (a mixin; not used on its own)."""

    if TYPE_CHECKING:
        agent_ids: list[int]
        streams: AgentRandomStreams

        def agent(self, agent_id: int) -> LightningModule: ...

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The user's ``on_before_batch_transfer``, applied to each agent's batch."""
        return self._transfer("on_before_batch_transfer", batch, dataloader_idx)

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The user's ``transfer_batch_to_device``, applied to each agent's batch."""
        return self._transfer("transfer_batch_to_device", batch, device, dataloader_idx)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The user's ``on_after_batch_transfer``, applied to each agent's batch."""
        return self._transfer("on_after_batch_transfer", batch, dataloader_idx)

    def transfer_agent_batch(self, hook: str, agent_id: int, batch: Any, *args: Any) -> Any:
        """Runs ``hook`` (a batch-transfer hook) on one of agent ``agent_id``'s batches, in its stream."""
        with self.streams.activate(agent_id):
            return getattr(self._hook_owner(hook, agent_id), hook)(batch, *args)

    def to_device(self, agent_id: int, batch: Any) -> Any:
        """One of agent ``agent_id``'s raw batches, through its three transfer hooks onto the device."""
        batch = self.transfer_agent_batch("on_before_batch_transfer", agent_id, batch, 0)
        batch = self.transfer_agent_batch("transfer_batch_to_device", agent_id, batch, self.device, 0)
        return self.transfer_agent_batch("on_after_batch_transfer", agent_id, batch, 0)

    def _transfer(self, hook: str, batch: Any, *args: Any) -> Any:
        """``hook`` on a Lightning batch: per agent for an ``AgentBatch``, else once (first agent's hook)."""
        if self._overriding_datamodule(hook) is None and not is_overridden(
            hook, self.agent(self.agent_ids[0]), LightningModule
        ):
            return getattr(LightningModule, hook)(self, batch, *args)
        if isinstance(batch, AgentBatch):
            return AgentBatch(
                {
                    agent_id: None
                    if agent_batch is None
                    else self.transfer_agent_batch(hook, agent_id, agent_batch, *args)
                    for agent_id, agent_batch in batch.items()
                }
            )
        return getattr(self._hook_owner(hook, self.agent_ids[0]), hook)(batch, *args)

    def _hook_owner(self, hook: str, agent_id: int) -> LightningDataModule | LightningModule:
        """The datamodule if it overrides the batch-transfer ``hook`` (as in Lightning), else the agent."""
        datamodule = self._overriding_datamodule(hook)
        return self.agent(agent_id) if datamodule is None else datamodule

    def _overriding_datamodule(self, hook: str) -> LightningDataModule | None:
        """The trainer's datamodule if it overrides ``hook``, else ``None``."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and is_overridden(hook, datamodule, LightningDataModule):
            return datamodule
        return None
