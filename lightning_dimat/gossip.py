"""Per-step gossip baselines on DIMAT's machinery: ``CDSGDCallback`` and ``SGPCallback``.

Both run with the same agents, shards and local optimizers as DIMAT (``Trainer(strategy=DIMATStrategy(...))``)
and exchange with neighbours after every optimizer step instead of every few epochs:

- **CDSGD** (consensus-based distributed SGD, Jiang et al. 2017): the gradient is taken at x_i, then
  x_i ← Σ_j π_ij x_j − α g_i. The callback mixes the weights after the backward pass and before the agent's
  optimizer applies its gradient (with plain SGD and no weight decay this is exactly CDSGD — weight decay is
  applied at the mixed point; with momentum or Adam it is the same combine-then-adapt step with that local
  optimizer).
- **SGP** (stochastic gradient push, Assran et al. 2019): push-sum on a column-stochastic matrix P. Each
  agent keeps a numerator z_i and a weight w_i; the model holds the de-biased x_i = z_i / w_i. After the
  local step (z_i += x_i' − x_i), z and w are pushed: z_i ← Σ_j p_ij z_j, w_i ← Σ_j p_ij w_j. On a symmetric
  doubly stochastic Π the weights stay 1 and SGP is D-PSGD: x_i ← Σ_j π_ij (x_j − α g_j).

CDSGD mixes every floating entry of the state dict (weights and BatchNorm running statistics); SGP pushes the
parameters and averages the floating buffers with its shares normalised per receiver (so BatchNorm statistics
stay statistics on a directed graph); integer entries (``num_batches_tracked``) stay the agent's own. With
``precision="16-mixed"`` a step the GradScaler skips (inf gradients in any agent) still gossips — without a
local update — in both. Communication is counted per step in a
:class:`~lightning_dimat.communication.CommunicationLedger` and logged at each epoch end as ``comm/*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import networkx as nx
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_dimat.callback import communication_metrics, detached_state, gather_objects, gathered_ledger
from lightning_dimat.communication import CommunicationLedger, receivers_of, state_bytes
from lightning_dimat.merge import load_state_in_place, weighted_state
from lightning_dimat.strategy import DIMATStrategy

StateDict = dict[str, Tensor]
PUSH_SUM_WEIGHT = "__push_sum_weight__"


class _GossipCallback(Callback):
    """Shared plumbing: the strategy, the agents' states, the ledger and its logging."""

    def __init__(self) -> None:
        self.ledger = CommunicationLedger()
        self.steps = 0
        self._strategy_ref: DIMATStrategy | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, DIMATStrategy):
            raise ValueError(
                f"{type(self).__name__} needs Trainer(strategy=DIMATStrategy(...)), "
                f"got {type(trainer.strategy).__name__}."
            )
        self._strategy_ref = trainer.strategy

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = self._strategy(trainer)
        assert strategy.swarm is not None
        self.ledger.restrict(strategy.swarm.agent_ids)  # a checkpoint holds every process's agents

    @staticmethod
    def _strategy(trainer: Trainer) -> DIMATStrategy:
        strategy = trainer.strategy
        assert isinstance(strategy, DIMATStrategy) and strategy.swarm is not None
        return strategy

    @staticmethod
    def _states(strategy: DIMATStrategy) -> dict[int, StateDict]:
        assert strategy.swarm is not None
        return {agent_id: detached_state(agent.state_dict()) for agent_id, agent in strategy.swarm.items()}

    def _with_remote(self, strategy: DIMATStrategy, states: dict[int, StateDict]) -> dict[int, StateDict]:
        remote, _ = strategy.exchange(states)
        device = strategy.root_device
        return {**states, **{j: {k: v.to(device) for k, v in s.items()} for j, s in remote.items()}}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = communication_metrics(self.ledger, self._strategy(trainer))
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "ledger": gathered_ledger(self.ledger, self._strategy_ref)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.ledger.load_state_dict(state_dict["ledger"])


class CDSGDCallback(_GossipCallback):
    """CDSGD: every optimizer step, x_i ← Σ_j π_ij x_j − α g_i with g_i the gradient at the old x_i.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_dimat import DIMATStrategy
        >>> strategy = DIMATStrategy(topology="ring")
        >>> trainer = Trainer(strategy=strategy, callbacks=[CDSGDCallback()], accelerator="cpu", logger=False)
        >>> trainer.strategy.topology.neighbors(0)
        [1, 4]
    """

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        strategy = self._strategy(trainer)
        assert strategy.swarm is not None
        local = self._states(strategy)
        states = self._with_remote(strategy, local)
        topology = strategy.topology
        for agent_id, agent in strategy.swarm.items():
            weights = topology.weights(agent_id)
            order = [agent_id, *sorted(j for j in weights if j != agent_id)]
            load_state_in_place(
                agent, weighted_state([states[j] for j in order], [weights[j] for j in order])
            )
        self.steps += 1
        self.ledger.record_exchange(
            receivers_of(topology, strategy.swarm.agent_ids), state_bytes(local[strategy.swarm.agent_ids[0]])
        )


