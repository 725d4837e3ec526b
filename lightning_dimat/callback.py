"""``MergeCallback``: every n-th epoch, each agent merges with its neighbours on the topology."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_dimat.communication import CommunicationLedger, receivers_of, state_bytes
from lightning_dimat.merge import (
    MERGE_METHODS,
    first_input,
    load_state_in_place,
    model_inputs,
    recompute_batchnorm,
    weighted_state,
)
from lightning_dimat.permutation.cache import spec_for
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.strategy import DIMATStrategy

StateDict = dict[str, Tensor]


class MergeCallback(Callback):
    """Merges each agent with its neighbours: x_i ← Σ_j π_ij P_ij x_j, with Π from the strategy's topology.

    The merge runs right after the last training batch of every ``every_n_epochs``-th epoch, *before*
    that epoch's validation, so logged validation metrics of a merge epoch are post-merge (what the paper
    plots). All agents merge synchronously from the pre-merge weights. Each agent aligns its neighbours
    into its own basis on its own data (P_ii = I, so its optimizer state stays valid), then its BatchNorm
    statistics are re-estimated on ``num_batches`` batches of its own shard.

    Logged at each merge: ``merge/round``, ``merge/time_s``, ``merge/bytes`` (the neighbour states each
    agent receives, summed over local agents), ``merge/spectral_gap`` (1 − max(|λ2|, |λN|) of Π) and
    ``merge/consensus_distance_before``/``_after`` (mean over agents of ‖x_i − x̄‖ over parameters), and the
    cumulative communication counts of :class:`~lightning_dimat.communication.CommunicationLedger`
    (``comm/rounds``, ``comm/bytes_sent``, ``comm/messages_sent``, ``comm/forward_samples``).

    Args:
        every_n_epochs: merge after epochs e (0-based) with ``(e + 1) % every_n_epochs == 0``.
        method: a name in :data:`~lightning_dimat.merge.MERGE_METHODS`: ``"activation"`` (DIMAT: activation
            matching), ``"weight"`` (weight matching, the paper's WM) or ``"average"`` (the paper's WA).
        start_epoch: no merge before this (0-based) epoch.
        num_batches: batches of each agent's own data used for BatchNorm re-estimation (and, for
            activation-based methods, for the activation statistics).
        recompute_batchnorm: re-estimate BatchNorm statistics after each merge.
        spec: a hand-written :class:`~lightning_dimat.permutation.PermutationSpec` (default: derived from the
            model by ``torch.fx`` tracing, or taken from the model's own ``permutation_spec`` method).
        optimizer_state: ``"keep"`` each agent's optimizer state (momentum, Adam moments) across a merge —
            valid because an agent keeps its own basis (P_ii = I) — or ``"reset"`` it after every merge, as
            the official DIMAT code does by re-creating its optimizer each round.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_dimat import DIMATStrategy
        >>> merge = MergeCallback(every_n_epochs=2)
        >>> trainer = Trainer(strategy=DIMATStrategy(), callbacks=[merge])  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_epochs: int = 2,
        method: str = "activation",
        start_epoch: int = 0,
        num_batches: int = 10,
        recompute_batchnorm: bool = True,
        spec: PermutationSpec | None = None,
        optimizer_state: str = "keep",
    ) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}.")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch!r}.")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}.")
        if optimizer_state not in ("keep", "reset"):
            raise ValueError(f"optimizer_state must be 'keep' or 'reset', got {optimizer_state!r}.")
        MERGE_METHODS.get(method)
        self.optimizer_state = optimizer_state
        self.ledger = CommunicationLedger()
        self._strategy: DIMATStrategy | None = None
        self.every_n_epochs = every_n_epochs
        self.method = method
        self.start_epoch = start_epoch
        self.num_batches = num_batches
        self.recompute_batchnorm = recompute_batchnorm
        self.spec = spec
        self.round = 0
        self.merged_epochs: list[int] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, DIMATStrategy):
            raise ValueError(
                "MergeCallback needs Trainer(strategy=DIMATStrategy(...)), "
                f"got {type(trainer.strategy).__name__}."
            )
        self._strategy = trainer.strategy

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Derives and checks the permutation spec now, so that an unsupported model fails before training."""
        assert isinstance(trainer.strategy, DIMATStrategy) and trainer.strategy.swarm is not None
        self.ledger.restrict(trainer.strategy.swarm.agent_ids)  # a checkpoint holds every process's agents
        method = MERGE_METHODS.get(self.method)
        if not getattr(method, "uses_spec", False):
            return
        strategy = trainer.strategy
        assert isinstance(strategy, DIMATStrategy) and strategy.swarm is not None
        agent = strategy.swarm.agent(strategy.swarm.agent_ids[0])
        batch = strategy.example_batch(strategy.swarm.agent_ids[0])
        spec_for(agent, first_input(agent, [batch]), self.spec)

    def should_merge(self, epoch: int) -> bool:
        """Whether to merge after (0-based) ``epoch``."""
        return epoch >= self.start_epoch and (epoch + 1) % self.every_n_epochs == 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_last_batch and self.should_merge(trainer.current_epoch):
            self.merge(trainer, pl_module)

    def merge(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs one synchronous merge round of all local agents with their neighbours."""
        strategy = trainer.strategy
        assert isinstance(strategy, DIMATStrategy) and strategy.swarm is not None
        swarm, topology = strategy.swarm, strategy.topology
        method = MERGE_METHODS.get(self.method)
        started = time.perf_counter()
        states = {agent_id: detached_state(agent.state_dict()) for agent_id, agent in swarm.items()}
        parameter_names = [name for name, _ in swarm.agent(swarm.agent_ids[0]).named_parameters()]
        distance_before = consensus_distance(states, parameter_names, strategy)
        # Neighbours held by other processes: only their weights cross the wire (matching stays local).
        remote, sent = strategy.exchange(states)
        strategy.last_exchange_bytes = sent
        device = strategy.root_device
        states.update({j: {k: v.to(device) for k, v in state.items()} for j, state in remote.items()})
        received_bytes = 0
        merged: dict[int, StateDict] = {}
        for agent_id, agent in swarm.items():
            weights = topology.weights(agent_id)
            order = [agent_id, *sorted(j for j in weights if j != agent_id)]
            received_bytes += sum(state_bytes(states[j]) for j in order[1:])
            data = list(strategy.local_batches(agent_id, self.num_batches)) if method.requires_data else None
            if data is not None and getattr(method, "runs_neighbours", False):
                self.ledger.record_forward(agent_id, len(order) * _num_samples(data))
            with strategy.swarm.streams.activate(agent_id):
                aligned = method(
                    agent,
                    [states[j] for j in order[1:]],
                    data,
                    spec=self.spec,
                    forward_context=trainer.precision_plugin.forward_context,
                )
            merged[agent_id] = weighted_state([states[agent_id], *aligned], [weights[j] for j in order])
        for agent_id, agent in swarm.items():
            load_state_in_place(agent, merged[agent_id])
            if self.recompute_batchnorm:
                batches = list(strategy.local_batches(agent_id, self.num_batches))
                self.ledger.record_forward(agent_id, _num_samples(batches))
                with strategy.swarm.streams.activate(agent_id):
                    recompute_batchnorm(
                        agent, batches, forward_context=trainer.precision_plugin.forward_context
                    )
        if self.optimizer_state == "reset":
            for optimizer in swarm.swarm_optimizer.optimizers.values():
                optimizer.state.clear()
        self.ledger.record_exchange(
            receivers_of(topology, swarm.agent_ids), state_bytes(states[swarm.agent_ids[0]])
        )
        self.round += 1
        self.merged_epochs.append(trainer.current_epoch)
        metrics = {
            "merge/round": float(self.round),
            "merge/time_s": time.perf_counter() - started,
            "merge/bytes": float(
                strategy.reduce(torch.tensor(float(received_bytes), device=device), reduce_op="sum")
            ),
            "merge/bytes_sent": float(
                strategy.reduce(torch.tensor(float(sent), device=device), reduce_op="sum")
            ),
            "merge/spectral_gap": topology.spectral_gap,
            "merge/consensus_distance_before": distance_before,
            "merge/consensus_distance_after": consensus_distance(
                {agent_id: detached_state(agent.state_dict()) for agent_id, agent in swarm.items()},
                parameter_names,
                strategy,
            ),
        }
        metrics.update(communication_metrics(self.ledger, strategy))
        for name, value in metrics.items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "merged_epochs": list(self.merged_epochs),
            "ledger": gathered_ledger(self.ledger, self._strategy),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict["round"])
        self.merged_epochs = list(state_dict["merged_epochs"])
        self.ledger.load_state_dict(state_dict.get("ledger", {}))


