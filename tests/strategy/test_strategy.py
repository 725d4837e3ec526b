"""DIMATStrategy + AgentSwarm through the public API: agents, data, optimizers, logging, errors.

What ``fit`` hands back (one agent or the consensus in the user's module: property 8 of DESIGN.md §3) is
tested in tests/test_properties.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BlobsData, TinyNet, agent_states, blobs, make_trainer
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, WeightedRandomSampler

from lightning_dimat import DIMATStrategy, partition


def test_users_exact_line_builds_five_agents_on_a_ring() -> None:
    trainer = Trainer(strategy=DIMATStrategy(topology="ring"), accelerator="cpu", max_epochs=1, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, DIMATStrategy)
    assert strategy.num_agents == 5
    assert strategy.topology.neighbors(0) == [1, 4]
    assert np.allclose(strategy.topology.mixing[0, [0, 1, 4]], 1 / 3)


def test_strategy_registered_by_name() -> None:
    trainer = Trainer(strategy="dimat", accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, DIMATStrategy)


def test_agents_train_to_distinct_weights_with_their_own_optimizers() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3, agent_init="copy"))
    model = TinyNet(momentum=0.9)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    trainer.fit(model, datamodule=BlobsData())
    states = agent_states(trainer)
    for agent_id in range(3):
        assert not torch.equal(states[agent_id]["net.0.weight"], initial["net.0.weight"])
    assert not torch.equal(states[0]["net.0.weight"], states[1]["net.0.weight"])
    assert not torch.equal(states[1]["net.0.weight"], states[2]["net.0.weight"])
    optimizers = trainer.strategy.optimizers[0].optimizers
    swarm = trainer.strategy.swarm
    for agent_id, optimizer in optimizers.items():
        own = {id(p) for p in swarm.agent(agent_id).parameters()}
        assert {id(p) for group in optimizer.param_groups for p in group["params"]} == own
        assert all("momentum_buffer" in optimizer.state[p] for p in swarm.agent(agent_id).parameters())
    assert len({id(optimizer) for optimizer in optimizers.values()}) == 3


def test_reinit_is_seeded_per_agent_and_copy_starts_identical() -> None:
    def initial_agents(**options: Any) -> dict[int, dict[str, Tensor]]:
        trainer = make_trainer(strategy=DIMATStrategy(num_agents=3, **options), max_epochs=0)
        trainer.fit(TinyNet(), datamodule=BlobsData())
        return agent_states(trainer)

    first, second = initial_agents(seed=7), initial_agents(seed=7)
    assert all(torch.equal(first[g]["net.0.weight"], second[g]["net.0.weight"]) for g in range(3))
    assert not torch.equal(first[0]["net.0.weight"], first[1]["net.0.weight"])
    assert not torch.equal(first[0]["net.0.weight"], initial_agents(seed=8)[0]["net.0.weight"])
    copies = initial_agents(agent_init="copy")
    assert torch.equal(copies[0]["net.0.weight"], copies[2]["net.0.weight"])


def test_validating_a_given_module_evaluates_its_weights_on_every_agent() -> None:
    model = TinyNet()
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2))  # agent_init="reinit" applies to fit only
    trainer.validate(model, datamodule=BlobsData(), verbose=False)
    for _, agent in trainer.strategy.swarm.items():
        assert torch.equal(agent.net[0].weight, model.net[0].weight)


def test_metrics_are_logged_per_agent_and_as_their_mean(tmp_path: Any) -> None:
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), logger=logger, log_every_n_steps=1)
    trainer.fit(TinyNet(), datamodule=BlobsData())
    metrics = trainer.callback_metrics
    per_agent = [float(metrics[f"agent_{g}/val_acc"]) for g in range(3)]
    assert float(metrics["val_acc"]) == pytest.approx(sum(per_agent) / 3, abs=1e-6)
    assert len(set(per_agent)) > 1 or per_agent[0] == 1.0
    for name in ("train_loss", "val_loss"):
        assert name in metrics and all(f"agent_{g}/{name}" in metrics for g in range(3))
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_acc", "agent_0/val_acc", "agent_2/train_loss", "train_loss"} <= set(header)


class _MetricModule(TinyNet):
    """Logs a torchmetrics Metric object, updated without forward (its epoch value is compute())."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassF1Score

        self.f1 = MulticlassF1Score(num_classes=4, average="macro")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.f1.update(self(x), y)
        self.log("val_f1", self.f1)