class SGPCallback(_GossipCallback):
    """Stochastic gradient push: push-sum gossip after every optimizer step.

    Args:
        mixing: a column-stochastic N × N matrix P (``P[i][j]``: the share agent j pushes to agent i; a
            directed graph is fine) — or None for the strategy's topology Π (symmetric doubly stochastic,
            where SGP is D-PSGD). An explicit matrix needs all agents in one process.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_dimat import DIMATStrategy
        >>> directed_ring = [[0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]]
        >>> strategy = DIMATStrategy(num_agents=3)
        >>> trainer = Trainer(strategy=strategy, callbacks=[SGPCallback(directed_ring)], accelerator="cpu")
        >>> trainer.callbacks[0].mixing.sum(axis=0)
        array([1., 1., 1.])
    """

    def __init__(self, mixing: Sequence[Sequence[float]] | None = None) -> None:
        super().__init__()
        self.mixing = None if mixing is None else column_stochastic(mixing)
        self.numerators: dict[int, StateDict] = {}
        self.push_weights: dict[int, float] = {}
        self._pending = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        assert isinstance(strategy, DIMATStrategy)
        if self.mixing is None:
            return
        if len(self.mixing) != strategy.num_agents:
            raise ValueError(
                f"SGPCallback's mixing matrix is {len(self.mixing)} × {len(self.mixing)} but the strategy "
                f"has num_agents={strategy.num_agents}; give one row and column per agent."
            )
        if strategy.world_size > 1:
            raise ValueError(
                "SGPCallback(mixing=...) with an explicit (possibly directed) matrix needs all agents in one "
                f"process, but the run has {strategy.world_size} processes; use devices=1, or mixing=None "
                "to push on the strategy's topology."
            )

    def _push_matrix(self, strategy: DIMATStrategy) -> np.ndarray:
        return strategy.topology.mixing if self.mixing is None else self.mixing

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        strategy = self._strategy(trainer)
        assert strategy.swarm is not None
        if not self.numerators:  # fresh run (a resumed one has them from the checkpoint)
            self.push_weights = dict.fromkeys(strategy.swarm.agent_ids, 1.0)
            self.numerators = {
                g: _numerator(agent, agent.state_dict()) for g, agent in strategy.swarm.items()
            }
        else:  # resumed: keep this process's agents, on their device
            self.numerators = {
                g: {k: v.to(strategy.root_device) for k, v in self.numerators[g].items()}
                for g in strategy.swarm.agent_ids
            }
            self.push_weights = {g: self.push_weights[g] for g in strategy.swarm.agent_ids}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Every process reaches this hook once per optimizer step (even one that a GradScaler then skips),
        # so every process pushes at the same batches.
        self._pending = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:  # no optimizer step on this batch (gradient accumulation)
            return
        self._pending = False
        strategy = self._strategy(trainer)
        assert strategy.swarm is not None
        mixing = self._push_matrix(strategy)
        payloads: dict[int, StateDict] = {}
        for agent_id, agent in strategy.swarm.items():
            numerator, weight = self.numerators[agent_id], self.push_weights[agent_id]
            state = agent.state_dict()
            # z_i ← z_i + (x_i' − x_i): the local step, applied to the numerator (x_i = z_i / w_i before it).
            payload = {k: z + (state[k].to(z.dtype) - z / weight) for k, z in numerator.items()}
            payload.update({k: v.detach().clone() for k, v in state.items() if k not in numerator})
            payload[PUSH_SUM_WEIGHT] = torch.tensor(weight, dtype=torch.float64, device=state_device(state))
            payloads[agent_id] = payload
        pushed = self._with_remote(strategy, payloads)
        for agent_id, agent in strategy.swarm.items():
            senders = [agent_id, *(int(j) for j in np.flatnonzero(mixing[agent_id]) if j != agent_id)]
            shares = [float(mixing[agent_id, j]) for j in senders]
            numerator_keys = [*self.numerators[agent_id], PUSH_SUM_WEIGHT]
            mixed = weighted_state([_subset(pushed[j], numerator_keys) for j in senders], shares)
            weight = float(mixed.pop(PUSH_SUM_WEIGHT))
            # Buffers (BatchNorm statistics) are averaged, not pushed: shares normalised per receiver.
            buffers = weighted_state(
                [_subset(pushed[j], pushed[j].keys() - set(numerator_keys)) for j in senders],
                [share / sum(shares) for share in shares],
            )
            self.numerators[agent_id], self.push_weights[agent_id] = mixed, weight
            load_state_in_place(agent, {**{k: z / weight for k, z in mixed.items()}, **buffers})
        self.steps += 1
        size = state_bytes(payloads[strategy.swarm.agent_ids[0]])
        receivers = {j: int(np.count_nonzero(mixing[:, j])) - int(mixing[j, j] > 0) for j in payloads}
        self.ledger.record_exchange(receivers, size)

    def state_dict(self) -> dict[str, Any]:
        local = {
            "numerators": {g: {k: t.cpu() for k, t in z.items()} for g, z in self.numerators.items()},
            "push_weights": dict(self.push_weights),
        }
        gathered = gather_objects(self._strategy_ref, local)  # checkpoints are written once, from rank 0
        return {
            **super().state_dict(),
            **{name: {g: v for part in gathered for g, v in part[name].items()} for name in local},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.numerators = {int(k): dict(v) for k, v in state_dict["numerators"].items()}
        self.push_weights = {int(k): float(v) for k, v in state_dict["push_weights"].items()}


def _numerator(agent: LightningModule, state: dict[str, Tensor]) -> StateDict:
    """Push-sum numerators of the agent's parameters, at least float32 (x_i = z_i / w_i with w_i = 1)."""
    names = {name for name, _ in agent.named_parameters()}
    return {
        key: value.detach().to(torch.promote_types(value.dtype, torch.float32)).clone()
        for key, value in state.items()
        if key in names and value.is_floating_point()
    }


def _subset(state: StateDict, keys: Any) -> StateDict:
    wanted = set(keys)
    return {key: value for key, value in state.items() if key in wanted}


def column_stochastic(mixing: Sequence[Sequence[float]], atol: float = 1e-6) -> np.ndarray:
    """Checks that ``mixing`` is a valid push-sum matrix (square, non-negative, column-stochastic); returns it
    as float64.

    Every agent must keep a positive share (positive diagonal) and the directed graph must be strongly
    connected; otherwise a push-sum weight can reach 0 and the de-biased model diverges.

    Examples:
        >>> column_stochastic([[0.5, 0.25], [0.5, 0.75]]).sum(axis=0)
        array([1., 1.])
    """
    array = np.asarray(mixing, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or len(array) < 2:
        raise ValueError(f"The push-sum matrix must be square N × N with N >= 2, got shape {array.shape}.")
    if not np.isfinite(array).all() or (array < 0).any():
        i, j = np.argwhere(~np.isfinite(array) | (array < 0))[0]
        raise ValueError(f"Push-sum shares must be finite and >= 0, but entry ({i}, {j}) = {array[i, j]}.")
    sums = array.sum(axis=0)
    worst = int(np.argmax(np.abs(sums - 1)))
    if abs(sums[worst] - 1) > atol:
        raise ValueError(
            f"The push-sum matrix must be column-stochastic (what agent j pushes sums to 1), but column "
            f"{worst} sums to {sums[worst]:.6g}; divide each column by its sum."
        )
    missing = np.flatnonzero(np.diag(array) <= 0)
    if missing.size:
        raise ValueError(
            f"Every agent must keep a share of its own push-sum mass, but P[{missing[0]}][{missing[0]}] = "
            f"{array[missing[0], missing[0]]}; give the diagonal positive weights (e.g. 1/(out-degree + 1))."
        )
    graph = nx.from_numpy_array((array > 0).astype(np.int8), create_using=nx.DiGraph)
    if not nx.is_strongly_connected(graph):
        parts = sorted(sorted(part) for part in nx.strongly_connected_components(graph))
        raise ValueError(
            f"The push-sum graph must be strongly connected (every agent reaches every other), but it splits "
            f"into {parts}; add links so that mass flows between them, or the de-biasing weights vanish."
        )
    return array


def state_device(state: StateDict) -> torch.device:
    return next(iter(state.values())).device


def _optimizer_steps(strategy: DIMATStrategy) -> int:
    assert strategy.swarm is not None
    return sum(strategy.swarm.swarm_optimizer.steps.values())
