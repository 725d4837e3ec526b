"""Checkpoints hold every agent keyed by global id, and resuming reproduces an uninterrupted run exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import BlobsData, TinyNet, agent_states, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dimat import DIMATStrategy, MergeCallback


def _run(max_epochs: int, checkpoints: Path | None = None, ckpt_path: Path | None = None, **options):
    callbacks = [MergeCallback(every_n_epochs=2)]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1))
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class", **options),
        callbacks=callbacks,
        max_epochs=max_epochs,
        enable_checkpointing=checkpoints is not None,
    )
    # Momentum (optimizer state), dropout and shuffling (random streams) all have to resume exactly.
    trainer.fit(TinyNet(momentum=0.9, dropout=0.3), datamodule=BlobsData(), ckpt_path=ckpt_path)
    return trainer


def _checkpoint(directory: Path, epoch: int) -> Path:
    (path,) = directory.glob(f"epoch={epoch}-*.ckpt")
    return path


def test_resume_gives_the_same_final_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted = _run(5, checkpoints=tmp_path)
    # epoch index 2: after the first merge (epoch 1) and mid-way to the next one (epoch 3).
    resumed = _run(5, ckpt_path=_checkpoint(tmp_path, 2))
    expected, actual = agent_states(uninterrupted), agent_states(resumed)
    for agent_id in expected:
        for key in expected[agent_id]:
            assert torch.equal(expected[agent_id][key], actual[agent_id][key]), (agent_id, key)
    assert resumed.global_step == uninterrupted.global_step
    merge = next(c for c in resumed.callbacks if isinstance(c, MergeCallback))
    assert merge.merged_epochs == [1, 3] and merge.round == 2


def test_checkpoint_holds_all_agents_keyed_by_global_id(tmp_path: Path) -> None:
    _run(2, checkpoints=tmp_path)
    checkpoint = torch.load(_checkpoint(tmp_path, 1), weights_only=False)
    agent_keys = {key.split(".")[1] for key in checkpoint["state_dict"] if key.startswith("agents.")}
    assert agent_keys == {"0", "1", "2"}
    (optimizer_state,) = checkpoint["optimizer_states"]
    assert sorted(optimizer_state["agents"]) == [0, 1, 2]
    assert sorted(checkpoint["dimat"]["random_streams"]) == [0, 1, 2]
    assert checkpoint["dimat"]["num_agents"] == 3


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    _run(1, checkpoints=tmp_path)
    checkpoint = torch.load(_checkpoint(tmp_path, 0), weights_only=True)
    assert "dimat" in checkpoint


def test_resuming_with_another_number_of_agents_is_refused(tmp_path: Path) -> None:
    _run(1, checkpoints=tmp_path)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=4, partition="by_class"), max_epochs=2)
    with pytest.raises(ValueError, match=r"holds agents \[0, 1, 2\] but this run has num_agents=4"):
        trainer.fit(TinyNet(), datamodule=BlobsData(), ckpt_path=_checkpoint(tmp_path, 0))


FIXTURES = Path(__file__).parent / "fixtures"


def test_a_checkpoint_written_by_version_0_1_resumes_to_the_weights_version_0_1_reached(
    tmp_path: Path,
) -> None:
    """``fixtures/`` holds a checkpoint written by the package before its restructuring into layered
    packages (3 agents, ring, activation merges, epoch 2) and the agents that version reached resuming it to
    epoch 4: the current code must load it and reach the same agents."""
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class"),
        callbacks=[MergeCallback(every_n_epochs=2, method="activation", num_batches=2)],
        max_epochs=4,
    )
    trainer.fit(
        TinyNet(momentum=0.9, dropout=0.3),
        datamodule=BlobsData(),
        ckpt_path=FIXTURES / "dimat_v0_1_epoch2.ckpt",
    )
    expected = torch.load(FIXTURES / "dimat_v0_1_resumed_epoch4.pt", weights_only=True)
    actual = agent_states(trainer)
    assert sorted(actual) == sorted(expected) == [0, 1, 2]
    for agent_id in expected:
        for key in expected[agent_id]:
            assert torch.equal(expected[agent_id][key], actual[agent_id][key]), (agent_id, key)
    merge = next(c for c in trainer.callbacks if isinstance(c, MergeCallback))
    assert merge.merged_epochs == [1, 3] and merge.round == 2
