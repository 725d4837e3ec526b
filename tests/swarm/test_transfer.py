"""The swarm's batch-transfer hooks (swarm/transfer.py): the datamodule's hooks see one agent's batch."""

from __future__ import annotations

from typing import Any

import torch
from helpers import BlobsData, TinyNet, make_trainer

from lightning_dimat import DIMATStrategy
from lightning_dimat.swarm import AgentBatch


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
