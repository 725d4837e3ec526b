"""After ``fit``, ``validate`` and ``test`` report the model the user holds (``consensus/<name>``) next to the
agents, and ``AgentReport`` prints it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dimat import DIMATStrategy, MergeCallback
from tests.helpers import BlobsData, TinyNet, make_trainer


class MetricNet(TinyNet):
    """Logs its test accuracy as a torchmetrics ``Metric`` object (Lightning computes it per epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.test_accuracy = MulticlassAccuracy(num_classes=4, average="micro")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy(self(x).argmax(-1), y)
        self.log("test_acc", self.test_accuracy)


class KeysDuringFit(Callback):
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.keys |= set(trainer.callback_metrics)


def plain_test(model: Any, data: BlobsData) -> float:
    """``test_acc`` of ``model`` itself under a plain Trainer: the number the user would ship."""
    (result,) = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        model, datamodule=data, verbose=False
    )
    return result["test_acc"]


@pytest.mark.parametrize("model_class", [TinyNet, MetricNet])
def test_test_and_validate_after_fit_report_the_consensus_the_user_holds(model_class: type) -> None:
    during_fit = KeysDuringFit()
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, partition="by_class"),
        callbacks=[MergeCallback(every_n_epochs=2, method="activation"), during_fit],
    )
    model, data = model_class(), BlobsData()
    trainer.fit(model, datamodule=data)
    assert not any(key.startswith("consensus/") for key in during_fit.keys)  # none exists while fitting
    (tested,) = trainer.test(model, datamodule=data, verbose=False)
    assert tested["consensus/test_acc"] == pytest.approx(plain_test(model, data), abs=1e-6)
    agents = [tested[f"agent_{g}/test_acc"] for g in range(3)]
    assert tested["test_acc"] == pytest.approx(sum(agents) / 3, abs=1e-6)  # the mean stays over agents
    assert tested["consensus/test_acc"] != pytest.approx(tested["test_acc"])  # a different number, shown
    (validated,) = trainer.validate(model, datamodule=data, verbose=False)
    assert set(validated) >= {"consensus/val_acc", "consensus/val_loss", "val_acc"}
    (again,) = trainer.test(model, datamodule=data, verbose=False)  # Metric state reset between runs
    assert again["consensus/test_acc"] == pytest.approx(tested["consensus/test_acc"], abs=1e-6)


@pytest.mark.parametrize("export", [0, "none"])
def test_without_a_consensus_export_nothing_is_reported_for_it(export: Any) -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2, export=export), max_epochs=1)
    model, data = TinyNet(), BlobsData()
    trainer.fit(model, datamodule=data)
    (tested,) = trainer.test(model, datamodule=data, verbose=False)
    assert not any(key.startswith("consensus/") for key in tested)


def test_a_new_fit_drops_the_consensus_of_the_previous_one() -> None:
    during_fit = KeysDuringFit()
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[during_fit], max_epochs=1)
    model, data = TinyNet(), BlobsData()
    trainer.fit(model, datamodule=data)
    assert trainer.strategy.swarm.held_consensus is not None
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, datamodule=data)
    assert not any(key.startswith("consensus/") for key in during_fit.keys)


class PredictingNet(TinyNet):
    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        (x,) = batch
        return self(x).argmax(-1)


def test_predict_returns_every_agents_predictions_and_a_plain_trainer_the_consensus() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), max_epochs=1)
    model, data = PredictingNet(), BlobsData()
    trainer.fit(model, datamodule=data)
    inputs = data.val_set.tensors[0]
    loader = DataLoader(TensorDataset(inputs), batch_size=32)
    batches = trainer.predict(model, dataloaders=loader)
    assert len(batches) == 3 and all(sorted(batch) == [0, 1, 2] for batch in batches)  # {agent id: ...}
    swarm = trainer.strategy.swarm
    with torch.no_grad():
        for agent_id in range(3):
            expected = swarm.agent(agent_id).eval()(inputs).argmax(-1)
            assert torch.equal(torch.cat([batch[agent_id] for batch in batches]), expected)
        plain = Trainer(logger=False, enable_progress_bar=False).predict(model, dataloaders=loader)
        assert torch.equal(torch.cat(plain), model.eval()(inputs).argmax(-1))  # the consensus's
