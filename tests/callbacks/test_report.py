"""``AgentReport``: per-agent curves and test table, the consensus row, one folder per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_dimat import AgentReport, DIMATStrategy, MergeCallback
from tests.helpers import BlobsData, TinyNet, make_trainer
from tests.strategy.test_consensus_evaluation import plain_test


def test_agent_report_prints_the_consensus_row(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    report = AgentReport(output_dir=str(tmp_path))
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=2), callbacks=[report, MergeCallback()], max_epochs=1
    )
    model, data = TinyNet(), BlobsData()
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    printed = capsys.readouterr().out
    assert "consensus |" in printed and "mean |" in printed
    assert report.consensus_result == pytest.approx(plain_test(model, data), abs=1e-6)
    assert (tmp_path / "accuracy_test.json").is_file() and (tmp_path / "accuracy.png").is_file()


def test_each_run_writes_into_its_own_logger_folder(tmp_path: Path) -> None:
    for _ in range(2):
        trainer = make_trainer(
            strategy=DIMATStrategy(num_agents=2),
            callbacks=[AgentReport()],
            logger=CSVLogger(tmp_path, name="runs"),
            max_epochs=1,
        )
        model, data = TinyNet(), BlobsData()
        trainer.fit(model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
    for version in ("version_0", "version_1"):  # the second run did not overwrite the first
        folder = tmp_path / "runs" / version
        assert (folder / "accuracy.png").is_file()
        assert json.loads((folder / "accuracy_test.json").read_text())["consensus"] is not None


def test_without_a_logger_or_output_dir_nothing_is_written(
    tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[AgentReport()], max_epochs=1)
    model, data = TinyNet(), BlobsData()
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    assert "Per-agent test_acc" in capsys.readouterr().out
    assert list(tmp_cwd.iterdir()) == []


def test_a_resumed_run_reports_the_curves_from_its_first_epoch(tmp_path: Path) -> None:
    def fit(epochs: int, report: AgentReport, resume: Path | None = None) -> None:
        saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(
            strategy=DIMATStrategy(num_agents=2),
            callbacks=[report, MergeCallback(every_n_epochs=1), saving],
            enable_checkpointing=True,
            max_epochs=epochs,
        )
        trainer.fit(TinyNet(), datamodule=BlobsData(), ckpt_path=resume)

    whole = AgentReport(output_dir=str(tmp_path / "whole"))
    fit(3, whole)
    (after_two,) = (tmp_path / "ckpt").glob("epoch=1-*.ckpt")
    resumed = AgentReport(output_dir=str(tmp_path / "resumed"))
    fit(3, resumed, resume=after_two)
    assert [point["epoch"] for point in resumed.history] == [0, 1, 2]
    assert resumed.history == whole.history
    written = json.loads((tmp_path / "resumed" / "accuracy.json").read_text())
    assert [point["epoch"] for point in written["history"]] == [0, 1, 2]
