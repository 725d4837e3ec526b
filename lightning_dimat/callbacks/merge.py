"""``MergeCallback``: every n-th epoch, each agent merges with its neighbours on the topology."""

from __future__ import annotations

import time
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_dimat.callbacks.metrics import (
    communication_metrics,
    consensus_distances,
    gathered_ledger,
    summed_over_processes,
)
from lightning_dimat.comm.ledger import CommunicationLedger
from lightning_dimat.merge.combine import merge_into_basis
from lightning_dimat.merge.inputs import first_input, num_samples
from lightning_dimat.merge.matchers import Matcher, resolve_matcher
from lightning_dimat.merge.state import StateDict
from lightning_dimat.permutation.cache import spec_for
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.strategy import DIMATStrategy, MergeRound
from lightning_dimat.validation import check_choice, check_int


class MergeCallback(Callback):
    """Merges each agent with its neighbours: x_i ← Σ_j π_ij P_ij x_j, with Π from the strategy's topology.

    The merge runs right after the last training batch of every ``every_n_epochs``-th epoch, *before*
    that epoch's validation, so logged validation metrics of a merge epoch are post-merge (what the paper
    plots). All agents merge synchronously from the pre-merge weights. Each agent aligns its neighbours
    into its own basis on its own data (P_ii = I, so its optimizer state stays valid), then its BatchNorm
    statistics are re-estimated on the same ``num_batches`` batches of its own shard.

    Logged at each merge: ``merge/round``, ``merge/time_s``, ``merge/bytes`` (the neighbour states each
    agent receives, summed over local agents), ``merge/bytes_sent`` (bytes that crossed process boundaries),
    ``merge/spectral_gap`` (1 − max(|λ2|, |λN|) of Π) and
    ``merge/consensus_distance_before``/``_after`` (mean over agents of ‖x_i − x̄‖ over parameters), and the
    cumulative communication counts of :class:`~lightning_dimat.comm.CommunicationLedger`
    (``comm/rounds``, ``comm/bytes_sent``, ``comm/messages_sent``, ``comm/forward_samples``).

    Args:
        every_n_epochs: merge after epochs e (0-based) with ``(e + 1) % every_n_epochs == 0``.
        method: a matcher or the name of one in :data:`~lightning_dimat.merge.MATCHERS`: ``"activation"``
            (DIMAT: activation matching), ``"weight"`` (weight matching, the paper's WM) or ``"average"``
            (the paper's WA); a :class:`~lightning_dimat.merge.Matcher` instance sets its options.
        start_epoch: no merge before this (0-based) epoch.
        num_batches: batches of each agent's own data used for the activation statistics (activation
            matching) and for BatchNorm re-estimation — drawn once per merge.
        recompute_batchnorm: re-estimate BatchNorm statistics after each merge.
        spec: a hand-written :class:`~lightning_dimat.permutation.PermutationSpec` (default: derived from the
            model by ``torch.fx`` tracing, or taken from the model's own ``permutation_spec`` method).
        optimizer_state: ``"keep"`` each agent's optimizer state (momentum, Adam moments) across a merge —
            valid because an agent keeps its own basis (P_ii = I) — or ``"reset"`` it after every merge, as
            the official DIMAT code does by re-creating its optimizer each round.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> merge = MergeCallback(every_n_epochs=2, method="weight")
        >>> trainer = Trainer(strategy=DIMATStrategy(), callbacks=[merge], logger=False)
        >>> merge.should_merge(epoch=1), merge.should_merge(epoch=2)
        (True, False)
    """

    def __init__(
        self,
        every_n_epochs: int = 2,
        method: str | Matcher = "activation",
        start_epoch: int = 0,
        num_batches: int = 10,
        recompute_batchnorm: bool = True,
        spec: PermutationSpec | None = None,
        optimizer_state: Literal["keep", "reset"] = "keep",
    ) -> None:
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.start_epoch = check_int("start_epoch", start_epoch, minimum=0)
        self.num_batches = check_int("num_batches", num_batches, minimum=1)
        self.optimizer_state = check_choice("optimizer_state", optimizer_state, ("keep", "reset"))
        self.method = method
        self.matcher = resolve_matcher(method)
        self.recompute_batchnorm = recompute_batchnorm
        self.spec = spec
        self.ledger = CommunicationLedger()
        self.round = 0
        self.merged_epochs: list[int] = []
        self.last_bytes_sent = 0
        self._strategy: DIMATStrategy | None = None
        self._spec: PermutationSpec | None = spec

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Checks for the DIMAT strategy and tells it how to build the consensus at export."""
        if not isinstance(trainer.strategy, DIMATStrategy):
            raise ValueError(
                "MergeCallback needs Trainer(strategy=DIMATStrategy(...)), "
                f"got {type(trainer.strategy).__name__}."
            )
        self._strategy = trainer.strategy
        trainer.strategy.consensus_matcher = self.matcher
        trainer.strategy.consensus_spec = self.spec

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Derives and checks the permutation spec now, so that an unsupported model fails before training."""
        strategy = self._dimat(trainer)
        assert strategy.swarm is not None
        self.ledger.restrict(strategy.swarm.agent_ids)  # a checkpoint holds every process's agents
        if not self.matcher.uses_spec:
            return
        agent_id = strategy.swarm.agent_ids[0]
        agent = strategy.swarm.agent(agent_id)
        self._spec = spec_for(agent, first_input(agent, [strategy.example_batch(agent_id)]), self.spec)
        strategy.consensus_spec = self._spec

    def should_merge(self, epoch: int) -> bool:
        """Whether to merge after (0-based) ``epoch``."""
        return epoch >= self.start_epoch and (epoch + 1) % self.every_n_epochs == 0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Merges after the last batch of a merge epoch (before that epoch's validation)."""
        if trainer.is_last_batch and self.should_merge(trainer.current_epoch):
            self.merge(trainer, pl_module)

    def merge(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs one synchronous merge round of all local agents with their neighbours."""
        strategy = self._dimat(trainer)
        started = time.perf_counter()
        wants_data = self.matcher.requires_data or self.recompute_batchnorm
        round = strategy.begin_round(
            num_batches=self.num_batches if wants_data else None, index=self.round, ledger=self.ledger
        )
        states = round.gather()
        merged: dict[int, StateDict] = {}
        for handle in round:
            data = handle.batches if self.matcher.requires_data else None
            if data is not None and self.matcher.runs_neighbours:
                self.ledger.record_forward(handle.agent_id, len(handle.order) * num_samples(data))
            with handle.activate():
                merged[handle.agent_id], _ = merge_into_basis(
                    handle.module,
                    states[handle.agent_id],
                    [states[j] for j in handle.neighbours],
                    handle.mixing_row,
                    self.matcher,
                    data,
                    spec=self._spec,
                    forward_context=round.forward_context,
                )
        round.commit(
            merged, recompute_batchnorm=self.recompute_batchnorm, optimizer_state=self.optimizer_state
        )
        self.round += 1
        self.merged_epochs.append(trainer.current_epoch)
        self.last_bytes_sent = round.bytes_sent
        self._log(pl_module, self._metrics(round, strategy, time.perf_counter() - started))

    def _metrics(self, round: MergeRound, strategy: DIMATStrategy, seconds: float) -> dict[str, float]:
        names = [name for name, _ in next(iter(round)).module.named_parameters()]
        before, after, count = consensus_distances(round.snapshot, round.local_states(), names, strategy)
        local = {
            "bytes": float(sum(round.bytes_received.values())),
            "bytes_sent": float(round.bytes_sent),
            "before": before,
            "after": after,
            "count": count,
        }
        summed, ledger_state = summed_over_processes(local, self.ledger, strategy)
        return {
            "merge/round": float(self.round),
            "merge/time_s": seconds,
            "merge/bytes": summed["bytes"],
            "merge/bytes_sent": summed["bytes_sent"],
            "merge/spectral_gap": round.topology.spectral_gap,
            "merge/consensus_distance_before": summed["before"] / summed["count"],
            "merge/consensus_distance_after": summed["after"] / summed["count"],
            **communication_metrics(self.ledger, strategy, ledger_state),
        }

    @staticmethod
    def _log(pl_module: LightningModule, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True, batch_size=1)

    @staticmethod
    def _dimat(trainer: Trainer) -> DIMATStrategy:
        strategy = trainer.strategy
        assert isinstance(strategy, DIMATStrategy) and strategy.swarm is not None
        return strategy

    @override
    def state_dict(self) -> dict[str, Any]:
        """Rounds done, merge epochs and the communication counts of every process's agents."""
        return {
            "round": self.round,
            "merged_epochs": list(self.merged_epochs),
            "ledger": gathered_ledger(self.ledger, self._strategy),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.round = int(state_dict["round"])
        self.merged_epochs = list(state_dict["merged_epochs"])
        self.ledger.load_state_dict(state_dict.get("ledger", {}))
