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
:class:`~lightning_dimat.comm.CommunicationLedger` and logged at each epoch end as ``comm/*``.

A non-finite agent (NaN or infinite values) is left out of every exchange — its neighbours renormalise
their weights over the finite agents (CDSGD) or receive nothing from it (SGP: push-sum stays unbiased) — and
is rebuilt from its finite neighbours with its gradient dropped and optimizer state reset, with a warning;
``on_nonfinite="raise"`` raises :class:`~lightning_dimat.merge.NonFiniteAgentError` instead.

``compression="bf16" | "fp16" | "int8"`` (:mod:`~lightning_dimat.comm.compression`) sends every state encoded
and mixes the decoded neighbour states with the agent's own exact one, in one process as across processes;
SGP compresses its numerators and buffers but never the push-sum weight, whose exactness keeps the de-biasing
right. There is no error feedback: every step adds the codec's error (int8: up to max|x|/254 per tensor) to
what an agent receives, so per-step gossip tolerates bf16/fp16 better than int8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_dimat.callbacks.metrics import communication_metrics, gathered_ledger
from lightning_dimat.comm.compression import check_compression
from lightning_dimat.comm.gather import gather_fields_by_agent
from lightning_dimat.comm.ledger import CommunicationLedger
from lightning_dimat.merge.finite import ON_NONFINITE, check_states, no_finite_neighbour, renormalised
from lightning_dimat.merge.state import StateDict, weighted_state
from lightning_dimat.strategy import AgentHandle, DIMATStrategy
from lightning_dimat.topology import column_stochastic
from lightning_dimat.validation import check_choice

PUSH_SUM_WEIGHT = "__push_sum_weight__"


class _GossipCallback(Callback):
    """Shared plumbing: the strategy, the ledger and its logging, the non-finite check."""

    def __init__(
        self, on_nonfinite: Literal["restore", "raise"] = "restore", compression: str = "none"
    ) -> None:
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        self.compression = check_compression(compression)
        self.ledger = CommunicationLedger()
        self.steps = 0
        self._strategy_ref: DIMATStrategy | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Checks for the DIMAT strategy."""
        if not isinstance(trainer.strategy, DIMATStrategy):
            raise ValueError(
                f"{type(self).__name__} needs Trainer(strategy=DIMATStrategy(...)), "
                f"got {type(trainer.strategy).__name__}."
            )
        self._strategy_ref = trainer.strategy

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keeps this process's agents' counts (a checkpoint holds every process's agents)."""
        strategy = self._strategy(trainer)
        assert strategy.swarm is not None
        self.ledger.restrict(strategy.swarm.agent_ids)

    def _check_finite(self, states: Mapping[int, Mapping[str, Tensor]], trainer: Trainer) -> list[int]:
        """Non-finite agents among ``states`` (warned about, or raised for: see the module doc)."""
        strategy = self._strategy(trainer)
        assert strategy.swarm is not None
        where = f"gossip step {self.steps} (epoch {trainer.current_epoch})"
        owner = type(self).__name__
        everywhere = strategy.nonfinite_everywhere
        return check_states(states, strategy.swarm.agent_ids, self.on_nonfinite, where, owner, everywhere)

    @staticmethod
    def _restart(handle: AgentHandle) -> None:
        """A restored agent forgets the step that broke it: no gradient, no optimizer state."""
        for parameter in handle.module.parameters():
            parameter.grad = None
        if handle.optimizer is not None:
            handle.optimizer.state.clear()

    @staticmethod
    def _strategy(trainer: Trainer) -> DIMATStrategy:
        strategy = trainer.strategy
        assert isinstance(strategy, DIMATStrategy) and strategy.swarm is not None
        return strategy

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Logs the cumulative communication counts."""
        metrics = communication_metrics(self.ledger, self._strategy(trainer))
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Steps done and the communication counts of every process's agents."""
        return {"steps": self.steps, "ledger": gathered_ledger(self.ledger, self._strategy_ref)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.steps = int(state_dict["steps"])
        self.ledger.load_state_dict(state_dict["ledger"])


class CDSGDCallback(_GossipCallback):
    """CDSGD: every optimizer step, x_i ← Σ_j π_ij x_j − α g_i with g_i the gradient at the old x_i.

    Args:
        on_nonfinite: ``"restore"`` a non-finite agent from its neighbours, or ``"raise"``.
        compression: how states are sent: ``"none"``, ``"bf16"``, ``"fp16"`` or ``"int8"`` (module doc).

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_dimat import DIMATStrategy
        >>> strategy = DIMATStrategy(topology="ring")
        >>> trainer = Trainer(strategy=strategy, callbacks=[CDSGDCallback()], accelerator="cpu", logger=False)
        >>> trainer.strategy.topology.neighbors(0)
        [1, 4]
    """

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Mixes every agent's weights with its neighbours' before its optimizer applies the gradient."""
        round = self._strategy(trainer).begin_round(index=self.steps, ledger=self.ledger)
        states = round.gather(compression=self.compression)
        bad = self._check_finite(states, trainer)
        mixed = {}
        for handle in round:
            order, row = renormalised(handle.order, handle.mixing_row, bad)
            if not order:
                raise no_finite_neighbour(handle.agent_id, f"gossip step {self.steps}")
            seen = states.seen_by(handle.agent_id)  # its own state exact, its neighbours' as received
            mixed[handle.agent_id] = weighted_state([seen[j] for j in order], row)
        round.commit(mixed, recompute_batchnorm=False)
        for handle in round:
            if handle.agent_id in bad:
                self._restart(handle)
        self.steps += 1


class SGPCallback(_GossipCallback):
    """Stochastic gradient push: push-sum gossip after every optimizer step.

    Args:
        mixing: a column-stochastic N × N matrix P (``P[i][j]``: the share agent j pushes to agent i; a
            directed graph is fine) — or None for the strategy's topology Π (symmetric doubly stochastic,
            where SGP is D-PSGD). An explicit matrix needs all agents in one process.
        on_nonfinite: ``"restore"`` a non-finite agent from its neighbours, or ``"raise"``.
        compression: how numerators and buffers are sent: ``"none"``, ``"bf16"``, ``"fp16"`` or ``"int8"``
            (the push-sum weight always exactly; see the module doc).

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_dimat import DIMATStrategy
        >>> directed_ring = [[0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]]
        >>> strategy = DIMATStrategy(num_agents=3)
        >>> trainer = Trainer(strategy=strategy, callbacks=[SGPCallback(directed_ring)], accelerator="cpu")
        >>> trainer.callbacks[0].mixing.sum(axis=0)
        array([1., 1., 1.])
    """

    def __init__(
        self,
        mixing: Sequence[Sequence[float]] | None = None,
        on_nonfinite: Literal["restore", "raise"] = "restore",
        compression: str = "none",
    ) -> None:
        super().__init__(on_nonfinite, compression)
        self.mixing = None if mixing is None else column_stochastic(mixing)
        self.numerators: dict[int, StateDict] = {}
        self.push_weights: dict[int, float] = {}
        self._pending = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Checks the push matrix against the strategy's agents and processes."""
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

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Starts the push-sum numerators and weights (a resumed run has them from the checkpoint)."""
        super().on_train_start(trainer, pl_module)
        strategy = self._strategy(trainer)
        assert strategy.swarm is not None
        if not self.numerators:
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

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Marks the batch: the push follows the local step, at the end of the batch."""
        # Every process reaches this hook once per optimizer step (even one that a GradScaler then skips),
        # so every process pushes at the same batches.
        self._pending = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Pushes numerators and weights to the neighbours and de-biases every agent's model."""
        if not self._pending:  # no optimizer step on this batch (gradient accumulation)
            return
        self._pending = False
        strategy = self._strategy(trainer)
        round = strategy.begin_round(index=self.steps, ledger=self.ledger, snapshot=False)
        # (this step's graph: the strategy's topology, or its schedule's round; doubly stochastic, so also
        # column-stochastic as push-sum needs)
        mixing = round.topology.mixing if self.mixing is None else self.mixing
        payloads: dict[int, StateDict] = {}
        for handle in round:
            numerator, weight = self.numerators[handle.agent_id], self.push_weights[handle.agent_id]
            state = handle.module.state_dict()
            # z_i ← z_i + (x_i' − x_i): the local step, applied to the numerator (x_i = z_i / w_i before it).
            payload = {k: z + (state[k].to(z.dtype) - z / weight) for k, z in numerator.items()}
            payload.update({k: v.detach().clone() for k, v in state.items() if k not in numerator})
            payload[PUSH_SUM_WEIGHT] = torch.tensor(weight, dtype=torch.float64, device=_device_of(state))
            payloads[handle.agent_id] = payload
        receivers = {j: int(np.count_nonzero(mixing[:, j])) - int(mixing[j, j] > 0) for j in payloads}
        pushed = round.gather(
            payloads, receivers=receivers, compression=self.compression, exact=(PUSH_SUM_WEIGHT,)
        )
        bad = self._check_finite(pushed, trainer)
        new_states: dict[int, StateDict] = {}
        for handle in round:
            agent_id = handle.agent_id
            senders = [agent_id, *(int(j) for j in np.flatnonzero(mixing[agent_id]) if j != agent_id)]
            senders = [j for j in senders if j not in bad]  # a non-finite agent pushes nothing
            if not senders:
                raise no_finite_neighbour(agent_id, f"gossip step {self.steps}")
            shares = [float(mixing[agent_id, j]) for j in senders]
            numerator_keys = [*self.numerators[agent_id], PUSH_SUM_WEIGHT]
            seen = pushed.seen_by(agent_id)  # its own push exact, its neighbours' as received
            mixed = weighted_state([_subset(seen[j], numerator_keys) for j in senders], shares)
            weight = float(mixed.pop(PUSH_SUM_WEIGHT))
            # Buffers (BatchNorm statistics) are averaged, not pushed: shares normalised per receiver.
            buffers = weighted_state(
                [_subset(seen[j], seen[j].keys() - set(numerator_keys)) for j in senders],
                [share / sum(shares) for share in shares],
            )
            self.numerators[agent_id], self.push_weights[agent_id] = mixed, weight
            new_states[agent_id] = {**{k: z / weight for k, z in mixed.items()}, **buffers}
        round.commit(new_states, recompute_batchnorm=False)
        for handle in round:
            if handle.agent_id in bad:
                self._restart(handle)
        self.steps += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        """The counts, and every process's push-sum numerators and weights by agent id."""
        local = {
            "numerators": {g: {k: t.cpu() for k, t in z.items()} for g, z in self.numerators.items()},
            "push_weights": dict(self.push_weights),
        }
        gathered = (
            local
            if self._strategy_ref is None
            else gather_fields_by_agent(self._strategy_ref.all_gather_object, local)
        )
        return {**super().state_dict(), **gathered}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
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


def _device_of(state: StateDict) -> torch.device:
    return next(iter(state.values())).device
