"""MergeCallback in a real Trainer: schedule, what is logged, post-merge validation, optimizer state after a
merge, that merging helps on non-IID data, errors.

What a merge computes in a Trainer (identity, mean preservation, each agent merging its neighbours on its
own data: properties 3, 4 and 5 of DESIGN.md §3) is tested in tests/test_properties.py; the shared basis in
tests/callbacks/test_shared_basis.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from lightning.pytorch import Callback

from lightning_dimat import ActivationMatcher, DIMATStrategy, MergeCallback
from lightning_dimat.permutation import permutation_spec


def test_merge_schedule_every_n_epochs_and_start_epoch() -> None:
    merge = MergeCallback(every_n_epochs=2, start_epoch=3)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[merge], max_epochs=8)
    trainer.fit(TinyNet(), datamodule=BlobsData(num_samples=64))
    assert merge.merged_epochs == [3, 5, 7]
    assert merge.round == 3


def test_merge_metrics_are_logged() -> None:
    merge = MergeCallback(every_n_epochs=1, basis="own")  # (every round the same exchange)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=4, topology="ring"), callbacks=[merge], max_epochs=2
    )
    model = TinyNet()
    trainer.fit(model, datamodule=BlobsData())
    metrics = trainer.callback_metrics
    assert float(metrics["merge/round"]) == 2.0
    state_size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert float(metrics["merge/bytes"]) == 4 * 2 * state_size  # 4 agents, 2 ring neighbours each
    # One name per quantity: what the algorithm sends over the graph (every agent its own machine), per merge
    # and cumulated over the 2 merges, and what crossed a process boundary (nothing, in one process).
    assert float(metrics["comm/bytes_sent"]) == 2 * float(metrics["merge/bytes"])
    assert float(metrics["merge/bytes_between_processes"]) == 0
    assert "merge/bytes_sent" not in metrics
    assert float(metrics["merge/spectral_gap"]) == pytest.approx(trainer.strategy.topology.spectral_gap)
    assert float(metrics["merge/time_s"]) > 0
    assert float(metrics["merge/consensus_distance_after"]) < float(
        metrics["merge/consensus_distance_before"]
    )


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs must be an integer >= 1, got 0"),
        ({"every_n_epochs": 1.5}, "every_n_epochs must be an integer >= 1, got 1.5"),
        ({"start_epoch": -1}, "start_epoch must be an integer >= 0, got -1"),
        ({"num_batches": 0}, "num_batches must be an integer >= 1, got 0"),
        ({"method": "activations"}, "Unknown merge method 'activations'"),
        ({"recompute_batchnorm": "no"}, "recompute_batchnorm must be true or false, got 'no'"),
    ],
)
def test_bad_merge_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MergeCallback(**options)


def test_a_spec_that_is_not_a_permutation_spec_is_refused() -> None:
    with pytest.raises(TypeError, match=r"spec must be a PermutationSpec or None.*got 'foo'"):
        MergeCallback(spec="foo")  # type: ignore[arg-type]


@pytest.mark.parametrize(("options", "max_epochs"), [({"every_n_epochs": 3}, 2), ({"start_epoch": 4}, 3)])
def test_a_run_that_can_never_merge_is_warned_about(options: dict[str, Any], max_epochs: int) -> None:
    merge = MergeCallback(method="average", **options)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[merge], max_epochs=max_epochs)
    with pytest.warns(UserWarning, match=f"never merges in this run .*max_epochs={max_epochs}"):
        trainer.fit(TinyNet(), datamodule=BlobsData())
    assert merge.round == 0


def test_merge_callback_needs_the_dimat_strategy() -> None:
    trainer = make_trainer(callbacks=[MergeCallback()], max_epochs=1)
    with pytest.raises(ValueError, match="MergeCallback needs Trainer\\(strategy=DIMATStrategy"):
        trainer.fit(TinyNet(), datamodule=BlobsData())


class _LogitsAndHidden(TinyNet):
    """forward returns the hidden units too: they are pinned, so activation matching has no probes."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        hidden = torch.relu(self.net[1](self.net[0](x)))
        return self.net[4](hidden), hidden

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x)[0], y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


class _CountEpochs(Callback):
    def __init__(self) -> None:
        self.epochs = 0

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs += 1


def test_the_start_of_training_check_runs_what_the_merge_runs() -> None:
    # Before, the spec check passed and the run failed after its first epoch of training.
    counter = _CountEpochs()
    merge = MergeCallback(every_n_epochs=1, method="activation")
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[merge, counter], max_epochs=2)
    with pytest.raises(ValueError, match=r"no probes .*`return logits, hidden`"):
        trainer.fit(_LogitsAndHidden(), datamodule=BlobsData())
    assert counter.epochs == 0 and trainer.global_step == 0


def test_final_merge_ends_the_run_on_merged_agents() -> None:
    # every_n_epochs=2 with 3 epochs: merges after epoch 1 only; final_merge adds one after epoch 2.
    merge = MergeCallback(every_n_epochs=2, method="average", final_merge=True)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[merge], max_epochs=3)
    trainer.fit(TinyNet(), datamodule=BlobsData())
    assert merge.merged_epochs == [1, 2]
    plain = MergeCallback(every_n_epochs=2, method="average")
    make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[plain], max_epochs=3).fit(
        TinyNet(), datamodule=BlobsData()
    )
    assert plain.merged_epochs == [1]


def test_early_stopping_shorter_than_the_merge_period_is_warned_about() -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    merge = MergeCallback(every_n_epochs=2, method="average")
    stop = EarlyStopping(monitor="val_acc", mode="max", patience=1)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[merge, stop], max_epochs=2)
    with pytest.warns(UserWarning, match=r"patience=1\) may stop between merges.*patience >= 2"):
        trainer.fit(TinyNet(), datamodule=BlobsData())


def test_each_merge_prints_one_line(caplog: pytest.LogCaptureFixture) -> None:
    merge = MergeCallback(every_n_epochs=1, method="average")
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[merge], max_epochs=2)
    with caplog.at_level("INFO"):
        trainer.fit(TinyNet(), datamodule=BlobsData())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DIMAT merge")]
    assert [line.split(":")[0] for line in lines] == [
        "DIMAT merge 1 after epoch 0",
        "DIMAT merge 2 after epoch 1",
    ]
    assert "0% of units permuted" in lines[0] and "consensus distance" in lines[0]


def test_the_matchers_probes_are_where_the_callback_observes() -> None:
    # A placement named on the matcher (nameable in YAML) gives the agents that a hand-derived spec does.
    def fit(merge: MergeCallback) -> dict[int, dict[str, torch.Tensor]]:
        trainer = make_trainer(
            strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class"),
            callbacks=[merge],
            max_epochs=2,
        )
        trainer.fit(TinyNet(), datamodule=BlobsData())
        return {
            g: {k: v.clone() for k, v in agent.state_dict().items()}
            for g, agent in trainer.strategy.swarm.items()
        }

    options = {"every_n_epochs": 1, "basis": "own", "num_batches": 2}
    spec = permutation_spec(TinyNet(), torch.zeros(2, 8), "stage_output")
    named = fit(MergeCallback(method=ActivationMatcher(probes="stage_output"), **options))
    by_hand = fit(MergeCallback(method="activation", spec=spec, **options))
    default = fit(MergeCallback(method="activation", **options))
    assert all(torch.equal(named[g][k], by_hand[g][k]) for g in named for k in named[g])
    assert not all(torch.equal(named[g][k], default[g][k]) for g in named for k in named[g])
