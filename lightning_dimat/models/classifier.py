"""``ImageClassifier``: a plain LightningModule (nothing DIMAT-specific) around a registered network."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_dimat.models.registry import build_model

OptimizerName = Literal["sgd", "msgd", "adam"]
ScheduleName = Literal["constant", "cosine", "step"]


class ImageClassifier(LightningModule):
    """Cross-entropy classifier; logs ``train_loss``, ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc``.

    Args:
        model: a name in :data:`~lightning_dimat.models.MODELS`.
        model_options: options for that network (e.g. ``{"in_features": 64}``).
        num_classes: number of classes (passed to the network and the accuracy metric).
        optimizer: ``"sgd"``, ``"msgd"`` (SGD with momentum) or ``"adam"`` — the paper's DIMAT-SGD/MSGD/ADAM.
        lr: learning rate.
        momentum: momentum for ``"msgd"``.
        weight_decay: L2 penalty.
        schedule: learning-rate schedule over the run's ``max_epochs``, stepped per epoch: ``"constant"``
            (the paper's), ``"cosine"`` (annealed to 0) or ``"step"`` (×0.1 at 50 % and 75 % of the epochs).

    Examples:
        >>> module = ImageClassifier("mlp", {"in_features": 64}, num_classes=10)
        >>> module(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: str = "mlp",
        model_options: dict[str, Any] | None = None,
        num_classes: int = 10,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        schedule: ScheduleName = "constant",
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "msgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd', 'msgd' or 'adam', got {optimizer!r}.")
        if schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"schedule must be 'constant', 'cosine' or 'step', got {schedule!r}.")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr!r}.")
        self.save_hyperparameters()
        self.net = build_model(model, num_classes=num_classes, **(model_options or {}))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y))
        accuracy(logits, y)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay
            )
        else:
            momentum = hp.momentum if hp.optimizer == "msgd" else 0.0
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=momentum, weight_decay=hp.weight_decay
            )
        if hp.schedule == "constant":
            return optimizer
        epochs = max(1, int(self.trainer.max_epochs or 1))
        if hp.schedule == "cosine":
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        else:
            milestones = [max(1, epochs // 2), max(1, (3 * epochs) // 4)]
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
