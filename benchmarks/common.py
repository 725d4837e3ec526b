"""Pieces shared by the benchmark scripts: an epoch clock and a quiet Trainer."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class EpochClock(Callback):
    """Wall time of every training epoch (synchronising CUDA first), and the device the module trained on."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.device = "unknown"
        self._started = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._started)
        self.device = str(next(pl_module.parameters()).device)  # (teardown moves modules back to the CPU)


def quiet_trainer(accelerator: str, epochs: int, callbacks: list[Callback], **options: Any) -> Trainer:
    """A Trainer on one device without logger, progress bar or model summary."""
    defaults: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": 1,
        "max_epochs": epochs,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
    }
    return Trainer(**{**defaults, **options})
