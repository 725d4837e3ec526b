"""``MergeRound``: one synchronous exchange of agent states, owned by the strategy.

A round snapshots the local agents, draws each agent's own batches once (the same batches serve matching
and BatchNorm re-estimation), brings every state a local agent needs — its own and its neighbours', held
in this process or another — through one path (:meth:`MergeRound.gather`), and writes the new states back
(:meth:`MergeRound.commit`: in place, BatchNorm re-estimated, optimizer state kept, reset or permuted, bytes
counted). The merge callback, the gossip baselines and the consensus export all run through it, so a
per-round topology, a codec or a dropout rule plugs in here once.

A round of plain averaging, inside a callback hook (``strategy = trainer.strategy``)::

    round = strategy.begin_round(num_batches=4)
    states = round.gather()
    round.commit({h.agent_id: weighted_state([states[j] for j in h.order], h.mixing_row) for h in round})
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning.pytorch import LightningModule
from torch import Tensor
from torch.optim import Optimizer

from lightning_dimat.comm.ledger import CommunicationLedger, receivers_of
from lightning_dimat.merge.batchnorm import recompute_batchnorm
from lightning_dimat.merge.inputs import num_samples
from lightning_dimat.merge.state import StateDict, detached_state, load_state_in_place, state_bytes
from lightning_dimat.permutation.apply import permute_optimizer_state
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.topology import Topology

Transport = Callable[[Mapping[int, Mapping[str, Tensor]], Topology], tuple[dict[int, StateDict], int]]
OptimizerState = Literal["keep", "reset"]


@dataclass
class AgentHandle:
    """What a round gives one local agent: its module, optimizer, batches, random stream and mixing row.

    Attributes:
        agent_id: the agent's global id.
        module: the agent (the user's LightningModule copy).
        optimizer: its optimizer (``None`` outside ``fit``).
        batches: its own batches for this round, on the device (empty when none were asked for).
        weights: π_ij of this round's topology over j (itself included).
        activate: a context manager factory that runs code in the agent's random stream.
    """

    agent_id: int
    module: LightningModule
    optimizer: Optimizer | None
    batches: list[Any]
    weights: dict[int, float]
    activate: Callable[[], AbstractContextManager[Any]]

    @property
    def neighbours(self) -> list[int]:
        """Agents j ≠ i with π_ij > 0, in id order."""
        return sorted(j for j in self.weights if j != self.agent_id)

    @property
    def order(self) -> list[int]:
        """The agent itself, then its neighbours: the order of :attr:`mixing_row`."""
        return [self.agent_id, *self.neighbours]

    @property
    def mixing_row(self) -> list[float]:
        """π_ij in :attr:`order`."""
        return [self.weights[j] for j in self.order]


@dataclass
class MergeRound:
    """One round: local agents' handles, a snapshot of their states, and the neighbour exchange.

    Built by :meth:`~lightning_dimat.strategy.DIMATStrategy.begin_round`.

    Attributes:
        index: the round's number (0-based), for per-round topologies.
        topology: this round's graph.
        handles: ``{agent id: AgentHandle}`` for the agents in this process.
        snapshot: their states when the round began (detached copies).
        forward_context: Lightning's precision context for forward passes.
        ledger: where the round counts what it sends and computes (``None``: not counted).
        bytes_between_processes: bytes that crossed a process boundary from this process in this round.
    """

    index: int
    topology: Topology
    handles: dict[int, AgentHandle]
    snapshot: dict[int, StateDict]
    forward_context: Callable[[], AbstractContextManager[Any]]
    transport: Transport
    ledger: CommunicationLedger | None = None
    bytes_between_processes: int = 0
    bytes_received: dict[int, int] = field(default_factory=dict)

    @property
    def agent_ids(self) -> list[int]:
        """The local agents' ids, in order."""
        return sorted(self.handles)

    def __iter__(self) -> Iterator[AgentHandle]:
        return iter(self.handles[agent_id] for agent_id in self.agent_ids)

    def gather(
        self,
        payloads: Mapping[int, Mapping[str, Tensor]] | None = None,
        receivers: Mapping[int, int] | None = None,
    ) -> dict[int, StateDict]:
        """Every state the local agents need this round, keyed by agent id: their own and their neighbours'.

        Local and remote neighbours come through the same path; only the states of neighbours held by other
        processes cross the wire.

        Args:
            payloads: what each local agent sends (default: the snapshot of its state).
            receivers: how many agents each local agent sends to, for the ledger (default: its degree in
                this round's topology).
        """
        payloads = self.snapshot if payloads is None else payloads
        remote, sent = self.transport(payloads, self.topology)
        self.bytes_between_processes += sent
        states = {**{agent_id: dict(state) for agent_id, state in payloads.items()}, **remote}
        for handle in self:
            self.bytes_received[handle.agent_id] = sum(
                state_bytes(states[j]) for j in handle.neighbours if j in states
            )
        if self.ledger is not None:
            counts = receivers_of(self.topology, self.agent_ids) if receivers is None else receivers
            self.ledger.record_exchange(counts, state_bytes(payloads[self.agent_ids[0]]))
        return states

    def commit(
        self,
        states: Mapping[int, Mapping[str, Tensor]],
        *,
        recompute_batchnorm: bool = True,
        optimizer_state: OptimizerState = "keep",
        permutations: Mapping[int, Mapping[str, Tensor]] | None = None,
        spec: PermutationSpec | None = None,
    ) -> None:
        """Writes each local agent's new state in place, then refreshes what depends on it.

        Args:
            states: ``{agent id: new state}`` for every local agent.
            recompute_batchnorm: re-estimate BatchNorm statistics on each agent's round batches.
            optimizer_state: ``"keep"`` (valid when an agent stays in its own basis) or ``"reset"``.
            permutations: agents whose basis moved this round (``{agent id: permutations}``): their optimizer
                state (momentum, Adam moments) is permuted with them, so their next step is unchanged.
            spec: the spec ``permutations`` refer to.
        """
        missing = sorted(set(self.handles) - set(states))
        if missing:
            raise ValueError(f"commit() needs a new state for every local agent; missing agents {missing}.")
        for handle in self:
            load_state_in_place(handle.module, states[handle.agent_id])
            if recompute_batchnorm and handle.batches:
                with handle.activate():
                    used = _recompute(handle, self.forward_context)
                if self.ledger is not None and used:
                    self.ledger.record_forward(handle.agent_id, num_samples(handle.batches))
            if handle.optimizer is None:
                continue
            if optimizer_state == "reset":
                handle.optimizer.state.clear()
            elif permutations and permutations.get(handle.agent_id):
                if spec is None:
                    raise ValueError("commit(permutations=...) needs the spec the permutations refer to.")
                permute_optimizer_state(handle.optimizer, handle.module, spec, permutations[handle.agent_id])

    def local_states(self) -> dict[int, StateDict]:
        """The local agents' current states (detached copies)."""
        return {handle.agent_id: detached_state(handle.module.state_dict()) for handle in self}


def _recompute(handle: AgentHandle, forward_context: Callable[[], AbstractContextManager[Any]]) -> int:
    return recompute_batchnorm(handle.module, handle.batches, forward_context=forward_context)