def gather_objects(strategy: DIMATStrategy | None, obj: Any) -> list[Any]:
    """``obj`` from every process (``[obj]`` before ``setup`` has given a callback its strategy)."""
    return [obj] if strategy is None else strategy.all_gather_object(obj)


def gathered_ledger(ledger: CommunicationLedger, strategy: DIMATStrategy | None) -> dict[str, Any]:
    """The ledger's state with every process's agents (checkpoints are written once, from rank 0)."""
    parts = gather_objects(strategy, ledger.state_dict())
    return {name: {g: v for part in parts for g, v in part[name].items()} for name in parts[0]}


def communication_metrics(ledger: CommunicationLedger, strategy: DIMATStrategy) -> dict[str, float]:
    """The ledger's totals, summed over processes (rounds: the most any agent did), and every agent's own
    counts (``comm/agent_<g>/...``, gathered from all processes)."""
    totals = ledger.totals()
    if strategy.world_size > 1:
        device = strategy.root_device
        for name in ("comm/bytes_sent", "comm/messages_sent", "comm/forward_samples"):
            value = torch.tensor(totals[name], dtype=torch.float64, device=device)
            totals[name] = float(strategy.reduce(value, reduce_op="sum"))
        totals["comm/rounds"] = float(
            strategy.reduce(torch.tensor(totals["comm/rounds"], device=device), reduce_op="max")
        )
    for part in strategy.all_gather_object(ledger.per_agent()):
        totals.update(part)
    return totals


