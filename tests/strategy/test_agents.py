"""Starting weights of the agents (strategy/agents.py): pre-trained agents shared by ``init_from``, as the
paper protocol and the experiment runner use them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_dimat import DIMATStrategy


class _StartingWeights(Callback):
    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.states = {
            g: {k: v.clone() for k, v in a.state_dict().items()} for g, a in trainer.strategy.swarm.items()
        }


def test_init_from_starts_every_agent_from_its_pretrained_weights(tmp_path: Path) -> None:
    pretrain = DIMATStrategy(num_agents=3, seed=0)
    trainer = make_trainer(strategy=pretrain, max_epochs=1)
    trainer.fit(TinyNet(momentum=0.9), datamodule=BlobsData())
    trainer.save_checkpoint(tmp_path / "agents.ckpt")
    pretrained = {g: {k: v.clone() for k, v in a.state_dict().items()} for g, a in pretrain.swarm.items()}

    start = _StartingWeights()
    strategy = DIMATStrategy(num_agents=3, seed=5, topology="ring", init_from=str(tmp_path / "agents.ckpt"))
    second = make_trainer(strategy=strategy, max_epochs=1, callbacks=[start])
    second.fit(TinyNet(momentum=0.9), datamodule=BlobsData())
    for g in range(3):
        for key, value in pretrained[g].items():
            torch.testing.assert_close(start.states[g][key], value, rtol=0, atol=0)
    assert second.current_epoch == 1  # epochs count from 0 again: only the weights are taken
    assert pretrained[0]["net.0.weight"].ne(pretrained[1]["net.0.weight"]).any()


def test_init_from_refuses_a_missing_file_or_another_number_of_agents(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"init_from='nowhere\.ckpt' is not a file"):
        DIMATStrategy(init_from="nowhere.ckpt")
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1)
    trainer.fit(TinyNet(), datamodule=BlobsData())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    strategy = DIMATStrategy(num_agents=3, init_from=str(tmp_path / "two.ckpt"))
    with pytest.raises(ValueError, match="holds 2 DIMAT agents but this run has num_agents=3"):
        make_trainer(strategy=strategy, max_epochs=1).fit(TinyNet(), datamodule=BlobsData())


class _Payload:
    """Unpickling this would create a file: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_init_from_loads_weights_only_and_names_a_file_it_cannot_use(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"dimat": {"num_agents": 2}, "state_dict": {}, "x": _Payload(marker)}, tmp_path / "evil.ckpt")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    plain = tmp_path / "plain.ckpt"
    trainer = make_trainer(max_epochs=1)  # a Lightning checkpoint without DIMAT agents
    trainer.fit(TinyNet(), datamodule=BlobsData())
    trainer.save_checkpoint(plain)
    for path, message in (
        (tmp_path / "evil.ckpt", r"evil\.ckpt' could not be read as a checkpoint of weights"),
        (text, r"notes\.txt' could not be read as a checkpoint of weights"),
        (plain, r"plain\.ckpt' is not a DIMAT checkpoint"),
    ):
        strategy = DIMATStrategy(num_agents=2, init_from=str(path))
        with pytest.raises(ValueError, match=message):
            make_trainer(strategy=strategy, max_epochs=1).fit(TinyNet(), datamodule=BlobsData())
    assert not marker.exists()


class _FrozenBackbone(TinyNet):
    """The first Linear and the BatchNorm are a 'pre-trained backbone': frozen, with known values."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.net[0].weight.fill_(0.25)
            self.net[1].running_mean.fill_(3.0)
        for module in (self.net[0], self.net[1]):
            module.requires_grad_(False)


def test_reinit_keeps_frozen_parameters_and_their_buffers_as_given() -> None:
    strategy = DIMATStrategy(num_agents=3, agent_init="reinit")
    start = _StartingWeights()
    make_trainer(strategy=strategy, max_epochs=1, limit_train_batches=1, callbacks=[start]).fit(
        _FrozenBackbone(), datamodule=BlobsData()
    )
    for g in range(3):
        assert torch.equal(start.states[g]["net.0.weight"], torch.full((16, 8), 0.25))
        assert torch.equal(start.states[g]["net.1.running_mean"], torch.full((16,), 3.0))
    # The trainable head is re-drawn per agent, as before.
    assert not torch.equal(start.states[0]["net.4.weight"], start.states[1]["net.4.weight"])
