"""``MergeRound``: one synchronous exchange of agent states, owned by the strategy.

A round snapshots the local agents, draws each agent's own batches once (the same batches serve matching
and BatchNorm re-estimation), brings every state a local agent needs — its own and its neighbours', held
in this process or another — through one path (:meth:`MergeRound.gather`), and writes the new states back
(:meth:`MergeRound.commit`: in place, BatchNorm re-estimated, optimizer state kept, reset or permuted, bytes
counted). The merge callback, the gossip baselines and the consensus export all run through it, so a
per-round topology, a codec or a dropout rule plugs in here once.

A round of plain averaging, inside a callback hook (``strategy = trainer.strategy``)::

    round = strategy.begin_round(num_batches=4)
    states = round.gather(compression="int8")
    merged = {}
    for h in round:
        seen = states.seen_by(h.agent_id)  # its own state exact, its neighbours' as received
        merged[h.agent_id] = weighted_state([seen[j] for j in h.order], h.mixing_row)
    round.commit(merged)

With a lossy ``compression`` (:mod:`lightning_dimat.comm.compression`) ``states[j]`` is agent j's state as
its neighbours receive it — decoded from its encoded payload whether j lives in this process or another, so
results do not depend on the process layout — while an agent's own state is never compressed:
``states.seen_by(i)`` is every state agent i uses, its own exact.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning.pytorch import LightningModule
from torch import Tensor
from torch.optim import Optimizer

from lightning_dimat.comm.compression import Codec, resolve_compression
from lightning_dimat.comm.deadline import Deadline
from lightning_dimat.comm.ledger import CommunicationLedger, receivers_of
from lightning_dimat.merge.batchnorm import recompute_batchnorm
from lightning_dimat.merge.inputs import num_samples
from lightning_dimat.merge.state import StateDict, detached_state, load_state_in_place
from lightning_dimat.permutation.apply import permute_optimizer_state
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.topology import Topology

Transport = Callable[
    [Mapping[int, Mapping[str, Tensor]], Topology, int, "Deadline | None"], tuple[dict[int, StateDict], int]
]
"""``(local payloads, topology, round index, deadline) -> (payloads of remote neighbours, bytes sent)``."""
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


class GatheredStates(dict[int, StateDict]):
    """What :meth:`MergeRound.gather` returns: ``{agent id: its state as its neighbours receive it}``.

    With compression ``"none"`` that is the state itself. With a lossy one it is the decoded payload, for
    local agents as for remote ones; the local agents' own exact states are kept in :attr:`own`.

    Attributes:
        own: ``{local agent id: its exact state}`` (what it sent, before encoding).
        missing: neighbours of local agents whose state did not arrive before the round's deadline
            (always empty without one): their mixing weights are to be renormalised away.

    Examples:
        >>> import torch
        >>> received = {0: {"w": torch.tensor(0.0)}, 1: {"w": torch.tensor(1.0)}}  # 0's as sent, decoded
        >>> states = GatheredStates(received, own={0: {"w": torch.tensor(0.004)}})
        >>> {j: round(float(state["w"]), 3) for j, state in states.seen_by(0).items()}
        {0: 0.004, 1: 1.0}
    """

    def __init__(
        self, received: Mapping[int, StateDict], own: Mapping[int, StateDict], missing: Collection[int] = ()
    ) -> None:
        super().__init__(received)
        self.own: dict[int, StateDict] = dict(own)
        self.missing: list[int] = sorted(missing)

    def seen_by(self, agent_id: int) -> dict[int, StateDict]:
        """Every state local agent ``agent_id`` uses: its own exact, the others as received."""
        return {**self, agent_id: self.own[agent_id]}


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
        compression: str | Codec = "none",
        exact: Collection[str] = (),
        deadline: Deadline | None = None,
        uses: Mapping[int, Collection[int]] | None = None,
    ) -> GatheredStates:
        """Every state the local agents need this round, keyed by agent id: their own and their neighbours'.

        Local and remote neighbours come through the same path; only the states of neighbours held by other
        processes cross the wire. Each state is encoded with ``compression`` once, the payloads are what
        crosses the wire and what the ledger counts, and every neighbour state is the decoded payload —
        whether the neighbour is in this process or not. An agent's own state stays exact
        (:meth:`GatheredStates.seen_by`).

        Args:
            payloads: what each local agent sends (default: the snapshot of its state).
            receivers: how many agents each local agent sends to, for the ledger (default: its degree in
                this round's topology).
            compression: a codec or its name in :data:`~lightning_dimat.comm.compression.COMPRESSIONS`
                (``"none"``, ``"bf16"``, ``"fp16"``, ``"int8"``).
            exact: entries of the payloads sent as they are whatever the compression (SGP's push-sum weight).
            deadline: wait this long for states from other processes and go on without the late ones
                (:attr:`GatheredStates.missing`); ``None`` waits for all and fails past the timeout.
            uses: for each local agent, the agents whose states it uses this round, for
                :attr:`bytes_received` (default: its neighbours; an agent that sits the round out uses none).
        """
        payloads = self.snapshot if payloads is None else payloads
        codec = resolve_compression(compression)
        encoded = {agent_id: codec.encode(state, exact) for agent_id, state in payloads.items()}
        remote, sent = self.transport(encoded, self.topology, self.index, deadline)
        self.bytes_between_processes += sent
        arrived = {**encoded, **remote}
        wanted = {j for handle in self for j in handle.neighbours}
        states = GatheredStates(
            {agent_id: codec.decode(payload) for agent_id, payload in arrived.items()},
            own={agent_id: dict(state) for agent_id, state in payloads.items()},
            missing=wanted - set(arrived),
        )
        for handle in self:
            used = handle.neighbours if uses is None else uses.get(handle.agent_id, ())
            self.bytes_received[handle.agent_id] = sum(
                codec.payload_bytes(arrived[j]) for j in used if j in arrived
            )
        if self.ledger is not None:
            counts = receivers_of(self.topology, self.agent_ids) if receivers is None else receivers
            self.ledger.record_exchange(counts, codec.payload_bytes(encoded[self.agent_ids[0]]))
        return states

    def commit(
        self,
        states: Mapping[int, Mapping[str, Tensor]],
        *,
        recompute_batchnorm: bool = True,
        optimizer_state: OptimizerState = "keep",
        permutations: Mapping[int, Mapping[str, Tensor]] | None = None,
        spec: PermutationSpec | None = None,
        untouched: Collection[int] = (),
    ) -> None:
        """Writes each local agent's new state in place, then refreshes what depends on it.

        Args:
            states: ``{agent id: new state}`` for every local agent.
            recompute_batchnorm: re-estimate BatchNorm statistics on each agent's round batches.
            optimizer_state: ``"keep"`` (valid when an agent stays in its own basis) or ``"reset"``.
            permutations: agents whose basis moved this round (``{agent id: permutations}``): their optimizer
                state (momentum, Adam moments) is permuted with them, so their next step is unchanged.
            spec: the spec ``permutations`` refer to.
            untouched: agents that sat the round out: weights, BatchNorm statistics and optimizer state
                stay exactly as they were (they need no entry in ``states``).
        """
        missing = sorted(set(self.handles) - set(states) - set(untouched))
        if missing:
            raise ValueError(f"commit() needs a new state for every local agent; missing agents {missing}.")
        for handle in self:
            if handle.agent_id in untouched:
                continue
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
