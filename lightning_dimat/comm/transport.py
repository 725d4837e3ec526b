"""Moving agent states between processes for a merge, over ``torch.distributed`` (gloo on CPU, nccl on GPU).

Before a merge each process receives exactly the states of its agents' neighbours that live in other
processes — nothing else. The :class:`ExchangePlan` is computed from the topology and the placement alone,
so every process knows what it sends and receives without asking. States are flattened into one buffer
per peer and dtype; a small header is exchanged first so that mismatched architectures fail with a clear
error instead of garbage. Sparse topologies use point-to-point ``batch_isend_irecv``; when every process
needs every other process's agents (fully connected) and all hold as many agents, one ``all_gather``
per dtype moves them. In one process there is nothing to exchange.

Examples:
    >>> from lightning_dimat.topology import build_topology
    >>> plan = plan_exchange(build_topology("ring", 8), world_size=2, rank=0)
    >>> plan.receives, plan.sends
    ({1: [4, 7]}, {1: [0, 3]})
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dimat.comm.placement import agents_on_rank
from lightning_dimat.topology import Topology

StateDict = dict[str, Tensor]


class ExchangeError(RuntimeError):
    """A peer process died, hung past the timeout, or holds a different architecture."""


@dataclass(frozen=True)
class ExchangePlan:
    """What this process sends to and receives from each peer: ``{peer rank: [global agent ids]}``."""

    rank: int
    world_size: int
    sends: dict[int, list[int]]
    receives: dict[int, list[int]]
    dense: bool

    @property
    def peers(self) -> list[int]:
        return sorted(set(self.sends) | set(self.receives))


def plan_exchange(topology: Topology, world_size: int, rank: int) -> ExchangePlan:
    """The neighbour-only exchange of process ``rank``, ``topology`` spread over ``world_size`` processes."""
    n = topology.num_agents
    mine = set(agents_on_rank(n, world_size, rank))
    sends: dict[int, list[int]] = {}
    receives: dict[int, list[int]] = {}
    dense = len({len(agents_on_rank(n, world_size, r)) for r in range(world_size)}) == 1
    for peer in range(world_size):
        if peer == rank:
            continue
        theirs = set(agents_on_rank(n, world_size, peer))
        wanted = sorted({j for i in mine for j in topology.neighbors(i) if j in theirs})
        given = sorted({j for i in theirs for j in topology.neighbors(i) if j in mine})
        if wanted:
            receives[peer] = wanted
        if given:
            sends[peer] = given
        dense = dense and wanted == sorted(theirs) and given == sorted(mine)
    return ExchangePlan(rank, world_size, sends, receives, dense and world_size > 1)


def _layout(state: Mapping[str, Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(key, tuple(value.shape), value.dtype) for key, value in state.items()]


def _dtypes(layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> list[torch.dtype]:
    return sorted({dtype for _, _, dtype in layout}, key=str)


def _checksum(layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    return zlib.crc32(repr(layout).encode())


def layout_checksum(state: Mapping[str, Tensor]) -> int:
    """A checksum of ``state``'s keys, shapes and dtypes: equal for agents of one architecture."""
    return _checksum(_layout(state))


def _flatten(states: Sequence[Mapping[str, Tensor]], dtype: torch.dtype, device: torch.device) -> Tensor:
    pieces = [
        value.detach().reshape(-1) for state in states for value in state.values() if value.dtype == dtype
    ]
    if not pieces:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat(pieces).to(device)


def _unflatten(
    buffers: Mapping[torch.dtype, Tensor],
    agent_ids: Sequence[int],
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
) -> dict[int, StateDict]:
    offsets = dict.fromkeys(buffers, 0)
    states: dict[int, StateDict] = {}
    for agent_id in agent_ids:
        state: StateDict = {}
        for key, shape, dtype in layout:
            size = int(torch.Size(shape).numel())
            state[key] = buffers[dtype][offsets[dtype] : offsets[dtype] + size].view(shape)
            offsets[dtype] += size
        states[agent_id] = state
    return states


def failure_cause(started: float, timeout: timedelta | None) -> str:
    """Why a collective that began at ``started`` (``time.monotonic()``) failed, with the actual wait."""
    waited = time.monotonic() - started
    limit = "no timeout" if timeout is None else f"the timeout is {timeout.total_seconds():g} s"
    return f"after {waited:.1f} s, another process died or did not answer ({limit}; a dead peer fails sooner)"


def _wait(works: Sequence[dist.Work], timeout: timedelta | None, plan: ExchangePlan, what: str) -> None:
    started = time.monotonic()
    for work in works:
        try:
            if timeout is None:
                work.wait()
            else:
                work.wait(timeout)
        except Exception as error:  # gloo/nccl raise RuntimeError subclasses with transport details
            raise ExchangeError(
                f"Rank {plan.rank}: the merge exchange ({what}) with ranks {plan.peers} failed "
                f"{failure_cause(started, timeout)}. Nothing since the last checkpoint is saved; resume "
                f"from it with ckpt_path=... ({type(error).__name__}: {error})"
            ) from error


