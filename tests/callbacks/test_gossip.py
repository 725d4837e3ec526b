"""The per-step baselines' update rules on a quadratic toy problem, against hand computation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from lightning.pytorch import Callback, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.callbacks import CDSGDCallback, SGPCallback
from lightning_dimat.topology import column_stochastic

NUM_AGENTS = 4
TARGETS = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], [0.0, -3.0]], dtype=torch.float64)
START = np.array([[0.5, 0.0], [-1.0, 2.0], [2.0, 2.0], [0.0, -1.0]])


class Quadratic(LightningModule):
    """f_i(x) = ½‖x − c‖² with c the (single) target in agent i's shard; remembers that target."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.lr = lr
        self.target: Tensor | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        targets, _ = batch
        self.target = targets[0].detach().clone()
        return 0.5 * ((self.x - targets[0]) ** 2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class StartFrom(Callback):
    """Sets agent i's x to START[i] before training (not when resuming)."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch > 0:
            return
        for agent_id, agent in trainer.strategy.swarm.items():
            with torch.no_grad():
                agent.x.copy_(torch.as_tensor(START[agent_id]))


def run(
    callback: Callback,
    steps: int,
    lr: float = 0.1,
    topology: str = "ring",
    resume: Path | None = None,
    save: Path | None = None,
    accumulate: int = 1,
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Trains the toy for ``steps`` steps (one sample per agent per epoch); returns x, targets, strategy."""
    data = TensorDataset(TARGETS, torch.arange(NUM_AGENTS))
    loader = DataLoader(data, batch_size=1)
    strategy = DIMATStrategy(
        num_agents=NUM_AGENTS, topology=topology, partition="by_class", agent_init="copy"
    )
    trainer = make_trainer(
        strategy=strategy,
        max_epochs=steps,
        callbacks=[StartFrom(), callback],
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(Quadratic(lr), train_dataloaders=loader, ckpt_path=resume)
    if save is not None:
        trainer.save_checkpoint(save)
    swarm = strategy.swarm
    final = np.stack([swarm.agent(i).x.detach().numpy() for i in range(NUM_AGENTS)])
    targets = np.stack([swarm.agent(i).target.numpy() for i in range(NUM_AGENTS)])
    return final, targets, strategy


def test_cdsgd_mixes_then_steps_with_the_gradient_at_the_old_point() -> None:
    final, targets, strategy = run(CDSGDCallback(), steps=3)
    mixing, x = strategy.topology.mixing, START.copy()
    for _ in range(3):
        x = mixing @ x - 0.1 * (x - targets)  # x_i ← Σ_j π_ij x_j − α ∇f_i(x_i)
    np.testing.assert_allclose(final, x, rtol=0, atol=1e-12)


def test_sgp_on_a_symmetric_doubly_stochastic_matrix_is_d_psgd() -> None:
    callback = SGPCallback()
    final, targets, strategy = run(callback, steps=3)
    mixing, x = strategy.topology.mixing, START.copy()
    for _ in range(3):
        x = mixing @ (x - 0.1 * (x - targets))  # D-PSGD: x_i ← Σ_j π_ij (x_j − α ∇f_j(x_j))
    np.testing.assert_allclose(final, x, rtol=0, atol=1e-12)
    assert callback.push_weights == dict.fromkeys(range(NUM_AGENTS), 1.0)


# Agent 0 pushes to 1 and 2 as well as itself; the others push to the next agent: directed, column-stochastic,
# not row-stochastic (agent 1 and 2 receive more than they give), so the push-sum weights drift from 1.
DIRECTED = np.array(
    [
        [1 / 3, 0.0, 0.0, 0.5],
        [1 / 3, 0.5, 0.0, 0.0],
        [1 / 3, 0.5, 0.5, 0.0],
        [0.0, 0.0, 0.5, 0.5],
    ]
)


def test_sgp_push_sum_on_a_directed_graph_matches_hand_computation() -> None:
    callback = SGPCallback(DIRECTED.tolist())
    final, targets, _ = run(callback, steps=3)
    z, w = START.copy(), np.ones(NUM_AGENTS)
    for _ in range(3):
        x = z / w[:, None]
        z = DIRECTED @ (z - 0.1 * (x - targets))
        w = DIRECTED @ w
    np.testing.assert_allclose(final, z / w[:, None], rtol=0, atol=1e-12)
    np.testing.assert_allclose([callback.push_weights[i] for i in range(NUM_AGENTS)], w, atol=1e-12)
    assert not np.allclose(w, 1.0)


def test_push_sum_de_biasing_reaches_the_true_average_on_a_directed_graph() -> None:
    """With no local learning, x_i = z_i / w_i → mean of the starting points; z_i alone is biased."""
    callback = SGPCallback(DIRECTED.tolist())
    final, _, _ = run(callback, steps=60, lr=0.0)
    np.testing.assert_allclose(final, np.tile(START.mean(0), (NUM_AGENTS, 1)), atol=1e-9)
    biased = np.stack([callback.numerators[i]["x"].numpy() for i in range(NUM_AGENTS)])
    assert np.abs(biased - START.mean(0)).max() > 0.1


@pytest.mark.parametrize(("topology", "degree"), [("ring", 2), ("fully_connected", NUM_AGENTS - 1)])
def test_communication_counts_per_step_and_per_merge(topology: str, degree: int) -> None:
    state_size = 2 * 8  # x: two float64
    gossip = CDSGDCallback()
    run(gossip, steps=3, topology=topology)
    assert gossip.ledger.rounds == dict.fromkeys(range(NUM_AGENTS), 3)
    assert gossip.ledger.bytes_sent == dict.fromkeys(range(NUM_AGENTS), 3 * degree * state_size)

    merge = MergeCallback(every_n_epochs=2, method="average", recompute_batchnorm=False)
    run(merge, steps=4, topology=topology)
    assert merge.ledger.rounds == dict.fromkeys(range(NUM_AGENTS), 2)  # after epochs 1 and 3
    assert merge.ledger.messages_sent == dict.fromkeys(range(NUM_AGENTS), 2 * degree)
    assert merge.ledger.totals()["comm/bytes_sent"] == NUM_AGENTS * 2 * degree * state_size
    assert merge.ledger.totals()["comm/forward_samples"] == 0  # averaging needs no data


def test_activation_merge_counts_its_extra_forward_passes() -> None:
    merge = MergeCallback(every_n_epochs=1, method="activation", num_batches=2, basis="own")
    strategy = DIMATStrategy(num_agents=NUM_AGENTS, topology="ring")
    make_trainer(strategy=strategy, max_epochs=1, callbacks=[merge]).fit(TinyNet(), datamodule=BlobsData(16))
    # Per agent: 2 batches of 16 through its own model and its 2 neighbours', then 2 batches for BatchNorm.
    assert merge.ledger.forward_samples == dict.fromkeys(range(NUM_AGENTS), 3 * 2 * 16 + 2 * 16)


def test_sgp_refuses_a_matrix_that_is_not_column_stochastic() -> None:
    with pytest.raises(ValueError, match=r"column 1 sums to 0\.5"):
        column_stochastic([[1.0, 0.25], [0.0, 0.25]])
    with pytest.raises(ValueError, match="has num_agents=4"):
        run(SGPCallback([[0.5, 0.5], [0.5, 0.5]]), steps=1)


@pytest.mark.parametrize(
    "make", [CDSGDCallback, lambda: SGPCallback(DIRECTED.tolist())], ids=["cdsgd", "sgp"]
)
def test_gossip_resumes_from_a_checkpoint_as_if_uninterrupted(make: Any, tmp_path: Path) -> None:
    uninterrupted, _, _ = run(make(), steps=4)
    run(make(), steps=2, save=tmp_path / "half.ckpt")
    callback = make()
    resumed, _, _ = run(callback, steps=4, resume=tmp_path / "half.ckpt")
    np.testing.assert_allclose(resumed, uninterrupted, rtol=0, atol=1e-12)
    assert callback.ledger.rounds == dict.fromkeys(range(NUM_AGENTS), 4)


def test_sgp_pushes_once_per_optimizer_step_with_gradient_accumulation() -> None:
    """Two samples per agent and accumulation over 2 batches: one step, hence one push, per epoch."""
    data = TensorDataset(TARGETS.repeat(2, 1), torch.arange(NUM_AGENTS).repeat(2))
    strategy = DIMATStrategy(num_agents=NUM_AGENTS, partition="by_class", agent_init="copy")
    callback = SGPCallback()
    trainer = make_trainer(strategy=strategy, max_epochs=3, callbacks=[callback], accumulate_grad_batches=2)
    trainer.fit(Quadratic(), train_dataloaders=DataLoader(data, batch_size=1))
    assert callback.steps == 3 and callback.ledger.rounds == dict.fromkeys(range(NUM_AGENTS), 3)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[0.0, 0.5], [1.0, 0.5]], r"P\[0\]\[0\] = 0\.0"),
        ([[1.0, 0.5], [0.0, 0.5]], r"splits into \[\[0\], \[1\]\]"),
    ],
)
def test_push_sum_matrices_that_would_lose_mass_are_refused(matrix: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        column_stochastic(matrix)


@pytest.mark.parametrize("callback_class", [CDSGDCallback, SGPCallback])
def test_gossip_on_one_peer_exponential_reaches_the_exact_average_in_one_period(callback_class: type) -> None:
    """N=4: rounds take from i+1 then i+2; the product of one period's matrices is exact averaging."""
    final, _, strategy = run(callback_class(), steps=2, lr=0.0, topology="one_peer_exponential")
    assert [strategy.topology_for_round(r).neighbors(0) for r in range(2)] == [[1], [2]]
    np.testing.assert_allclose(final, np.tile(START.mean(0), (NUM_AGENTS, 1)), atol=1e-12)


@pytest.mark.parametrize("callback_class", [CDSGDCallback, SGPCallback])
def test_gossip_on_random_matchings_keeps_the_mean_and_reaches_consensus(callback_class: type) -> None:
    final, _, _ = run(callback_class(), steps=40, lr=0.0, topology="random_matching")
    np.testing.assert_allclose(final.mean(0), START.mean(0), atol=1e-12)  # doubly stochastic rounds
    np.testing.assert_allclose(final, np.tile(START.mean(0), (NUM_AGENTS, 1)), atol=1e-6)
