"""MergeCallback in a real Trainer: schedule, merge math, what is logged, post-merge validation, errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.merge import combine, matcher_spec, resolve_matcher


class _Snapshots(Callback):
    """Copies every agent's state right before the merge callback runs (it must come first in the list)."""

    def __init__(self) -> None:
        self.before: list[dict[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.is_last_batch:
            swarm = trainer.strategy.swarm
            self.before.append(
                {
                    g: {k: v.detach().clone() for k, v in agent.state_dict().items()}
                    for g, agent in swarm.items()
                }
            )


def _states(trainer: Trainer) -> dict[int, dict[str, torch.Tensor]]:
    return {
        g: {k: v.detach().clone() for k, v in a.state_dict().items()}
        for g, a in trainer.strategy.swarm.items()
    }


class _Frozen(TinyNet):
    """lr = 0: training leaves weights alone, so the state after fit is the state after the last merge."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("topology", ["ring", "fully_connected", "star"])
def test_average_merge_preserves_the_mean_of_the_agents_parameters(topology: str) -> None:
    snapshots = _Snapshots()
    merge = MergeCallback(every_n_epochs=1, method="average", recompute_batchnorm=False)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=4, topology=topology), callbacks=[snapshots, merge], max_epochs=1
    )
    trainer.fit(_Frozen(), datamodule=BlobsData())
    before, after = snapshots.before[-1], _states(trainer)
    mixing = trainer.strategy.topology.mixing
    for key, value in before[0].items():
        if not torch.is_floating_point(value):
            continue
        mean_before = torch.stack([before[g][key] for g in range(4)]).mean(0)
        mean_after = torch.stack([after[g][key] for g in range(4)]).mean(0)
        assert torch.allclose(mean_before, mean_after, atol=1e-6), key
        expected_0 = sum(float(mixing[0, j]) * before[j][key] for j in range(4))
        assert torch.allclose(after[0][key], expected_0, atol=1e-6), key


def test_average_merge_of_identical_agents_is_the_identity() -> None:
    snapshots = _Snapshots()
    merge = MergeCallback(every_n_epochs=1, method="average", recompute_batchnorm=False)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, agent_init="copy"), callbacks=[snapshots, merge], max_epochs=1
    )
    trainer.fit(_Frozen(), datamodule=BlobsData())
    before, after = snapshots.before[-1], _states(trainer)
    parameters = [name for name, _ in trainer.strategy.swarm.agent(0).named_parameters()]
    for g in range(3):
        for key in parameters:  # (BatchNorm buffers differ: each agent ran forward passes on its own data)
            assert torch.allclose(after[g][key], before[g][key], atol=1e-6)


def test_merge_schedule_every_n_epochs_and_start_epoch() -> None:
    merge = MergeCallback(every_n_epochs=2, start_epoch=3)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[merge], max_epochs=8)
    trainer.fit(TinyNet(), datamodule=BlobsData(num_samples=64))
    assert merge.merged_epochs == [3, 5, 7]
    assert merge.round == 3


def test_merge_metrics_are_logged() -> None:
    merge = MergeCallback(every_n_epochs=1)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=4, topology="ring"), callbacks=[merge], max_epochs=2
    )
    model = TinyNet()
    trainer.fit(model, datamodule=BlobsData())
    metrics = trainer.callback_metrics
    assert float(metrics["merge/round"]) == 2.0
    state_size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert float(metrics["merge/bytes"]) == 4 * 2 * state_size  # 4 agents, 2 ring neighbours each
    assert float(metrics["merge/spectral_gap"]) == pytest.approx(trainer.strategy.topology.spectral_gap)
    assert float(metrics["merge/time_s"]) > 0
    assert float(metrics["merge/consensus_distance_after"]) < float(
        metrics["merge/consensus_distance_before"]
    )


class _BatchNormProbe(TinyNet):
    """Counts the samples whose features went through forward in train mode with gradients off (BN passes)."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.recalibration_ids: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not torch.is_grad_enabled():
            self.recalibration_ids.update(x[:, 0].long().tolist())
        return super().forward(x)


def test_batchnorm_is_recomputed_on_each_agents_own_data_only() -> None:
    points, labels = BlobsData().train_set.tensors
    points = points.clone()
    points[:, 0] = torch.arange(len(points), dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(points, labels), batch_size=16)
    merge = MergeCallback(every_n_epochs=1, num_batches=2)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, partition="by_class"), callbacks=[merge], max_epochs=1
    )
    trainer.fit(_BatchNormProbe(), loader)
    for agent_id, agent in trainer.strategy.swarm.items():
        shard = set(trainer.strategy.shards[agent_id].tolist())
        assert agent.recalibration_ids and agent.recalibration_ids <= shard
        assert len(agent.recalibration_ids) <= 2 * 16


