"""Test helpers: a tiny classification task, a Trainer factory (CPU, quiet, deterministic), and a merging run
that writes and resumes checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dimat import DIMATStrategy, MergeCallback

# The 20-class Tiny ImageNet subset (see shared/data/README.md); tests that need it skip when it is absent.
TINY_ZIP = Path(
    os.environ.get("TINY_IMAGENET_ZIP")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny-imagenet-20.zip"
)


def blobs(num_samples: int = 240, num_classes: int = 4, dim: int = 8, seed: int = 0) -> TensorDataset:
    """Gaussian blobs around random class centres: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * 3
    labels = torch.arange(num_samples) % num_classes
    points = centres[labels] + torch.randn(num_samples, dim, generator=generator)
    return TensorDataset(points, labels)


class BlobsData(LightningDataModule):
    def __init__(self, batch_size: int = 16, num_samples: int = 240, shuffle: bool = True) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set = blobs(num_samples)
        self.val_set = blobs(80, seed=1)
        self.shuffle = shuffle

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


class TinyNet(LightningModule):
    """MLP with BatchNorm and dropout; logs ``train_loss``, ``val_loss``, ``val_acc``, ``test_acc``."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def make_trainer(**overrides: Any) -> Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(overrides)
    return Trainer(**options)


def agent_states(trainer: Trainer) -> dict[int, dict[str, Tensor]]:
    """``{agent id: state_dict}`` of the trained swarm (detached copies)."""
    swarm = trainer.strategy.swarm
    return {
        agent_id: {k: v.detach().clone() for k, v in agent.state_dict().items()}
        for agent_id, agent in swarm.items()
    }


def fit_merging_ring(
    max_epochs: int,
    checkpoints: Path | None = None,
    ckpt_path: Path | None = None,
    every_n_train_steps: int | None = None,
    **options: Any,
) -> Trainer:
    """3 agents on a ring (by_class shards) merging every 2 epochs; with ``checkpoints``, a checkpoint after
    every epoch (or every ``every_n_train_steps`` steps) in that folder; with ``ckpt_path``, resumed from
    it. ``options`` go to DIMATStrategy."""
    callbacks: list[Any] = [MergeCallback(every_n_epochs=2)]
    if checkpoints is not None:
        every = {"every_n_train_steps": every_n_train_steps} if every_n_train_steps else {"every_n_epochs": 1}
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, **every))
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class", **options),
        callbacks=callbacks,
        max_epochs=max_epochs,
        enable_checkpointing=checkpoints is not None,
    )
    # Momentum (optimizer state), dropout and shuffling (random streams) all have to resume exactly.
    trainer.fit(TinyNet(momentum=0.9, dropout=0.3), datamodule=BlobsData(), ckpt_path=ckpt_path)
    return trainer


def checkpoint_of_epoch(directory: Path, epoch: int) -> Path:
    """The one checkpoint ``fit_merging_ring(checkpoints=directory)`` wrote after epoch index ``epoch``."""
    (path,) = directory.glob(f"epoch={epoch}-*.ckpt")
    return path