def test_metric_objects_are_averaged_from_each_agents_compute() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), max_epochs=1)
    trainer.fit(_MetricModule(), datamodule=BlobsData())
    metrics = trainer.callback_metrics
    per_agent = [float(metrics[f"agent_{g}/val_f1"]) for g in range(3)]
    assert float(metrics["val_f1"]) == pytest.approx(sum(per_agent) / 3, abs=1e-6)


def test_global_step_counts_batches_not_agents_times_batches() -> None:
    data = BlobsData(batch_size=16, num_samples=240)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), max_epochs=3)
    trainer.fit(TinyNet(), datamodule=data)
    assert trainer.global_step == 3 * math.ceil(80 / 16)


def test_max_steps_counts_batches() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=4), max_epochs=-1, max_steps=7)
    trainer.fit(TinyNet(), datamodule=BlobsData())
    assert trainer.global_step == 7


class _Recorder(TinyNet):
    """Records the samples each agent trains and validates on (a feature column carries the sample id)."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.train_seen: set[int] = set()
        self.val_seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.train_seen.update(batch[0][:, 0].long().tolist())
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_seen.extend(batch[0][:, 0].long().tolist())
        super().validation_step(batch, batch_idx)


def _indexed_blobs(num_samples: int) -> torch.utils.data.TensorDataset:
    points, labels = blobs(num_samples).tensors
    points = points.clone()
    points[:, 0] = torch.arange(num_samples, dtype=torch.float32)
    return torch.utils.data.TensorDataset(points, labels)


@pytest.mark.parametrize("scheme", ["iid", "by_class"])
def test_each_agent_trains_on_its_shard_and_validates_on_the_full_set(scheme: str) -> None:
    train, val = _indexed_blobs(240), _indexed_blobs(80)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=4, partition=scheme, seed=3), max_epochs=1)
    trainer.fit(_Recorder(), DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=32))
    shards = partition(train.tensors[1], 4, scheme, seed=3)
    for agent_id, agent in trainer.strategy.swarm.items():
        assert agent.train_seen == set(shards[agent_id].tolist())
        assert sorted(agent.val_seen) == list(range(80))


def test_gradient_clipping_applies_per_agent() -> None:
    data = BlobsData()
    clipped = make_trainer(strategy=DIMATStrategy(num_agents=2, agent_init="copy"), gradient_clip_val=1e-6)
    model = TinyNet(lr=0.5, dropout=0.0)
    start = model.net[0].weight.detach().clone()
    clipped.fit(model, datamodule=data)
    steps = clipped.global_step
    for _, agent in clipped.strategy.swarm.items():
        # Each SGD step moves an agent by at most lr * clip in norm.
        assert (agent.net[0].weight - start).norm() <= steps * 0.5 * 1e-6 + 1e-9
    free = make_trainer(strategy=DIMATStrategy(num_agents=2, agent_init="copy"))
    free.fit(TinyNet(lr=0.5, dropout=0.0), datamodule=data)
    assert (free.strategy.swarm.agent(0).net[0].weight - start).norm() > 1e-2


def test_accumulate_grad_batches_steps_every_k_batches() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), accumulate_grad_batches=2, max_epochs=2)
    trainer.fit(TinyNet(), datamodule=BlobsData(batch_size=16))
    assert trainer.global_step == 2 * math.ceil(5 / 2)


class _DtypeRecorder(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.logit_dtype = self(batch[0]).dtype
        return super().training_step(batch, batch_idx)


def test_bf16_mixed_precision_with_three_agents() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), precision="bf16-mixed", max_epochs=2)
    trainer.fit(_DtypeRecorder(), datamodule=BlobsData())
    for _, agent in trainer.strategy.swarm.items():
        assert agent.logit_dtype == torch.bfloat16
        assert agent.net[0].weight.dtype == torch.float32
        assert torch.isfinite(agent.net[0].weight).all()
    assert float(trainer.callback_metrics["val_acc"]) > 0.5


class _Scheduled(TinyNet):
    def __init__(self, interval: str) -> None:
        super().__init__()
        self.interval = interval

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


@pytest.mark.parametrize(("interval", "expected_steps"), [("epoch", 2), ("step", 2 * 5)])
def test_each_agent_steps_its_own_lr_scheduler(interval: str, expected_steps: int) -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), max_epochs=2)
    trainer.fit(_Scheduled(interval), datamodule=BlobsData(batch_size=16))
    for _, agent in trainer.strategy.swarm.items():
        assert agent.optimizers().param_groups[0]["lr"] == pytest.approx(0.5**expected_steps)
        assert agent.lr_schedulers().last_epoch == expected_steps


class _Plateau(TinyNet):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}


def test_reduce_on_plateau_monitors_each_agents_own_metric() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=3)
    trainer.fit(_Plateau(), datamodule=BlobsData())
    for agent_id, agent in trainer.strategy.swarm.items():
        scheduler = agent.lr_schedulers()
        assert scheduler.best == pytest.approx(
            min(scheduler.best, float(trainer.callback_metrics[f"agent_{agent_id}/val_loss"]))
        )


def test_validate_and_test_after_fit_reuse_the_trained_agents() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3))
    model = TinyNet()
    trainer.fit(model, datamodule=BlobsData())
    swarm, before = trainer.strategy.swarm, agent_states(trainer)
    results = trainer.test(model, datamodule=BlobsData(), verbose=False)[0]
    assert trainer.strategy.swarm is swarm
    after = agent_states(trainer)
    assert all(torch.equal(before[g][k], after[g][k]) for g in before for k in before[g])
    assert {f"agent_{g}/test_acc" for g in range(3)} | {"test_acc"} <= set(results)
    results_again = trainer.validate(model, datamodule=BlobsData(), verbose=False)[0]
    assert "val_acc" in results_again


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("num_agents", [0, 1, -3, True, 2.5, "3"])
def test_num_agents_below_two_or_not_an_int_is_refused(num_agents: Any) -> None:
    with pytest.raises(ValueError, match=f"num_agents must be an integer >= 2.*{num_agents!r}"):
        DIMATStrategy(num_agents=num_agents)


def test_unknown_topology_partition_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Unknown topology 'rng'.*ring"):
        DIMATStrategy(topology="rng")
    with pytest.raises(ValueError, match="Unknown partition scheme 'non_iiid'"):
        DIMATStrategy(partition="non_iiid")
    with pytest.raises(ValueError, match="Unknown mixing rule 'metropolis_hasting'"):
        DIMATStrategy(mixing_rule="metropolis_hasting")
    with pytest.raises(ValueError, match="agent_init"):
        DIMATStrategy(agent_init="clone")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"export must be .* 0\.\.4, got 7"):
        DIMATStrategy(export=7)


def test_mixing_matrix_that_is_not_doubly_stochastic_is_refused() -> None:
    mixing = [[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.5]]
    with pytest.raises(ValueError, match="sums to"):
        DIMATStrategy(num_agents=3, topology=mixing)


def test_disconnected_graph_is_refused() -> None:
    adjacency = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    with pytest.raises(ValueError, match=r"disconnected|not connected"):
        DIMATStrategy(num_agents=4, topology=adjacency)


def test_sync_batchnorm_is_refused_at_trainer_construction() -> None:
    with pytest.raises(ValueError, match="sync_batchnorm"):
        Trainer(strategy=DIMATStrategy(num_agents=2), sync_batchnorm=True, accelerator="cpu", logger=False)


def test_by_class_with_an_empty_agent_is_refused_before_training() -> None:
    labels = torch.tensor([0] * 30 + [1] * 30 + [2])
    data = torch.utils.data.TensorDataset(torch.randn(61, 8), labels)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=7, partition="by_class"))
    with pytest.raises(ValueError, match=r"by_class .* agent 6"):
        trainer.fit(TinyNet(), DataLoader(data, batch_size=4, shuffle=True))


def test_custom_sampler_is_refused_with_a_clear_error() -> None:
    data = blobs(64)
    loader = DataLoader(data, batch_size=8, sampler=WeightedRandomSampler(torch.ones(64), 64))
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2))
    with pytest.raises(ValueError, match="WeightedRandomSampler"):
        trainer.fit(TinyNet(), loader)


class _Manual(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)


def test_manual_optimization_modules_are_refused() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2))
    with pytest.raises(MisconfigurationException, match="manual optimization"):
        trainer.fit(_Manual(), datamodule=BlobsData())
