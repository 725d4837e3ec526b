"""Lightning features under DIMATStrategy: clipping and precision options, exact metric means, hooks,
multiple evaluation loaders, accumulation-aware step counts, and clear errors for what is not supported."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import BlobsData, TinyNet, make_trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_dimat import DIMATStrategy


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_explicit_gradient_clip_algorithm_is_applied_per_agent(algorithm: str) -> None:
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=2, agent_init="copy"),
        gradient_clip_val=1e-6,
        gradient_clip_algorithm=algorithm,
        max_epochs=1,
    )
    model = TinyNet(lr=1.0, dropout=0.0)
    start = model.net[0].weight.detach().clone()
    trainer.fit(model, datamodule=BlobsData())
    moved = (trainer.strategy.swarm.agent(0).net[0].weight - start).abs().max()
    assert moved <= trainer.global_step * 1.0 * 1e-6 * 1.05  # (5%: float32 rounding of the updates)


class _Overflow(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        scale = 1e30 if self.global_step == 0 else 1.0
        return super().training_step(batch, batch_idx) * scale

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_step_skipped_by_the_fp16_grad_scaler_is_survived() -> None:
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=2), plugins=[plugin], max_epochs=1, limit_train_batches=3
    )
    trainer.fit(_Overflow(), datamodule=BlobsData())
    for _, agent in trainer.strategy.swarm.items():
        assert agent.lr_schedulers().last_epoch == 3
        assert torch.isfinite(agent.net[0].weight).all()


class _Counts(TinyNet):
    """Logs the batch size with reduce_fx='sum' and the loss: their epoch values per agent are known."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("seen", float(len(batch[1])), reduce_fx="sum", on_step=False, on_epoch=True)
        self.log("epoch_loss", loss, on_step=False, on_epoch=True)
        return loss


def test_epoch_means_over_agents_are_exact_with_unequal_shards() -> None:
    strategy = DIMATStrategy(num_agents=3, partition="dirichlet", partition_options={"alpha": 0.3})
    trainer = make_trainer(strategy=strategy, max_epochs=1)
    trainer.fit(_Counts(), datamodule=BlobsData(batch_size=16))
    metrics = trainer.callback_metrics
    sizes = [len(shard) for shard in trainer.strategy.shards]
    assert len(set(sizes)) > 1
    assert [float(metrics[f"agent_{g}/seen"]) for g in range(3)] == sizes
    assert float(metrics["seen"]) == pytest.approx(sum(sizes) / 3)
    per_agent = [float(metrics[f"agent_{g}/epoch_loss"]) for g in range(3)]
    assert float(metrics["epoch_loss"]) == pytest.approx(sum(per_agent) / 3, rel=1e-6)


