"""The paper protocol's building blocks: pre-trained agents shared by init_from, optimizer state after merges,
learning-rate schedules, a smaller Tiny ImageNet training set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_ZIP, BlobsData, TinyNet, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.data import TinyImageNetDataModule
from lightning_dimat.models import ImageClassifier


class _StartingWeights(Callback):
    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.states = {
            g: {k: v.clone() for k, v in a.state_dict().items()} for g, a in trainer.strategy.swarm.items()
        }


def test_init_from_starts_every_agent_from_its_pretrained_weights(tmp_path: Path) -> None:
    pretrain = DIMATStrategy(num_agents=3, seed=0)
    trainer = make_trainer(strategy=pretrain, max_epochs=1)
    trainer.fit(TinyNet(momentum=0.9), datamodule=BlobsData())
    trainer.save_checkpoint(tmp_path / "agents.ckpt")
    pretrained = {g: {k: v.clone() for k, v in a.state_dict().items()} for g, a in pretrain.swarm.items()}

    start = _StartingWeights()
    strategy = DIMATStrategy(num_agents=3, seed=5, topology="ring", init_from=str(tmp_path / "agents.ckpt"))
    second = make_trainer(strategy=strategy, max_epochs=1, callbacks=[start])
    second.fit(TinyNet(momentum=0.9), datamodule=BlobsData())
    for g in range(3):
        for key, value in pretrained[g].items():
            torch.testing.assert_close(start.states[g][key], value, rtol=0, atol=0)
    assert second.current_epoch == 1  # epochs count from 0 again: only the weights are taken
    assert pretrained[0]["net.0.weight"].ne(pretrained[1]["net.0.weight"]).any()


def test_init_from_refuses_a_missing_file_or_another_number_of_agents(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"init_from='nowhere\.ckpt' is not a file"):
        DIMATStrategy(init_from="nowhere.ckpt")
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1)
    trainer.fit(TinyNet(), datamodule=BlobsData())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    strategy = DIMATStrategy(num_agents=3, init_from=str(tmp_path / "two.ckpt"))
    with pytest.raises(ValueError, match="holds 2 DIMAT agents but this run has num_agents=3"):
        make_trainer(strategy=strategy, max_epochs=1).fit(TinyNet(), datamodule=BlobsData())


@pytest.mark.parametrize("optimizer_state", ["keep", "reset"])
def test_optimizer_state_is_kept_or_reset_after_each_merge(optimizer_state: str) -> None:
    strategy = DIMATStrategy(num_agents=3)
    merge = MergeCallback(every_n_epochs=1, method="average", optimizer_state=optimizer_state)
    make_trainer(strategy=strategy, max_epochs=1, callbacks=[merge]).fit(
        TinyNet(momentum=0.9), datamodule=BlobsData()
    )
    for optimizer in strategy.swarm.swarm_optimizer.optimizers.values():
        buffers = [state.get("momentum_buffer") for state in optimizer.state.values()]
        if optimizer_state == "reset":
            assert not optimizer.state
        else:
            assert buffers and all(buffer is not None for buffer in buffers)


def test_optimizer_state_option_is_checked() -> None:
    with pytest.raises(ValueError, match="optimizer_state must be 'keep' or 'reset', got 'drop'"):
        MergeCallback(optimizer_state="drop")


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


def test_tiny_imagenet_train_per_class_keeps_the_first_images_of_each_class() -> None:
    if not TINY_ZIP.is_file():
        pytest.skip(f"{TINY_ZIP} is absent (the 20-class Tiny ImageNet subset, see shared/data/README.md)")
    data = TinyImageNetDataModule(str(TINY_ZIP), image_size=32, train_per_class=7, num_workers=0)
    data.setup("fit")
    assert len(data.train_set) == 20 * 7 and len(data.test_set) == 1000
    assert all(data.train_set.targets[i] == i // 7 for i in range(140))
    with pytest.raises(ValueError, match="train_per_class must be None \\(all\\) or an integer >= 1, got 0"):
        TinyImageNetDataModule(str(TINY_ZIP), train_per_class=0)