def _num_samples(batches: list[Any]) -> int:
    return sum(x.shape[0] if isinstance(x, Tensor) else len(x) for x in model_inputs(batches))


def detached_state(state: Mapping[str, Tensor]) -> StateDict:
    """A copy of ``state`` detached from autograd (safe to keep while training goes on)."""
    return {key: value.detach().clone() for key, value in state.items()}


def consensus_distance(
    states: Mapping[int, Mapping[str, Tensor]], names: list[str], strategy: DIMATStrategy | None = None
) -> float:
    """Mean over all agents of ‖x_i − x̄‖ over the entries ``names`` (the parameters).

    ``states`` are the local agents'; with several processes, x̄ and the mean are all-reduced (one
    all-reduce of the model size, so the number is the same in every process).
    """
    vectors = {
        agent_id: torch.cat([state[name].detach().double().flatten() for name in names])
        for agent_id, state in states.items()
    }
    total = torch.stack(list(vectors.values())).sum(0)
    count = torch.tensor(float(len(vectors)), dtype=torch.float64, device=total.device)
    if strategy is not None and strategy.world_size > 1:
        total, count = strategy.reduce(total, reduce_op="sum"), strategy.reduce(count, reduce_op="sum")
    mean = total / count
    distances = torch.stack([(vector - mean).norm() for vector in vectors.values()]).sum()
    if strategy is not None and strategy.world_size > 1:
        distances = strategy.reduce(distances, reduce_op="sum")
    return float(distances / count)
