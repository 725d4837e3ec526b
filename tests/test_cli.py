"""The ``lightning-dimat`` CLI: YAML runs, W&B offline logging, and every shipped config instantiates."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import LightningDataModule, LightningModule

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.cli import build_cli
from lightning_dimat.console import main

ROOT = Path(__file__).resolve().parents[1]
# The quick-start configs and their overlays (experiment grids and their bases are checked in
# tests/experiment/test_configs.py).
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SHORT = ["--trainer.max_epochs=2", "--trainer.enable_model_summary=false"]


def test_quickstart_yaml_run_writes_plot_and_test_table(
    tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *SHORT])
    output = capsys.readouterr().out
    assert "Per-agent test_acc" in output and "mean |" in output and "consensus |" in output
    report = tmp_cwd / "outputs/quickstart/version_0"  # every run writes into its own folder
    assert (report / "accuracy.png").stat().st_size > 0
    history = json.loads((report / "accuracy.json").read_text())
    assert [entry["epoch"] for entry in history["history"]] == [0, 1]
    assert history["merge_epochs"] == [1]
    test = json.loads((report / "accuracy_test.json").read_text())
    assert len(test["agents"]) == 5
    assert test["mean"] == pytest.approx(sum(test["agents"].values()) / 5)
    assert 0 <= test["consensus"] <= 1
    # The config goes into the logger's versioned folder, never into the current directory.
    assert (tmp_cwd / "outputs/quickstart/version_0/config.yaml").is_file()
    assert not (tmp_cwd / "config.yaml").exists()


def test_a_run_without_a_logger_writes_no_config_into_the_current_directory(tmp_cwd: Path) -> None:
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"]
    main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *tiny, "--trainer.logger=false"])
    assert not (tmp_cwd / "config.yaml").exists()


def _offline_run(directory: Path) -> tuple[dict[str, Any], list[str]]:
    """The final summary and the record kinds of the one offline W&B run under ``directory``.

    wandb-core writes no ``files/wandb-summary.json`` for an offline run (``wandb sync`` makes it from the
    run's ``.wandb`` file on upload), so this reads that file: a LevelDB-style log of ``Record`` protobufs
    (a 7-byte header, then 32 KiB blocks of chunks with a 7-byte header each: checksum, length, kind).
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, payloads = 7, b"", []
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            payloads.append(pending)
            pending = b""
    summary: dict[str, Any] = {}
    kinds = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kinds.append(record.WhichOneof("record_type"))
        for item in record.summary.update:
            summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return summary, kinds


def test_wandb_offline_run_logs_agent_mean_and_merge_metrics(tmp_cwd: Path) -> None:
    import wandb

    configs = [
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--config",
        str(ROOT / "configs/quickstart_wandb.yaml"),
    ]
    try:
        cli = build_cli(["fit", *configs, "--test_after_fit=false", *SHORT])
        assert cli.trainer.logger.experiment.settings.mode in ("offline", "dryrun")
    finally:
        wandb.finish()  # (a no-op once the CLI finished the run)
        wandb.teardown()  # waits until wandb-core has written the run's file
    summary, _ = _offline_run(tmp_cwd / "outputs")
    assert {"val_acc", "agent_0/val_acc", "agent_4/val_acc", "merge/round", "merge/bytes"} <= set(summary)


def test_the_cli_finishes_its_wandb_run_with_final_agent_and_test_metrics(tmp_cwd: Path) -> None:
    import wandb

    args = [
        "fit",
        "--model=helpers.TinyNet",
        "--data=helpers.BlobsData",
        "--trainer.strategy=lightning_dimat.DIMATStrategy",
        "--trainer.strategy.num_agents=2",
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.save_dir={tmp_cwd}",
        "--trainer.logger.offline=true",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--test_after_fit=true",
    ]
    try:
        cli = build_cli(args)
        # Finished in-process: a later WandbLogger in this process starts a run of its own.
        assert wandb.run is None
    finally:
        wandb.finish()
        wandb.teardown()  # waits until wandb-core has written the run's file
    summary, kinds = _offline_run(tmp_cwd)
    assert kinds[-1] == "exit"
    assert {"val_acc", "agent_0/val_acc", "agent_1/val_acc", "epoch"} <= set(summary)
    tested = cli.trainer.callback_metrics  # (the test's metrics: trainer.test reset the fit's)
    for key in ("test_acc", "agent_0/test_acc", "agent_1/test_acc"):
        assert summary[key] == pytest.approx(float(tested[key])), key


@pytest.mark.parametrize("config", CONFIGS, ids=[str(path.relative_to(ROOT)) for path in CONFIGS])
def test_every_config_parses_and_instantiates(config: Path, tmp_cwd: Path) -> None:
    args = ["--config", str(config)]
    if config.name != "quickstart.yaml" and config != (ROOT / "configs/quickstart.yaml"):
        args = ["--config", str(ROOT / "configs/quickstart.yaml"), *args]
    cli = build_cli(args, run=False)
    assert isinstance(cli.trainer.strategy, DIMATStrategy)
    assert isinstance(cli.model, LightningModule) and isinstance(cli.datamodule, LightningDataModule)
    if "local_only" not in config.name:
        assert any(isinstance(callback, MergeCallback) for callback in cli.trainer.callbacks)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("weight", {"max_iterations": 100, "seed": 0, "identity_bias": 0.0}),
        (
            '{"class_path": "lightning_dimat.WeightMatcher", "init_args": {"max_iterations": 7}}',
            {"max_iterations": 7, "seed": 0, "identity_bias": 0.0},
        ),
        (
            '{"class_path": "lightning_dimat.ActivationMatcher", "init_args": {"identity_bias": 0.25}}',
            {"identity_bias": 0.25, "probes": "pre_activation"},
        ),
        (
            '{"class_path": "lightning_dimat.ActivationMatcher", "init_args": {"probes": "stage_output"}}',
            {"identity_bias": 0.0, "probes": "stage_output"},
        ),
    ],
)
def test_yaml_names_a_matcher_or_configures_its_options(method: str, expected: dict, tmp_cwd: Path) -> None:
    import dataclasses

    overlay = tmp_cwd / "matcher.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_dimat.MergeCallback\n"
        f"      init_args: {{every_n_epochs: 2, method: {method}}}\n"
    )
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(overlay)]
    cli = build_cli(args, run=False)
    (merge,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, MergeCallback)]
    assert dataclasses.asdict(merge.matcher) == expected


def test_the_command_help_names_the_experiment_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "lightning-dimat experiment FILE" in " ".join(capsys.readouterr().out.split())


def test_fit_help_offers_the_shipped_classes_and_no_internal_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_cli(["fit", "--help"], run=False)
    assert exited.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # the help breaks long class paths over lines
    for offered in [
        "lightning_dimat.models.ImageClassifier",
        "lightning_dimat.data.DigitsDataModule",
        "torch.optim.Adam,",
    ]:
        assert offered in text
    for internal in [
        "AgentSwarm",
        "SwarmOptimizer",
        "AgentCheckpointHooks",
        "AgentBatchTransferHooks",
        "SplitDataModule",
    ]:
        assert internal not in text


def test_the_console_drops_lightnings_tips_and_keeps_real_messages(caplog: pytest.LogCaptureFixture) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_dimat.console import quiet_console

    quiet_console()
    with caplog.at_level("INFO"):
        rank_zero_info("💡 Tip: install something")
        rank_zero_info("GPU available: False")
    assert "GPU available: False" in caplog.text and "Tip" not in caplog.text
