"""Checkpoints hold every agent keyed by global id, load with ``weights_only``, and refuse another number of
agents.

That resuming reproduces an uninterrupted run exactly (property 7 of DESIGN.md §3, including a checkpoint
written by version 0.1) is tested in tests/test_properties.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import BlobsData, TinyNet, checkpoint_of_epoch, fit_merging_ring, make_trainer

from lightning_dimat import ActivationMatcher, DIMATStrategy, MergeCallback
from lightning_dimat.strategy.run_identity import differences


def test_checkpoint_holds_all_agents_keyed_by_global_id(tmp_path: Path) -> None:
    fit_merging_ring(2, checkpoints=tmp_path)
    checkpoint = torch.load(checkpoint_of_epoch(tmp_path, 1), weights_only=False)
    agent_keys = {key.split(".")[1] for key in checkpoint["state_dict"] if key.startswith("agents.")}
    assert agent_keys == {"0", "1", "2"}
    (optimizer_state,) = checkpoint["optimizer_states"]
    assert sorted(optimizer_state["agents"]) == [0, 1, 2]
    assert sorted(checkpoint["dimat"]["random_streams"]) == [0, 1, 2]
    assert checkpoint["dimat"]["num_agents"] == 3


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    fit_merging_ring(1, checkpoints=tmp_path)
    checkpoint = torch.load(checkpoint_of_epoch(tmp_path, 0), weights_only=True)
    assert "dimat" in checkpoint


def test_resuming_with_another_number_of_agents_is_refused(tmp_path: Path) -> None:
    fit_merging_ring(1, checkpoints=tmp_path)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=4, partition="by_class"), max_epochs=2)
    with pytest.raises(ValueError, match=r"holds agents \[0, 1, 2\] but this run has num_agents=4"):
        trainer.fit(TinyNet(), datamodule=BlobsData(), ckpt_path=checkpoint_of_epoch(tmp_path, 0))


def _resume(path: Path, merge: MergeCallback | None = None, **options: Any) -> None:
    strategy = DIMATStrategy(**{"num_agents": 3, "topology": "ring", "partition": "by_class", **options})
    callbacks = [merge or MergeCallback(every_n_epochs=2)]
    make_trainer(strategy=strategy, callbacks=callbacks, max_epochs=2).fit(
        TinyNet(momentum=0.9, dropout=0.3), datamodule=BlobsData(), ckpt_path=path
    )


@pytest.mark.parametrize(
    ("options", "merge", "message"),
    [
        ({"topology": "star"}, None, r"topology \(the mixing matrix Π differs\)"),
        ({"partition": "iid"}, None, r"partition \(checkpoint: 'by_class', this run: 'iid'\)"),
        ({"seed": 4}, None, r"seed \(checkpoint: 0, this run: 4\)"),
        ({}, MergeCallback(every_n_epochs=2, method="average"), r"method \(checkpoint: .ActivationMatcher"),
        (
            {},
            MergeCallback(every_n_epochs=2, basis="own"),
            r"basis \(checkpoint: 'shared', this run: 'own'\)",
        ),
        (
            {},
            MergeCallback(every_n_epochs=2, method=ActivationMatcher(probes="stage_output")),
            r"method \(checkpoint: .*probes='pre_activation'.*this run: .*probes='stage_output'",
        ),
        ({"topology": "one_peer_exponential"}, None, r"topology \(a schedule against a fixed graph\)"),
        (
            {},
            MergeCallback(every_n_epochs=2, compression="int8"),
            r"compression \(checkpoint: 'none', this run: 'int8'\)",
        ),
    ],
)
def test_resuming_a_different_run_is_refused_unless_the_change_is_named(
    tmp_path: Path, options: dict[str, Any], merge: MergeCallback | None, message: str
) -> None:
    fit_merging_ring(1, checkpoints=tmp_path)
    path = checkpoint_of_epoch(tmp_path, 0)
    with pytest.raises(ValueError, match=message + r".*resume_changes="):
        _resume(path, merge, **options)
    allowed = [*options] or [message.split(" ")[0]]
    if merge is not None:
        merge = MergeCallback(
            every_n_epochs=2, method=merge.method, basis=merge.basis, compression=merge.compression
        )
    _resume(path, merge, resume_changes=allowed, **options)  # an explicit override is fine


def test_a_checkpoint_recorded_before_the_probes_option_resumes_as_pre_activation(tmp_path: Path) -> None:
    fit_merging_ring(1, checkpoints=tmp_path)
    checkpoint = torch.load(checkpoint_of_epoch(tmp_path, 0), weights_only=False)
    (merge_key,) = [key for key in checkpoint["callbacks"] if key.startswith("MergeCallback")]
    record = checkpoint["callbacks"][merge_key]["run"]
    assert record["method"] == "ActivationMatcher(identity_bias=0.0, probes='pre_activation')"
    record["method"] = "ActivationMatcher(identity_bias=0.0)"  # as written before probes could be chosen
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    _resume(older)  # the placement it ran with is today's default
    with pytest.raises(ValueError, match=r"method \(checkpoint: .*probes='pre_activation'.*'stage_output'"):
        _resume(older, MergeCallback(every_n_epochs=2, method=ActivationMatcher(probes="stage_output")))


def test_resume_changes_names_only_what_may_change() -> None:
    with pytest.raises(ValueError, match=r"resume_changes must be 'topology', .* got 'num_agents'"):
        DIMATStrategy(resume_changes=["num_agents"])


def test_a_schedule_with_another_period_is_named_as_a_difference_not_a_numpy_error() -> None:
    def schedule(period: int) -> dict[str, Any]:
        return {"topology": {"schedule": "random_matching(seed=0)", "rounds": [[[1.0]]] * period}}

    assert differences(schedule(4), schedule(4), ()) == []
    (found,) = differences(schedule(4), schedule(6), ())
    assert found.startswith("topology (schedule: checkpoint 'random_matching(seed=0)'")