def test_logged_validation_of_a_merge_epoch_is_post_merge() -> None:
    merge = MergeCallback(every_n_epochs=1)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), callbacks=[merge], max_epochs=1)
    trainer.fit(TinyNet(), datamodule=BlobsData())
    logged = {g: float(trainer.callback_metrics[f"agent_{g}/val_acc"]) for g in range(3)}
    x, y = BlobsData().val_set.tensors
    for agent_id, agent in trainer.strategy.swarm.items():
        agent.eval()
        with torch.no_grad():
            accuracy = (agent(x).argmax(-1) == y).float().mean().item()
        assert accuracy == pytest.approx(logged[agent_id], abs=1e-6)


def test_merging_helps_on_non_iid_data() -> None:
    def mean_accuracy(callbacks: list[Callback]) -> float:
        trainer = make_trainer(
            strategy=DIMATStrategy(num_agents=2, partition="by_class", seed=1),
            callbacks=callbacks,
            max_epochs=10,
        )
        trainer.fit(TinyNet(lr=0.05), datamodule=BlobsData())
        return float(trainer.callback_metrics["val_acc"])

    # Each agent sees two of the four classes: alone it is right at most half of the time.
    local, merged = mean_accuracy([]), mean_accuracy([MergeCallback(every_n_epochs=1, method="average")])
    assert local <= 0.5
    assert merged > local + 0.2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs must be an integer >= 1, got 0"),
        ({"every_n_epochs": 1.5}, "every_n_epochs must be an integer >= 1, got 1.5"),
        ({"start_epoch": -1}, "start_epoch must be an integer >= 0, got -1"),
        ({"num_batches": 0}, "num_batches must be an integer >= 1, got 0"),
        ({"method": "activations"}, "Unknown merge method 'activations'"),
    ],
)
def test_bad_merge_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MergeCallback(**options)


def test_merge_callback_needs_the_dimat_strategy() -> None:
    trainer = make_trainer(callbacks=[MergeCallback()], max_epochs=1)
    with pytest.raises(ValueError, match="MergeCallback needs Trainer\\(strategy=DIMATStrategy"):
        trainer.fit(TinyNet(), datamodule=BlobsData())


class _SmallCNN(TinyNet):
    """Convolutions on the 8 features seen as a 2×2×2 image."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_dimat.models import small_cnn

        self.net = nn.Sequential(nn.Unflatten(1, (2, 2, 2)), small_cnn(in_channels=2, num_classes=4, width=8))


@pytest.mark.parametrize("method", ["activation", "weight", "average"])
def test_each_agent_merges_its_neighbours_aligned_by_the_method_on_its_own_data(method: str) -> None:
    snapshots = _Snapshots()
    merge = MergeCallback(every_n_epochs=1, method=method, num_batches=2)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), callbacks=[snapshots, merge], max_epochs=1)
    trainer.fit(_SmallCNN(), datamodule=BlobsData())
    before, strategy = snapshots.before[-1], trainer.strategy
    for agent_id, agent in strategy.swarm.items():
        weights = strategy.topology.weights(agent_id)
        neighbours = [j for j in sorted(weights) if j != agent_id]
        reference = copy.deepcopy(agent)
        reference.load_state_dict(before[agent_id])
        data = list(strategy.local_batches(agent_id, 2))  # the same two batches the merge used
        matcher = resolve_matcher(method)
        spec = matcher_spec(matcher, reference, data)
        found = matcher.match(reference, [before[j] for j in neighbours], data, spec=spec)
        expected = combine(
            [before[j] for j in [agent_id, *neighbours]],
            [weights[j] for j in [agent_id, *neighbours]],
            found,
            spec,
        )
        for name, parameter in agent.named_parameters():  # (BatchNorm buffers were re-estimated)
            assert torch.allclose(parameter, expected[name], atol=1e-6), (method, agent_id, name)
    assert float(trainer.callback_metrics["merge/round"]) == 1.0
