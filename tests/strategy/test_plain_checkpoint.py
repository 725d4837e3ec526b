"""A DIMAT checkpoint to a plain Lightning checkpoint: one agent, or the consensus (Python and console)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.console import main
from lightning_dimat.strategy.plain_checkpoint import export_checkpoint
from tests.helpers import BlobsData, TinyNet, agent_states, make_trainer


def fit_and_checkpoint(directory: Path, method: str = "average") -> tuple[Path, dict, dict]:
    """3 agents, 2 epochs, a merge after the last epoch; the end-of-fit checkpoint, the agents' weights in
    it, and the consensus ``fit`` exported into the module."""
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class"),
        callbacks=[
            MergeCallback(every_n_epochs=2, method=method),
            ModelCheckpoint(dirpath=directory, filename="last"),
        ],
        enable_checkpointing=True,
    )
    model = TinyNet(lr=0.05, dropout=0.0)
    trainer.fit(model, datamodule=BlobsData())
    return directory / "last.ckpt", agent_states(trainer), dict(model.state_dict())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    return fit_and_checkpoint(tmp_path_factory.mktemp("run"))


def test_one_agent_loads_with_the_users_own_load_from_checkpoint(run: tuple, tmp_path: Path) -> None:
    checkpoint, agents, _ = run
    with pytest.raises(RuntimeError, match="Unexpected key"):
        TinyNet.load_from_checkpoint(checkpoint)  # what a user hits without the export
    path = export_checkpoint(checkpoint, tmp_path / "agent1.ckpt", agent=1)
    model = TinyNet.load_from_checkpoint(path)
    assert model.hparams.lr == 0.05 and model.hparams.dropout == 0.0  # hyper-parameters included
    for key, value in model.state_dict().items():
        assert torch.equal(value, agents[1][key]), key
    assert not torch.equal(agents[0]["net.0.weight"], agents[1]["net.0.weight"])


def test_the_consensus_equals_what_fit_exported(run: tuple, tmp_path: Path) -> None:
    checkpoint, _, exported = run
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class"),
        callbacks=[MergeCallback(every_n_epochs=2, method="average")],
    )
    path = export_checkpoint(
        checkpoint, tmp_path / "consensus.ckpt", trainer=trainer, model=TinyNet(), datamodule=BlobsData()
    )
    assert trainer.global_step == torch.load(checkpoint, weights_only=True)["global_step"]  # no step taken
    model = TinyNet.load_from_checkpoint(path)
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # re-estimated on freshly drawn batches
        torch.testing.assert_close(value, exported[key], rtol=0, atol=1e-6, msg=key)


def test_exporting_refuses_bad_requests_before_writing(run: tuple, tmp_path: Path) -> None:
    checkpoint, _, _ = run
    with pytest.raises(ValueError, match=r"agent=3: pass 'consensus' or an agent id in 0\.\.2"):
        export_checkpoint(checkpoint, tmp_path / "x.ckpt", agent=3)
    with pytest.raises(ValueError, match="needs the run's trainer"):
        export_checkpoint(checkpoint, tmp_path / "x.ckpt")
    plain = export_checkpoint(checkpoint, tmp_path / "plain.ckpt", agent=0)
    with pytest.raises(ValueError, match="is not a DIMAT checkpoint"):
        export_checkpoint(plain, tmp_path / "x.ckpt", agent=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_checkpoint(checkpoint, plain, agent=0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "x.ckpt", agent=0)
    assert not (tmp_path / "x.ckpt").exists()


def test_console_export_of_an_agent_and_of_the_consensus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_dimat.models import ImageClassifier

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning_dimat.MergeCallback",
                    "init_args": {"every_n_epochs": 2, "method": "average"},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path), "filename": "run"},
                },
            ],
            "strategy": {
                "class_path": "lightning_dimat.DIMATStrategy",
                "init_args": {"num_agents": 2, "partition": "by_class"},
            },
        },
        "model": {
            "class_path": "lightning_dimat.models.ImageClassifier",
            "init_args": {"model": "mlp", "model_options": {"in_features": 64, "hidden": [16]}},
        },
        "data": {"class_path": "lightning_dimat.data.DigitsDataModule"},
    }
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(config_path)])
    checkpoint = tmp_path / "run.ckpt"
    main(["export", str(checkpoint), "--agent", "1", "--output", str(tmp_path / "agent1.ckpt")])
    main(["export", str(checkpoint), "--config", str(config_path), "--output", str(tmp_path / "model.ckpt")])
    output = capsys.readouterr().out
    assert "load_from_checkpoint" in output
    agent = ImageClassifier.load_from_checkpoint(tmp_path / "agent1.ckpt")
    consensus = ImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt")
    assert agent.hparams.model_options == {"in_features": 64, "hidden": [16]}
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key, value in agent.state_dict().items():
        torch.testing.assert_close(value, saved[f"agents.1.{key}"], rtol=0, atol=0)
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BatchNorm statistics are re-estimated for the consensus
        mean = (saved[f"agents.0.{key}"] + saved[f"agents.1.{key}"]) / 2  # (method: average)
        torch.testing.assert_close(consensus.state_dict()[key], mean)
    with pytest.raises(SystemExit):
        main(["export", str(checkpoint), "--output", str(tmp_path / "y.ckpt")])
    assert "--agent consensus needs --config" in capsys.readouterr().err