def exchange_states(
    states: Mapping[int, Mapping[str, Tensor]],
    plan: ExchangePlan,
    device: torch.device,
    timeout: timedelta | None = None,
) -> tuple[dict[int, StateDict], int]:
    """Sends this process's states that peers need and receives the neighbour states it needs.

    Args:
        states: ``{global agent id: state_dict}`` of the local agents (same architecture everywhere).
        plan: from :func:`plan_exchange`.
        device: where buffers live (CPU for gloo, the GPU for nccl).
        timeout: how long to wait for a peer before failing.

    Returns:
        ``({neighbour agent id: state_dict}, bytes this process sent)``.
    """
    if plan.world_size == 1 or not plan.peers:
        return {}, 0
    layout = _layout(next(iter(states.values())))
    dtypes = _dtypes(layout)
    _check_headers(plan, layout, dtypes, device, timeout)
    if plan.dense:
        return _all_gather(states, plan, layout, dtypes, device, timeout)
    operations, received, sent = [], {}, 0
    for peer, agent_ids in plan.sends.items():
        for dtype in dtypes:
            buffer = _flatten([states[a] for a in agent_ids], dtype, device)
            operations.append(dist.P2POp(dist.isend, buffer, peer))
            sent += buffer.numel() * buffer.element_size()
    for peer, agent_ids in plan.receives.items():
        sizes = _sizes(layout, dtypes, len(agent_ids))
        received[peer] = {dtype: torch.empty(sizes[dtype], dtype=dtype, device=device) for dtype in dtypes}
        operations += [dist.P2POp(dist.irecv, received[peer][dtype], peer) for dtype in dtypes]
    _wait(dist.batch_isend_irecv(operations), timeout, plan, "point-to-point")
    remote: dict[int, StateDict] = {}
    for peer, buffers in received.items():
        remote.update(_unflatten(buffers, plan.receives[peer], layout))
    return remote, sent


def _sizes(
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]], dtypes: Sequence[torch.dtype], agents: int
) -> dict[torch.dtype, int]:
    per_agent = {
        dtype: sum(int(torch.Size(shape).numel()) for _, shape, d in layout if d == dtype) for dtype in dtypes
    }
    return {dtype: size * agents for dtype, size in per_agent.items()}


def _check_headers(
    plan: ExchangePlan,
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    dtypes: Sequence[torch.dtype],
    device: torch.device,
    timeout: timedelta | None,
) -> None:
    """Swaps (checksum of keys/shapes/dtypes, element count) with every peer and compares them."""
    mine = torch.tensor([_checksum(layout), sum(_sizes(layout, dtypes, 1).values())], device=device)
    operations, headers = [], {}
    for peer in plan.peers:
        headers[peer] = torch.empty_like(mine)
        operations += [dist.P2POp(dist.isend, mine, peer), dist.P2POp(dist.irecv, headers[peer], peer)]
    _wait(dist.batch_isend_irecv(operations), timeout, plan, "header")
    for peer, header in headers.items():
        if not torch.equal(header, mine):
            raise ExchangeError(
                f"Rank {plan.rank} and rank {peer} hold agents of different architectures (state layout "
                f"checksum/size {mine.tolist()} vs {header.tolist()}); every process must build the same "
                "model."
            )


def _all_gather(
    states: Mapping[int, Mapping[str, Tensor]],
    plan: ExchangePlan,
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    dtypes: Sequence[torch.dtype],
    device: torch.device,
    timeout: timedelta | None,
) -> tuple[dict[int, StateDict], int]:
    own = sorted(states)
    gathered: dict[int, dict[torch.dtype, Tensor]] = {peer: {} for peer in range(plan.world_size)}
    sent = 0
    for dtype in dtypes:
        buffer = _flatten([states[a] for a in own], dtype, device)
        outputs = [torch.empty_like(buffer) for _ in range(plan.world_size)]
        _wait([dist.all_gather(outputs, buffer, async_op=True)], timeout, plan, "all-gather")
        sent += buffer.numel() * buffer.element_size() * (plan.world_size - 1)
        for peer, output in enumerate(outputs):
            gathered[peer][dtype] = output
    remote: dict[int, StateDict] = {}
    for peer, agent_ids in plan.receives.items():
        remote.update(_unflatten(gathered[peer], agent_ids, layout))
    return remote, sent


def all_gather_states(
    states: Mapping[int, Mapping[str, Tensor]],
    world_size: int,
    device: torch.device,
    timeout: timedelta | None,
) -> tuple[dict[int, StateDict], int]:
    """The naive alternative — every agent's state to every process — for comparison in benchmarks
    (processes must hold equally many agents)."""
    rank = dist.get_rank()
    owners: list[list[int] | None] = [None] * world_size
    dist.all_gather_object(owners, sorted(states))
    receives = {peer: list(ids or []) for peer, ids in enumerate(owners) if peer != rank}
    plan = ExchangePlan(rank, world_size, {}, receives, dense=True)
    layout = _layout(next(iter(states.values())))
    return _all_gather(states, plan, layout, _dtypes(layout), device, timeout)
