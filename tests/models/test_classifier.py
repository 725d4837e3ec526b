"""ImageClassifier (models/classifier.py): the learning-rate schedules of the paper protocol."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_dimat.models import ImageClassifier


@pytest.mark.parametrize(("schedule", "expected"), [("constant", 0.1), ("cosine", 0.05), ("step", 0.01)])
def test_classifier_schedules_follow_max_epochs(schedule: str, expected: float) -> None:
    module = ImageClassifier("mlp", {"in_features": 64, "hidden": [8]}, lr=0.1, schedule=schedule)
    trainer = Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    configured = module.configure_optimizers()
    if schedule == "constant":
        assert isinstance(configured, torch.optim.SGD)
        return
    scheduler = configured["lr_scheduler"]["scheduler"]
    for _ in range(2):  # halfway through the 4 epochs
        configured["optimizer"].step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match="schedule must be 'constant', 'cosine' or 'step', got 'linear'"):
        ImageClassifier(schedule="linear")