class _SpelledReductions(TinyNet):
    """Logs with reduce_fx spelled as Lightning also accepts them: "avg" and upper case."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("seen", float(len(batch[1])), reduce_fx="SUM", on_step=False, on_epoch=True)
        self.log("mean_size", float(len(batch[1])), reduce_fx="avg", on_step=False, on_epoch=True)
        return loss


def test_reductions_spelled_as_lightning_accepts_them_reduce_per_agent() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1)
    trainer.fit(_SpelledReductions(), datamodule=BlobsData(batch_size=16))
    sizes = [len(shard) for shard in trainer.strategy.shards]
    metrics = trainer.callback_metrics
    assert [float(metrics[f"agent_{g}/seen"]) for g in range(2)] == sizes
    # (Lightning's epoch mean weighs each batch by its size: Σ size² / Σ size)
    batches = [16] * (sizes[0] // 16) + ([sizes[0] % 16] if sizes[0] % 16 else [])
    assert float(metrics["agent_0/mean_size"]) == pytest.approx(sum(b * b for b in batches) / sizes[0])


class _Lazy(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def test_layers_built_in_configure_model_are_exported() -> None:
    model = _Lazy()
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2, export=1), max_epochs=1)
    trainer.fit(model, datamodule=BlobsData())
    assert torch.equal(model.net[0].weight, trainer.strategy.swarm.agent(1).net[0].weight)


class _Hooks(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def prepare_data(self) -> None:
        self._count("prepare_data")

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._count("on_validation_batch_start")

    def on_before_zero_grad(self, optimizer: Any) -> None:
        assert optimizer is self.optimizers()
        self._count("on_before_zero_grad")

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._count("on_before_backward")
        self.last_loss = float(loss)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.own_loss = float(loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert float(outputs) == self.own_loss
        self._count("on_train_batch_end")


def test_hooks_reach_each_agent_with_its_own_arguments() -> None:
    model = _Hooks()
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1)
    trainer.fit(model, datamodule=BlobsData())
    steps, val_batches = trainer.global_step, math.ceil(80 / 32)
    for _, agent in trainer.strategy.swarm.items():
        assert agent.calls["on_validation_batch_start"] == val_batches
        assert agent.calls["on_before_zero_grad"] == steps
        assert agent.calls["on_before_backward"] == steps == agent.calls["on_train_batch_end"]
        assert agent.last_loss == pytest.approx(agent.own_loss)
    assert (
        trainer.strategy.swarm.agent(0).calls.get("prepare_data", 0) + model.calls.get("prepare_data", 0) == 1
    )


class _TwoValidationSets(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.accuracies = nn.ModuleList([MulticlassAccuracy(4), MulticlassAccuracy(4)])

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        accuracy = self.accuracies[dataloader_idx]
        accuracy.update(self(batch[0]), batch[1])
        self.log("val_acc", accuracy)


def test_metric_means_are_kept_per_validation_dataloader() -> None:
    data = BlobsData()
    loaders = [DataLoader(data.val_set, batch_size=32), DataLoader(data.train_set, batch_size=32)]
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1)
    trainer.fit(_TwoValidationSets(), DataLoader(data.train_set, batch_size=16, shuffle=True), loaders)
    metrics = trainer.callback_metrics
    for index in (0, 1):
        agents = [float(metrics[f"agent_{g}/val_acc/dataloader_idx_{index}"]) for g in range(2)]
        assert float(metrics[f"val_acc/dataloader_idx_{index}"]) == pytest.approx(sum(agents) / 2)
    assert "val_acc" not in metrics


class _TrainAccuracy(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self(batch[0])
        self.train_acc.update(logits, batch[1])
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, batch[1])


def test_training_metric_means_are_flushed_at_the_training_epoch_end_only(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import CSVLogger

    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=2), max_epochs=2, val_check_interval=0.5, logger=CSVLogger(tmp_path)
    )
    trainer.fit(_TrainAccuracy(), datamodule=BlobsData(batch_size=8))
    rows = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [row.split(",") for row in rows[1:] if row.split(",")[header.index("train_acc")]]
    assert len(logged) == 2  # once per epoch, not at the mid-epoch validations
    agents = [float(trainer.callback_metrics[f"agent_{g}/train_acc"]) for g in range(2)]
    assert float(trainer.callback_metrics["train_acc"]) == pytest.approx(sum(agents) / 2)


class _StepCounter(TinyNet):
    def configure_optimizers(self) -> Any:
        self.expected_steps = self.trainer.estimated_stepping_batches
        return super().configure_optimizers()


def test_estimated_stepping_batches_accounts_for_accumulation() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), accumulate_grad_batches=4, max_epochs=2)
    model = _StepCounter()
    trainer.fit(model, datamodule=BlobsData(batch_size=8))
    assert trainer.strategy.swarm.agent(0).expected_steps == trainer.global_step == 2 * math.ceil(15 / 4)


def test_several_training_dataloaders_are_refused_clearly() -> None:
    data = BlobsData()
    loader = DataLoader(data.train_set, batch_size=16, shuffle=True)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1)
    with pytest.raises(TypeError, match="exactly one training dataloader"):
        trainer.fit(TinyNet(), [loader, loader])


class _TwoOptimizers(TinyNet):
    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[4].parameters(), lr=0.1),
        ]


class _NoLoss(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return {"logits": self(batch[0])}


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (_TwoOptimizers, "returns several optimizers"),
        (_NoLoss, r"Agent 0's training_step returned a dict without 'loss' \(keys: \['logits'\]\)"),
    ],
)
def test_modules_dimat_cannot_train_get_a_clear_error(module: type, message: str) -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1)
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(module(), datamodule=BlobsData())


def test_bad_seed_and_partition_options_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got 'x'"):
        DIMATStrategy(seed="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        DIMATStrategy(seed=-1)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got 1\.7"):
        DIMATStrategy(seed=1.7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"partition 'iid' takes no option\(s\) \['alpha'\]"):
        DIMATStrategy(partition="iid", partition_options={"alpha": 0.5})


@pytest.mark.parametrize("method", ["average", "activation"])
def test_merging_under_bf16_true_precision(method: str) -> None:
    from lightning_dimat import MergeCallback

    merge = MergeCallback(every_n_epochs=1, method=method, num_batches=2)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=2), precision="bf16-true", callbacks=[merge], max_epochs=1
    )
    model = TinyNet()
    trainer.fit(model, datamodule=BlobsData())
    for _, agent in trainer.strategy.swarm.items():
        assert agent.net[0].weight.dtype == torch.bfloat16
        assert torch.isfinite(agent.net[0].weight.float()).all()
    assert merge.round == 1 and torch.isfinite(model.net[0].weight.float()).all()
