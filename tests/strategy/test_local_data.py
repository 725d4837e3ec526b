"""Shards that cannot train are refused at the start of fit, naming the agents (strategy/local_data.py)."""

from __future__ import annotations

import pytest
from helpers import BlobsData, TinyNet, make_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_dimat import DIMATStrategy


class DropLastData(BlobsData):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)


class NoBatchNorm(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _fit(model: TinyNet, data: BlobsData) -> None:
    make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1).fit(model, datamodule=data)


def test_an_agent_without_a_full_batch_under_drop_last_is_refused() -> None:
    # 66 samples, 2 agents: shards of 33 < batch 64; before, the agents silently took 0 optimizer steps.
    with pytest.raises(
        ValueError, match=r"agents \[0, 1\] get no full batch \(shard sizes \{0: 33, 1: 33\}\)"
    ):
        _fit(TinyNet(), DropLastData(batch_size=64, num_samples=66))


def test_a_last_batch_of_one_sample_is_refused_only_with_batchnorm1d() -> None:
    # Shards of 33 with batch 16 end with a batch of 1: BatchNorm1d would crash at the end of the epoch.
    with pytest.raises(
        ValueError, match=r"agents \[0, 1\] \(sizes \{0: 33, 1: 33\}\) end with a batch of one"
    ):
        _fit(TinyNet(), BlobsData(batch_size=16, num_samples=66))
    _fit(NoBatchNorm(), BlobsData(batch_size=16, num_samples=66))  # no BatchNorm: trains
    _fit(TinyNet(), DropLastData(batch_size=16, num_samples=66))  # the fix the message names: trains
