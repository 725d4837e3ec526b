"""Exchanging agent states with a deadline: a process goes on with the neighbour states that came in time.

The strict exchange (:mod:`~lightning_dimat.comm.transport`) waits for every peer and fails past the timeout.
With a deadline, each process publishes the states its peers need in the process group's key-value store
(one entry per agent and round) and reads the entries it needs until the deadline passes. A state that has
not arrived by then is *missing* for this round and is not used, even if it arrives a moment later; the
merge renormalises its mixing weights over the states at hand. A process that lags publishes late and reads
what the others published in time, so it rejoins without special handling. No step of the exchange is a
collective, so a late — or dead — peer cannot hold the others past the deadline.

Entries are named ``<namespace>/<round>/<agent>``. The namespace is agreed once per fit
(:func:`new_namespace`), so that a second fit in the same processes never reads an earlier fit's states; each
process deletes its own entries two rounds later. Each entry carries a checksum of the state's layout (keys,
shapes, dtypes): processes holding different architectures fail with a clear error, not by merging garbage.

Examples:
    >>> import torch, torch.distributed as dist
    >>> from lightning_dimat.comm.transport import ExchangePlan
    >>> store = dist.HashStore()  # in a run: the process group's store
    >>> mine = ExchangePlan(rank=0, world_size=2, sends={1: [0]}, receives={1: [1]}, dense=False)
    >>> theirs = ExchangePlan(rank=1, world_size=2, sends={0: [1]}, receives={0: [0]}, dense=False)
    >>> _ = exchange_with_deadline({1: {"w": torch.ones(2)}}, theirs, store, "run", 0, 1.0)
    >>> remote, sent = exchange_with_deadline({0: {"w": torch.zeros(2)}}, mine, store, "run", 0, 1.0)
    >>> remote[1]["w"]
    tensor([1., 1.])
    >>> exchange_with_deadline({0: {"w": torch.zeros(2)}}, mine, store, "run", 1, 0.01)[0]  # nobody answered
    {}
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dimat.comm.transport import ExchangeError, ExchangePlan, StateDict, layout_checksum

KEPT_ROUNDS = 2
"""A process deletes its own entries of round r − 2 when it publishes round r."""


@dataclass(frozen=True)
class Deadline:
    """How long a round waits for neighbour states (``seconds``), and the ``namespace`` of its entries."""

    seconds: float
    namespace: str


def new_namespace() -> str:
    """A fresh name for one fit's entries (rank 0's; every process must use the same one)."""
    return uuid.uuid4().hex[:12]


def default_store() -> dist.Store:
    """The key-value store of the default process group (TCPStore under ``env://``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "A merge deadline exchanges states through the process group's store, but no process group is "
            "initialised. Use it on several processes (Trainer(devices=2, ...)), or leave deadline=None."
        )
    return dist.distributed_c10d._get_default_store()


def entry_name(namespace: str, round_index: int, agent_id: int) -> str:
    """The store key of agent ``agent_id``'s state in round ``round_index``."""
    return f"dimat/{namespace}/{round_index}/{agent_id}"


def exchange_with_deadline(
    states: Mapping[int, Mapping[str, Tensor]],
    plan: ExchangePlan,
    store: dist.Store,
    namespace: str,
    round_index: int,
    deadline: float,
) -> tuple[dict[int, StateDict], int]:
    """Publishes the local states peers need and reads the neighbour states that arrive within ``deadline``.

    Args:
        states: ``{global agent id: state}`` of the local agents (on the CPU or a GPU; sent from the CPU).
        plan: from :func:`~lightning_dimat.comm.transport.plan_exchange`.
        store: where states are published, e.g. :func:`default_store`.
        namespace: this fit's entries' prefix (:func:`new_namespace`, the same in every process).
        round_index: the round's number (entries of other rounds are never read).
        deadline: seconds to wait for the neighbours' states, from when this process has published its own.

    Returns:
        ``({neighbour agent id: state}, bytes this process sent)``: the states that arrived in time (on the
        CPU), and the bytes of the entries it published times the processes that read them. A neighbour
        missing from the dict did not answer in time.

    Raises:
        ExchangeError: a peer holds a different architecture, or the store itself failed.
    """
    checksum = layout_checksum(next(iter(states.values())))
    published = sorted({agent_id for agent_ids in plan.sends.values() for agent_id in agent_ids})
    sizes = {}
    for agent_id in published:
        entry = _serialise(states[agent_id], checksum)
        store.set(entry_name(namespace, round_index, agent_id), entry)
        sizes[agent_id] = len(entry)
    if round_index >= KEPT_ROUNDS:
        for agent_id in states:
            store.delete_key(entry_name(namespace, round_index - KEPT_ROUNDS, agent_id))
    sent = sum(sizes[agent_id] for agent_ids in plan.sends.values() for agent_id in agent_ids)
    ends = time.monotonic() + deadline
    received: dict[int, StateDict] = {}
    for peer, agent_ids in sorted(plan.receives.items()):
        for agent_id in agent_ids:
            key = entry_name(namespace, round_index, agent_id)
            if not _arrives(store, key, ends - time.monotonic()):
                continue
            received[agent_id] = _deserialise(store.get(key), checksum, plan.rank, peer)
    return received, sent


def _arrives(store: dist.Store, key: str, seconds: float) -> bool:
    """Whether ``key`` is in the store within ``seconds`` (checked at once when under a millisecond is
    left: stores count a wait in whole milliseconds, and read 0 as "no timeout")."""
    if seconds < 1e-3:
        return store.check([key])
    try:
        store.wait([key], timedelta(seconds=seconds))
    except dist.DistStoreError as error:
        if "timeout" not in str(error).lower():
            raise ExchangeError(f"The merge exchange's store failed waiting for {key!r}: {error}") from error
        return False
    return True


def _serialise(state: Mapping[str, Tensor], checksum: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"layout": checksum, "state": {k: v.detach().cpu() for k, v in state.items()}}, buffer)
    return buffer.getvalue()


def _deserialise(entry: bytes, checksum: int, rank: int, peer: int) -> StateDict:
    content = torch.load(io.BytesIO(entry), weights_only=True)
    if content["layout"] != checksum:
        raise ExchangeError(
            f"Rank {rank} and rank {peer} hold agents of different architectures (state layout checksum "
            f"{checksum} vs {content['layout']}); every process must build the same model."
        )
    return content["state"]
