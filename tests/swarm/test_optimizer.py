"""SwarmOptimizer (swarm/optimizer.py): what Lightning's LearningRateMonitor reads names the agents and their
optimizer class, never the wrapper; the names stay out of the agents' checkpointed optimizer state."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_dimat import DIMATStrategy
from lightning_dimat.swarm import SwarmOptimizer


class _AdamNet(TinyNet):
    """Adam with a per-step StepLR, so that the logged learning rates change between steps."""

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _adams(*agent_ids: int, **options: float) -> dict[int, torch.optim.Optimizer]:
    return {g: torch.optim.Adam(nn.Linear(2, 1).parameters(), lr=0.1, **options) for g in agent_ids}


def test_learning_rate_monitor_logs_one_key_per_agent_named_by_its_optimizer(tmp_path: Path) -> None:
    monitor = LearningRateMonitor()
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3),
        callbacks=[monitor],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
    )
    trainer.fit(_AdamNet(), datamodule=BlobsData())
    names = ["lr-Adam/agent_0", "lr-Adam/agent_1", "lr-Adam/agent_2"]
    assert sorted(monitor.lrs) == names
    # Every agent's own scheduler halves its rate each step; the monitor reads the live values.
    for name in names:
        assert monitor.lrs[name][-3:] == pytest.approx([0.01, 0.005, 0.0025])
    (metrics,) = Path(trainer.logger.log_dir).glob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert set(names) <= set(header)
    assert not any("SwarmOptimizer" in column or "/pg" in column for column in header)


def test_names_use_global_agent_ids_and_name_an_agents_several_groups() -> None:
    # Agents 3 and 4 as another process would hold them: the names do not depend on the process layout.
    swarm = SwarmOptimizer(_adams(3, 4))
    assert type(swarm).__name__ == "Adam" and isinstance(swarm, SwarmOptimizer)
    assert [group["name"] for group in swarm.param_groups] == ["agent_3", "agent_4"]
    assert swarm.defaults["betas"] == (0.9, 0.999)  # LearningRateMonitor(log_momentum=True) reads betas

    body, head = nn.Linear(2, 2), nn.Linear(2, 1)
    groups = [{"params": body.parameters()}, {"params": head.parameters(), "name": "head", "lr": 0.5}]
    swarm = SwarmOptimizer({0: torch.optim.SGD(groups, lr=0.1)})
    assert [group["name"] for group in swarm.param_groups] == ["agent_0/pg1", "agent_0/head"]
    # The agent's own groups are not touched: its checkpointed state keeps its own names only.
    assert "name" not in swarm.optimizers[0].param_groups[0]
    assert swarm.optimizers[0].param_groups[1]["name"] == "head"

    mixed = SwarmOptimizer({**_adams(0), 1: torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)})
    assert type(mixed).__name__ == "Adam+SGD" and mixed.defaults == {}


def test_learning_rates_set_through_the_view_reach_the_agent_also_after_loading_a_state() -> None:
    swarm = SwarmOptimizer(_adams(0, 1))
    state = copy.deepcopy(swarm.state_dict())
    # A state whose groups carry extra keys (a named group, another version's keys) still loads.
    state["agents"][1]["optimizer"]["param_groups"][0]["name"] = "saved-name"
    swarm.load_state_dict(state)  # replaces the agents' group dicts
    for group in swarm.param_groups:
        group["lr"] = 0.25
    assert [opt.param_groups[0]["lr"] for opt in swarm.optimizers.values()] == [0.25, 0.25]
    assert [group["name"] for group in swarm.param_groups] == ["agent_0", "agent_1/saved-name"]
    with pytest.raises(KeyError, match="fixed by its agent id"):
        swarm.param_groups[0]["name"] = "other"


def test_pickling_and_deep_copying_keep_the_named_class() -> None:
    swarm = SwarmOptimizer(_adams(0, 2))
    for clone in (pickle.loads(pickle.dumps(swarm)), copy.deepcopy(swarm)):
        assert type(clone) is type(swarm)
        assert sorted(clone.optimizers) == [0, 2] and clone.steps == {0: 0, 2: 0}
