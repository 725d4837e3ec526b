"""Non-finite agents never spread (merge/finite.py, MergeCallback, CDSGD, SGP, export): a NaN agent is left
out of its neighbours' sums, rebuilt from its finite neighbours with a warning, or the callback raises."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_dimat import CDSGDCallback, DIMATStrategy, MergeCallback, SGPCallback
from lightning_dimat.merge import NonFiniteAgentError


class PoisonAgent(Callback):
    """Writes NaN into one weight of ``agent_id`` after the last batch of epoch 0 (before the merge), and
    keeps the parameters every agent had then."""

    def __init__(self, agent_id: int = 1, hook: str = "on_train_batch_end") -> None:
        self.agent_id = agent_id
        self.hook = hook
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def _poison(self, trainer: Trainer) -> None:
        swarm = trainer.strategy.swarm
        agent = swarm.agent(self.agent_id)
        with torch.no_grad():
            agent.net[0].weight[0, 0] = float("nan")
        self.before = {g: {k: v.clone() for k, v in a.named_parameters()} for g, a in swarm.items()}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.hook == "on_train_batch_end" and trainer.is_last_batch and trainer.current_epoch == 0:
            self._poison(trainer)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.hook == "on_before_optimizer_step" and trainer.global_step == 3:
            self._poison(trainer)


def _finite(strategy: DIMATStrategy) -> bool:
    values = [v for _, agent in strategy.swarm.items() for v in agent.state_dict().values()]
    return all(bool(torch.isfinite(v).all()) for v in values if v.is_floating_point())


def _params(strategy: DIMATStrategy) -> dict[int, dict[str, torch.Tensor]]:
    return {g: dict(a.named_parameters()) for g, a in strategy.swarm.items()}


def test_a_nan_agent_is_left_out_and_rebuilt_from_its_finite_neighbours() -> None:
    poison = PoisonAgent(agent_id=1)
    merge = MergeCallback(every_n_epochs=1, method="average")
    strategy = DIMATStrategy(num_agents=3, topology="ring", export="consensus")  # a ring of 3: complete
    trainer = make_trainer(strategy=strategy, callbacks=[poison, merge], max_epochs=1)
    model = TinyNet()
    with pytest.warns(
        UserWarning, match=r"Agent\(s\) 1 hold NaN or infinite weights at the merge after epoch 0"
    ):
        trainer.fit(model, datamodule=BlobsData())
    assert merge.nonfinite_agents == [1] and _finite(strategy)
    expected = {k: (poison.before[0][k] + poison.before[2][k]) / 2 for k in poison.before[0]}
    for g in range(3):  # agents 0 and 2 averaged without agent 1 (weights 1/3, 1/3 renormalised to 1/2)
        for key, value in _params(strategy)[g].items():
            torch.testing.assert_close(value.detach(), expected[key], rtol=0, atol=1e-6)
    assert trainer.callback_metrics["merge/nonfinite_agents"] == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # the exported consensus


def _fit_poisoned_ring(poisoned: int, max_epochs: int, **merge: Any) -> tuple[Trainer, MergeCallback]:
    """4 agents on a ring merging every epoch; agent ``poisoned`` turns NaN just before the first merge."""
    callback = MergeCallback(every_n_epochs=1, num_batches=2, **merge)
    strategy = DIMATStrategy(num_agents=4, topology="ring")
    callbacks = [PoisonAgent(poisoned), callback]
    trainer = make_trainer(strategy=strategy, callbacks=callbacks, max_epochs=max_epochs)
    trainer.fit(TinyNet(), datamodule=BlobsData())
    return trainer, callback


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_matching_merges_restore_a_nan_agent_instead_of_failing_in_scipy(method: str) -> None:
    with pytest.warns(UserWarning, match=r"Agent\(s\) 2 hold NaN"):
        trainer, merge = _fit_poisoned_ring(2, max_epochs=2, method=method)
    assert merge.round == 2 and _finite(trainer.strategy)


def test_the_shared_basis_is_built_around_a_nan_agent_and_a_nan_root_hands_it_on() -> None:
    # Agent 0, the default root, is NaN at the first merge: the basis becomes agent 1's (the first finite
    # agent breadth-first from 0), the tree goes around agent 0, and the merge rebuilds it.
    with pytest.warns(UserWarning, match=r"root, agent 0, holds NaN .* the basis is agent 1's"):
        trainer, merge = _fit_poisoned_ring(0, max_epochs=2, method="activation", basis="shared")
    assert merge.basis_built and merge.round == 2 and _finite(trainer.strategy)


def test_on_nonfinite_raise_refuses_to_build_the_shared_basis_around_a_nan_agent() -> None:
    with pytest.raises(NonFiniteAgentError, match=r"Agent\(s\) 2 hold NaN .*before the shared basis"):
        _fit_poisoned_ring(2, max_epochs=1, method="activation", on_nonfinite="raise")


def test_on_nonfinite_raise_names_the_agent_before_anything_spreads() -> None:
    strategy = DIMATStrategy(num_agents=3, topology="ring")
    merge = MergeCallback(every_n_epochs=1, method="average", on_nonfinite="raise")
    trainer = make_trainer(strategy=strategy, callbacks=[PoisonAgent(agent_id=1), merge], max_epochs=1)
    with pytest.raises(NonFiniteAgentError, match=r"Agent\(s\) 1 hold NaN .*on_nonfinite='restore'"):
        trainer.fit(TinyNet(), datamodule=BlobsData())
    params = _params(strategy)
    assert all(bool(torch.isfinite(v).all()) for g in (0, 2) for v in params[g].values())


@pytest.mark.parametrize("gossip", [CDSGDCallback, SGPCallback])
def test_gossip_leaves_a_nan_agent_out_and_restores_it(gossip: type) -> None:
    # Before, CDSGD and SGP spread one agent's NaN to every agent within an epoch.
    strategy = DIMATStrategy(num_agents=4, topology="ring")
    poison = PoisonAgent(agent_id=1, hook="on_before_optimizer_step")
    trainer = make_trainer(strategy=strategy, callbacks=[poison, gossip()], max_epochs=1)
    with pytest.warns(UserWarning, match=r"Agent\(s\) 1 hold NaN or infinite weights at the gossip step"):
        trainer.fit(TinyNet(), datamodule=BlobsData())
    assert poison.before and _finite(strategy)


@pytest.mark.parametrize("gossip", [CDSGDCallback, SGPCallback])
def test_gossip_on_nonfinite_raise(gossip: type) -> None:
    strategy = DIMATStrategy(num_agents=4, topology="ring")
    poison = PoisonAgent(agent_id=3, hook="on_before_optimizer_step")
    trainer = make_trainer(strategy=strategy, callbacks=[poison, gossip(on_nonfinite="raise")], max_epochs=1)
    with pytest.raises(NonFiniteAgentError, match=rf"Agent\(s\) 3 hold NaN .*{gossip.__name__}"):
        trainer.fit(TinyNet(), datamodule=BlobsData())


class PoisonAtEnd(Callback):
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with torch.no_grad():
            trainer.strategy.swarm.agent(0).net[0].weight[0, 0] = float("inf")


def test_export_never_hands_a_nonfinite_model_to_the_user() -> None:
    model = TinyNet()
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), callbacks=[PoisonAtEnd()], max_epochs=1)
    with pytest.warns(UserWarning, match=r"Agent\(s\) 0 hold NaN .* left out of the exported consensus"):
        trainer.fit(model, datamodule=BlobsData())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, export=0), callbacks=[PoisonAtEnd()], max_epochs=1
    )
    with pytest.raises(NonFiniteAgentError, match=r"Agent\(s\) 0 hold NaN .*export=0"):
        trainer.fit(TinyNet(), datamodule=BlobsData())
