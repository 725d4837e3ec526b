"""``MergeCallback``: every n-th epoch, each agent merges with its neighbours on the topology."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_dimat.callbacks.metrics import (
    communication_metrics,
    consensus_distances,
    gathered_ledger,
    summed_over_processes,
)
from lightning_dimat.comm.compression import check_compression
from lightning_dimat.comm.deadline import Deadline, new_namespace
from lightning_dimat.comm.gather import gather_by_agent
from lightning_dimat.comm.ledger import CommunicationLedger
from lightning_dimat.merge.combine import merge_into_basis
from lightning_dimat.merge.finite import (
    ON_NONFINITE,
    NonFiniteAgentError,
    check_states,
    no_finite_neighbour,
    nonfinite_agents,
    nonfinite_message,
    renormalised,
)
from lightning_dimat.merge.inputs import first_input, num_samples
from lightning_dimat.merge.matchers import AverageMatcher, Matcher, resolve_matcher
from lightning_dimat.merge.state import copy_holding
from lightning_dimat.permutation.apply import permute_state
from lightning_dimat.permutation.cache import spec_for
from lightning_dimat.permutation.shared_basis import basis_permutations, moved_fraction
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.strategy import DIMATStrategy, MergeRound
from lightning_dimat.strategy.run_identity import differences, refuse_differences
from lightning_dimat.topology import MIXING_RULES, Topology
from lightning_dimat.validation import (
    check_bool,
    check_choice,
    check_index,
    check_instance,
    check_int,
    check_real,
)

AVERAGE = AverageMatcher()
"""The matcher of a round that does not re-match (plain averaging)."""

SETTINGS_BEFORE_THEY_WERE_RECORDED: dict[str, Any] = {"basis": "own", "rematch_every": 1}
"""How a checkpoint that does not record a setting ran: written before the option existed, it ran as the
package did then (own bases, re-matching every round)."""

PARTICIPATION_STREAM = 0x9A27
"""Mixed into the seed of the per-round participation draws (apart from every other stream of the run)."""


class MergeCallback(Callback):
    """Merges each agent with its neighbours: x_i ← Σ_j π_ij P_ij x_j, with Π from the strategy's topology.

    The merge runs right after the last training batch of every ``every_n_epochs``-th epoch, *before*
    that epoch's validation, so logged validation metrics of a merge epoch are post-merge (what the paper
    plots). All agents merge synchronously from the pre-merge weights. In a round that matches, each agent
    aligns its neighbours into its own basis on its own data (P_ii = I, so its optimizer state stays
    valid); in every round its BatchNorm statistics are re-estimated on the same ``num_batches`` batches
    of its own shard.

    **Bases.** By default (``basis="shared"``), before the first merge every agent is brought into the
    basis of agent ``root`` once: it aligns itself to its parent in a breadth-first spanning tree of the
    topology (on its own data, with its parent's weights) and composes those permutations along its path to
    the root (only tree neighbours' weights and permutation indices are exchanged); its optimizer state is
    permuted with it, so its function and its next step do not change. After that, by default
    (``rematch_every=None``), merges are plain averages in the shared basis plus BatchNorm re-estimation:
    DIMAT aligned once, then averaged — the best DIMAT setting on the CPU protocol (docs/results.md), at a
    WA round's cost.
    ``rematch_every=k`` re-matches every k-th round, with the matcher's ``identity_bias`` deciding how far a
    unit must beat staying in place to move. ``basis="own"`` is the paper's DIMAT: agents never share a basis
    and every merge aligns every neighbour into the merging agent's own basis. The shared basis is kept in
    checkpoints. Matchers without permutations (``"average"``) need no basis.

    **Non-finite agents.** Before each merge every received state is checked: an agent holding NaN or
    infinite values is left out of its neighbours' merges (their mixing weights renormalised over the
    finite agents) and is itself rebuilt from its finite neighbours (in the first one's basis, optimizer
    state reset), with a warning naming the agent, epoch and step — or, with ``on_nonfinite="raise"``, the
    merge raises :class:`~lightning_dimat.merge.NonFiniteAgentError`. Logged as ``merge/nonfinite_agents``.
    The shared basis is built around such agents (a NaN root hands the basis to the nearest finite agent).

    Logged at each merge: ``merge/round``, ``merge/time_s``, ``merge/bytes`` (the bytes of the neighbour
    states all agents received in this merge, every agent counted as its own machine: what the algorithm
    sends over the graph, whatever the process layout; the merge's share of ``comm/bytes_sent``),
    ``merge/bytes_between_processes`` (what this run actually moved between its processes in this merge: 0
    in one process), ``merge/spectral_gap`` (1 − max(|λ2|, |λN|) of Π) and
    ``merge/consensus_distance_before``/``_after`` (mean over agents of ‖x_i − x̄‖ over parameters),
    ``merge/permuted_fraction`` (units moved by the round's permutations, mean over channel groups, neighbours
    and agents), ``merge/absent_agents`` (agents that sat the round out, ``participation``),
    ``merge/missing_neighbours`` (neighbour states that missed the ``deadline``), and the
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
        basis: ``"shared"`` (all agents brought into one basis before the first merge) or ``"own"`` (the
            paper's DIMAT: every agent stays in its own basis and every merge re-matches).
        root: the agent whose basis becomes the shared one.
        on_nonfinite: ``"restore"`` a non-finite agent from its neighbours (and leave it out of theirs), or
            ``"raise"``.
        final_merge: also merge after the last epoch of ``fit`` (``max_epochs``) when it is not a merge
            epoch, so that the run ends on merged agents whatever ``every_n_epochs`` is.
        compression: how states are sent: ``"none"``, ``"bf16"``, ``"fp16"`` or ``"int8"`` (per-tensor scale;
            see :mod:`~lightning_dimat.comm.compression`). An agent merges its neighbours' decoded states, in
            one process as across processes, and its own exact one; bytes are counted as encoded.
        participation: the probability that an agent takes part in a round (agents that drop out or lag):
            drawn per round from the strategy's seed, the same draw in every process. An absent agent keeps
            its weights, BatchNorm statistics and optimizer state, sends nothing, and its neighbours
            renormalise their weights over the agents present; it rejoins at the next round it draws. 1.0
            (default) is every agent every round. The first merge of ``basis="shared"`` (entering the
            basis) takes every agent.
        rematch_every: with ``basis="shared"``, re-match every ``rematch_every``-th merge round (counted
            from the first; the round that enters the basis always aligns); the rounds between are plain
            averages in the shared basis plus BatchNorm re-estimation — a WA round's cost. ``None``
            (default) never re-matches once the basis exists (the same agents as an ``identity_bias`` too
            large to move any unit, without its forward passes and assignments); 1 re-matches every round.
            Ignored under ``basis="own"``, where agents hold different bases and every merge must match.
        deadline: with several processes, the seconds a merge waits for the neighbour states held by other
            processes; a state that has not arrived by then is left out of that round (the mixing weights
            renormalised over the states at hand, as for an absent agent) and counted in
            ``merge/missing_neighbours``, and a process that lags merges with what the others sent in time
            and rejoins at the next round (see :mod:`~lightning_dimat.comm.deadline`). The round then runs no
            collective: its ``merge/*`` metrics are each process's own (summed over its agents). ``None``
            (default) waits for every neighbour and fails with a clear error past the strategy's ``timeout``.
            Entering the shared basis always waits for every agent. In one process every state is at hand
            and the deadline never applies.

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
        basis: Literal["own", "shared"] = "shared",
        root: int = 0,
        on_nonfinite: Literal["restore", "raise"] = "restore",
        final_merge: bool = False,
        compression: str = "none",
        participation: float = 1.0,
        rematch_every: int | None = None,
        deadline: float | None = None,
    ) -> None:
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.start_epoch = check_int("start_epoch", start_epoch, minimum=0)
        self.num_batches = check_int("num_batches", num_batches, minimum=1)
        self.optimizer_state = check_choice("optimizer_state", optimizer_state, ("keep", "reset"))
        self.basis = check_choice("basis", basis, ("own", "shared"))
        self.root = check_int("root", root, minimum=0)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        self.final_merge = check_bool("final_merge", final_merge)
        self.compression = check_compression(compression)
        # (0 is refused: no agent would ever merge)
        self.participation = check_real("participation", participation, 0.0, 1.0, low_open=True)
        self.rematch_every = (
            None if rematch_every is None else check_int("rematch_every", rematch_every, minimum=1)
        )
        self.deadline = (
            None if deadline is None else check_real("deadline", deadline, 0.0, float("inf"), low_open=True)
        )
        self.missing_neighbours = 0
        """Neighbour states (summed over this process's agents) that missed the last merge's deadline."""
        self._namespace: str | None = None
        self.absent_agents: list[int] = []
        """The agents (all processes) that sat out the last merge."""
        self.nonfinite_agents: list[int] = []
        """The local agents found non-finite (and restored) at the last merge."""
        self.basis_built = False
        self.method = method
        self.matcher = resolve_matcher(method)
        self.recompute_batchnorm = check_bool("recompute_batchnorm", recompute_batchnorm)
        self.spec = check_instance(
            "spec", spec, PermutationSpec, "build one with PermutationSpec.from_groups, or leave it None"
        )
        self.ledger = CommunicationLedger()
        self.round = 0
        self.merged_epochs: list[int] = []
        self.last_bytes_between_processes = 0
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
        last = trainer.max_epochs
        remaining = range(trainer.current_epoch, last) if last is not None and last >= 0 else None
        self._check_early_stopping(trainer)
        if self.deadline is not None and strategy.world_size > 1:
            self._namespace = strategy.all_gather_object(new_namespace())[0]  # rank 0's, for this fit
        if remaining is not None and not any(map(self.should_merge, remaining)) and not self.final_merge:
            rank_zero_warn(
                f"MergeCallback(every_n_epochs={self.every_n_epochs}, start_epoch={self.start_epoch}) never "
                f"merges in this run (epochs {trainer.current_epoch}..{last - 1} of max_epochs={last}): the "
                "agents train alone. Lower every_n_epochs or start_epoch, or raise max_epochs."
            )
        if not self.matcher.uses_spec:
            return
        agent_id = strategy.swarm.agent_ids[0]
        agent = strategy.swarm.agent(agent_id)
        batch = strategy.example_batch(agent_id)
        self._spec = spec_for(agent, first_input(agent, [batch]), self.spec, self.matcher.probes)
        strategy.consensus_spec = self._spec
        # Run what a merge runs, on one batch and a copy of the agent: a model the matcher cannot handle
        # (e.g. no probes because forward returns hidden units too) fails now, not after the first epoch.
        rehearsal = copy.deepcopy(agent)
        with torch.random.fork_rng(devices=[]):
            self.matcher.match(
                rehearsal,
                [rehearsal.state_dict()],
                [batch] if self.matcher.requires_data else None,
                spec=self._spec,
                forward_context=strategy.precision_plugin.forward_context,
            )

    def _check_early_stopping(self, trainer: Trainer) -> None:
        """Warns when an ``EarlyStopping`` would stop before seeing a merge: between merges the monitored
        metric of local training can worsen for ``every_n_epochs`` epochs and recover at the merge."""
        checks_between_merges = self.every_n_epochs / max(1, trainer.check_val_every_n_epoch or 1)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, EarlyStopping) and callback.patience < checks_between_merges:
                rank_zero_warn(
                    f"EarlyStopping(monitor={callback.monitor!r}, patience={callback.patience}) may stop "
                    f"between merges: MergeCallback merges every {self.every_n_epochs} epochs, and "
                    f"{checks_between_merges:g} validation checks pass from one merge to the next. Set "
                    f"patience >= {checks_between_merges:g} (or merge more often)."
                )

    def should_merge(self, epoch: int) -> bool:
        """Whether to merge after (0-based) ``epoch``."""
        return epoch >= self.start_epoch and (epoch + 1) % self.every_n_epochs == 0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Merges after the last batch of a merge epoch (before that epoch's validation)."""
        if not trainer.is_last_batch:
            return
        epoch = trainer.current_epoch
        last = self.final_merge and trainer.max_epochs is not None and epoch == trainer.max_epochs - 1
        if self.should_merge(epoch) or last:
            self.merge(trainer, pl_module)

    def merge(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs one synchronous merge round of all local agents with their neighbours."""
        strategy = self._dimat(trainer)
        started = time.perf_counter()
        basis_bytes = (0.0, 0.0)  # (what entering the shared basis received, and sent between processes)
        if self.basis == "shared" and self.matcher.uses_spec and not self.basis_built:
            basis_bytes = self.enter_shared_basis(trainer)
        matcher = self._matcher_this_round()
        wants_data = matcher.requires_data or self.recompute_batchnorm
        round = strategy.begin_round(
            num_batches=self.num_batches if wants_data else None, index=self.round, ledger=self.ledger
        )
        absent = self._absent_this_round(strategy)
        # An agent that sits the round out sends nothing and receives nothing: it is not counted.
        receivers = {
            g: sum(i not in absent for i in round.topology.receivers(g))
            for g in round.agent_ids
            if g not in absent
        }
        uses = {
            handle.agent_id: []
            if handle.agent_id in absent
            else [j for j in handle.neighbours if j not in absent]
            for handle in round
        }
        states = round.gather(
            compression=self.compression, receivers=receivers, deadline=self._deadline(), uses=uses
        )
        bad = self._check_finite(states, trainer)
        self.missing_neighbours = sum(
            len(set(handle.neighbours) & set(states.missing) - absent)
            for handle in round
            if handle.agent_id not in absent
        )
        moved: list[float] = []
        # Each agent's merge reads only the round's snapshot and received states, so it is written as soon
        # as it is computed: one merged state alive at a time, not one per agent.
        for handle in round:
            if handle.agent_id in absent and handle.agent_id not in bad:
                continue  # (sat out: untouched; a non-finite agent is still restored)
            order, row = renormalised(handle.order, handle.mixing_row, [*bad, *absent, *states.missing])
            if not order:
                raise no_finite_neighbour(handle.agent_id, self._where(trainer))
            seen = states.seen_by(handle.agent_id)  # its own state exact, its neighbours' as received
            # A non-finite agent is rebuilt from its finite neighbours, in the basis of the first of them.
            module, first = handle.module, order[0]
            reference = module if first == handle.agent_id else copy_holding(module, seen[first])
            data = handle.batches if matcher.requires_data else None
            if data is not None and matcher.runs_neighbours:
                self.ledger.record_forward(handle.agent_id, len(order) * num_samples(data))
            with handle.activate():
                new_state, found = merge_into_basis(
                    reference,
                    seen[order[0]],
                    [seen[j] for j in order[1:]],
                    row,
                    matcher,
                    data,
                    spec=self._spec,
                    forward_context=round.forward_context,
                )
            moved.extend(moved_fraction(permutations) for permutations in found)
            round.commit(
                {handle.agent_id: new_state},
                recompute_batchnorm=self.recompute_batchnorm,
                optimizer_state=self.optimizer_state,
                untouched=[g for g in round.agent_ids if g != handle.agent_id],
            )
            del new_state
        self.absent_agents = sorted(absent)
        for handle in round:
            if handle.agent_id in bad and handle.optimizer is not None:
                handle.optimizer.state.clear()  # its moments hold the NaNs that its weights no longer do
        self.nonfinite_agents = [g for g in bad if g in round.handles]
        self.round += 1
        self.merged_epochs.append(trainer.current_epoch)
        self.last_bytes_between_processes = round.bytes_between_processes
        metrics = self._metrics(round, strategy, time.perf_counter() - started, moved, basis_bytes)
        self._log(pl_module, metrics)
        restored = int(metrics["merge/nonfinite_agents"])
        rank_zero_info(
            f"DIMAT merge {self.round} after epoch {trainer.current_epoch}: {metrics['merge/time_s']:.1f} s, "
            f"consensus distance {metrics['merge/consensus_distance_before']:.3g} → "
            f"{metrics['merge/consensus_distance_after']:.3g}, "
            f"{metrics['merge/permuted_fraction']:.0%} of units permuted"
            + (f", {restored} non-finite agent(s) restored" if restored else "")
        )

    def _matcher_this_round(self) -> Matcher:
        """The round's matcher: plain averaging on the rounds ``rematch_every`` leaves out (shared basis)."""
        if self.basis != "shared" or not self.matcher.uses_spec or not self.basis_built:
            return self.matcher
        if self.rematch_every is not None and self.round % self.rematch_every == 0:
            return self.matcher
        return AVERAGE

    def _deadline(self) -> Deadline | None:
        """This fit's deadline for a round's exchange (``None``: strict, or one process)."""
        if self.deadline is None or self._namespace is None:
            return None
        return Deadline(self.deadline, self._namespace)

    def _absent_this_round(self, strategy: DIMATStrategy) -> set[int]:
        """The agents that sit this round out: each independently with probability 1 − participation,
        drawn from (seed, round) so that every process draws the same."""
        if self.participation >= 1.0:
            return set()
        draws = np.random.default_rng([strategy.seed, PARTICIPATION_STREAM, self.round]).random(
            strategy.num_agents
        )
        return {int(g) for g in np.flatnonzero(draws >= self.participation)}

    def _check_finite(self, states: Mapping[int, Mapping[str, Tensor]], trainer: Trainer) -> list[int]:
        strategy = self._dimat(trainer)
        assert strategy.swarm is not None
        where = self._where(trainer)
        # (with a deadline a round runs no collective: each process raises for what it holds or receives)
        everywhere = strategy.nonfinite_everywhere if self._deadline() is None else None
        return check_states(
            states, strategy.swarm.agent_ids, self.on_nonfinite, where, "MergeCallback", everywhere
        )

    @staticmethod
    def _where(trainer: Trainer) -> str:
        return f"merge after epoch {trainer.current_epoch}, step {trainer.global_step}"

    def enter_shared_basis(self, trainer: Trainer) -> tuple[float, float]:
        """Brings every agent into agent ``root``'s basis, with its optimizer state (see the class doc).

        Returns the bytes the local agents received (each its tree parent's state) and the bytes this process
        sent to others, which the round's merge metrics add to its own.

        Agents whose weights are not finite cannot be aligned: with ``on_nonfinite="restore"`` the tree
        goes around them (they keep their state and the round's merge rebuilds them from their finite
        neighbours, in the shared basis); with ``"raise"`` this raises
        :class:`~lightning_dimat.merge.NonFiniteAgentError`.
        """
        strategy = self._dimat(trainer)
        parents = self._basis_tree(trainer, self._nonfinite_everywhere(trainer))
        round = strategy.begin_round(
            num_batches=self.num_batches if self.matcher.requires_data else None,
            index=self.round,
            ledger=self.ledger,
            topology=_tree_topology(parents, strategy.num_agents),
        )
        # Only parents send: each agent below the root aligns itself to its parent's state.
        children = {g: sum(parent == g for parent in parents.values()) for g in round.agent_ids}
        uses = {g: [] if parents.get(g) is None else [parents[g]] for g in round.agent_ids}
        states = round.gather(compression=self.compression, receivers=children, uses=uses)
        aligner = _without_identity_bias(self.matcher)
        pairwise: dict[int, dict[str, Tensor]] = {}
        for handle in round:
            parent = parents.get(handle.agent_id)
            if parent is None:  # the root, or an agent the tree goes around
                continue
            reference = copy_holding(handle.module, states[parent])
            data = handle.batches if aligner.requires_data else None
            if data is not None and aligner.runs_neighbours:  # its parent's model and its own, on its data
                self.ledger.record_forward(handle.agent_id, 2 * num_samples(data))
            with handle.activate():
                (found,) = aligner.match(
                    reference,
                    [states.own[handle.agent_id]],
                    data,
                    spec=self._spec,
                    forward_context=round.forward_context,
                )
            pairwise[handle.agent_id] = {group: p.cpu() for group, p in found.items()}
        paths = basis_permutations(parents, gather_by_agent(strategy.all_gather_object, pairwise))
        local = {handle.agent_id: paths.get(handle.agent_id, {}) for handle in round}
        spec = self._spec
        assert spec is not None
        round.commit(
            {
                g: permute_state(round.snapshot[g], spec, p) if p else round.snapshot[g]
                for g, p in local.items()
            },
            recompute_batchnorm=False,
            permutations=local,
            spec=spec,
        )
        self.basis_built = True
        aligned = [moved_fraction(paths[g]) for g, parent in parents.items() if parent is not None]
        root = next(iter(parents))
        rank_zero_info(
            f"DIMAT shared basis: {len(aligned)} agents aligned into agent {root}'s basis along a spanning "
            f"tree, {sum(aligned) / max(len(aligned), 1):.0%} of their units moved"
        )
        return float(sum(round.bytes_received.values())), float(round.bytes_between_processes)

    def _nonfinite_everywhere(self, trainer: Trainer) -> list[int]:
        """The agents of every process whose weights are not finite (the same list in every process)."""
        strategy = self._dimat(trainer)
        assert strategy.swarm is not None
        return strategy.nonfinite_everywhere(
            nonfinite_agents({g: agent.state_dict() for g, agent in strategy.swarm.items()})
        )

    def _basis_tree(self, trainer: Trainer, nonfinite: list[int]) -> dict[int, int | None]:
        """The spanning tree the shared basis is built along, around the ``nonfinite`` agents."""
        strategy = self._dimat(trainer)
        root = check_index("root", self.root, strategy.num_agents)
        if nonfinite and self.on_nonfinite == "raise":
            raise NonFiniteAgentError(
                nonfinite_message(nonfinite, self._where(trainer))
                + ", before the shared basis was built: they cannot be aligned. "
                "MergeCallback(on_nonfinite='restore') would build the basis around them and rebuild them "
                "from their neighbours; or lower the learning rate, or clip gradients."
            )
        if root in nonfinite:
            finite = [g for g in strategy.topology.spanning_tree(root) if g not in nonfinite]
            if not finite:
                where = self._where(trainer)
                raise NonFiniteAgentError(nonfinite_message(nonfinite, where) + ": every agent.")
            rank_zero_warn(
                f"The shared basis' root, agent {root}, holds NaN or infinite weights at the "
                f"{self._where(trainer)}: the basis is agent {finite[0]}'s (the nearest finite agent) "
                "instead."
            )
            root = finite[0]
        parents = strategy.topology.spanning_tree(root, exclude=nonfinite)
        cut_off = sorted(set(range(strategy.num_agents)) - set(parents) - set(nonfinite))
        if cut_off:
            raise NonFiniteAgentError(
                nonfinite_message(nonfinite, self._where(trainer))
                + f", and they cut agents {cut_off} off from the root {root}: the shared basis cannot be "
                "built. Lower the learning rate, or start merging earlier (start_epoch)."
            )
        return parents

    def _metrics(
        self,
        round: MergeRound,
        strategy: DIMATStrategy,
        seconds: float,
        moved: list[float],
        basis_bytes: tuple[float, float] = (0.0, 0.0),
    ) -> dict[str, float]:
        names = [name for name, _ in next(iter(round)).module.named_parameters()]
        live = {handle.agent_id: handle.module.state_dict() for handle in round}  # (views, no copies)
        collective = self._deadline() is None  # a round with a deadline runs no collective
        before, after, count = consensus_distances(round.snapshot, live, names, strategy, collective)
        local = {
            "bytes": float(sum(round.bytes_received.values())) + basis_bytes[0],
            "bytes_between_processes": float(round.bytes_between_processes) + basis_bytes[1],
            "before": before,
            "after": after,
            "count": count,
            "moved": float(sum(moved)),
            "pairs": float(len(moved)),
            "nonfinite": float(len(self.nonfinite_agents)),
            "missing": float(self.missing_neighbours),
        }
        summed, ledger_state = (
            summed_over_processes(local, self.ledger, strategy)
            if collective
            else (local, self.ledger.state_dict())
        )
        return {
            "merge/round": float(self.round),
            "merge/time_s": seconds,
            "merge/bytes": summed["bytes"],
            "merge/bytes_between_processes": summed["bytes_between_processes"],
            "merge/spectral_gap": round.topology.spectral_gap,
            "merge/consensus_distance_before": summed["before"] / summed["count"],
            "merge/consensus_distance_after": summed["after"] / summed["count"],
            "merge/permuted_fraction": summed["moved"] / max(summed["pairs"], 1.0),
            "merge/nonfinite_agents": summed["nonfinite"],
            "merge/absent_agents": float(len(self.absent_agents)),
            "merge/missing_neighbours": summed["missing"],
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
            "basis_built": self.basis_built,
            "run": self._run_record(),
        }

    def _run_record(self) -> dict[str, Any]:
        """What a resumed run must keep (unless ``resume_changes`` names it)."""
        return {
            "method": repr(self.matcher),
            "basis": self.basis,
            "compression": self.compression,
            "participation": self.participation,
            "rematch_every": self.rematch_every,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; refuses a checkpoint of another method or basis unless the
        strategy's ``resume_changes`` names it."""
        saved = {**SETTINGS_BEFORE_THEY_WERE_RECORDED, **state_dict.get("run", {})}
        method = _method_as_recorded_today(saved.get("method"), self.matcher)
        if method is not None:
            saved["method"] = method
        allowed = self._strategy.resume_changes if self._strategy is not None else ()
        current = self._run_record()
        if self.basis == saved["basis"] == "own":  # in their own bases agents re-match every round anyway
            current.pop("rematch_every")
        refuse_differences(differences(saved, current, allowed), "The checkpoint's MergeCallback state")
        self.round = int(state_dict["round"])
        self.merged_epochs = list(state_dict["merged_epochs"])
        self.ledger.load_state_dict(state_dict.get("ledger", {}))
        self.basis_built = bool(state_dict.get("basis_built", False))


def _method_as_recorded_today(record: str | None, current: Matcher) -> str | None:
    """A checkpoint's matcher record in today's format. Before ``ActivationMatcher`` had a ``probes`` option
    it observed ``"pre_activation"``: an older record without the field names that placement. A checkpoint
    older than the record itself (version 0.1) is taken to have run the current matcher with that placement,
    so that resuming it with another placement is refused instead of going on silently."""
    if record is None:
        fields = (
            {field.name for field in dataclasses.fields(current)}
            if dataclasses.is_dataclass(current)
            else set()
        )
        return repr(dataclasses.replace(current, probes="pre_activation")) if "probes" in fields else None
    if record.startswith("ActivationMatcher(") and "probes=" not in record:
        separator = "" if record.endswith("()") else ", "
        return f"{record[:-1]}{separator}probes='pre_activation')"
    return record


def _tree_topology(parents: Mapping[int, int | None], num_agents: int) -> Topology:
    """The links of a spanning tree (a parent map) as a topology on all ``num_agents`` agents: an agent the
    tree goes around has no link."""
    adjacency = np.zeros((num_agents, num_agents))
    for child, parent in parents.items():
        if parent is not None:
            adjacency[child, parent] = adjacency[parent, child] = 1.0
    return Topology(MIXING_RULES.get("metropolis_hastings")(adjacency), connected=False)


def _without_identity_bias(matcher: Matcher) -> Matcher:
    """``matcher`` with ``identity_bias=0``: entering the shared basis is a plain alignment."""
    if dataclasses.is_dataclass(matcher) and any(
        f.name == "identity_bias" for f in dataclasses.fields(matcher)
    ):
        return dataclasses.replace(matcher, identity_bias=0.0)
    return matcher
