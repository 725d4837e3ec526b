"""Metrics of merges and gossip: communication counts and consensus distance, over all processes.

One merge's metrics cost two collectives with several processes (none in one): an all-reduce of the
parameter sums before and after the merge (the consensus x̄ must be known before distances to it), then one
gather of every scalar and of the ledger's per-agent counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_dimat.comm.gather import gather_fields_by_agent
from lightning_dimat.comm.ledger import CommunicationLedger
from lightning_dimat.merge.state import distance_sum, parameter_sum

if TYPE_CHECKING:
    from lightning_dimat.strategy import DIMATStrategy

States = Mapping[int, Mapping[str, Tensor]]


def gathered_ledger(ledger: CommunicationLedger, strategy: DIMATStrategy | None) -> dict[str, dict[int, int]]:
    """The ledger's per-agent counts with every process's agents (one gather; none before ``setup``)."""
    if strategy is None:
        return ledger.state_dict()
    return gather_fields_by_agent(strategy.all_gather_object, ledger.state_dict())


def communication_metrics(
    ledger: CommunicationLedger, strategy: DIMATStrategy, state: Mapping[str, Mapping[int, int]] | None = None
) -> dict[str, float]:
    """The ledger's totals over all agents (``comm/*``) and every agent's own counts (``comm/agent_<g>/*``).

    ``state`` is the already gathered ledger state (default: gathered now, one collective).
    """
    state = gathered_ledger(ledger, strategy) if state is None else state
    return {**ledger.totals(state), **ledger.per_agent(state)}


def consensus_distances(
    before: States, after: States, names: Sequence[str], strategy: DIMATStrategy, collective: bool = True
) -> tuple[float, float, float]:
    """This process's Σ_i ‖x_i − x̄‖ before and after a merge (x̄ over all agents), and its agent count.

    Sum the three over processes and divide to get the mean distance over agents. With
    ``collective=False`` x̄ is the mean of this process's agents only (no collective).
    """
    count = float(len(before))
    sums = torch.cat([parameter_sum(before.values(), names), parameter_sum(after.values(), names)])
    sums = torch.cat([sums, sums.new_tensor([count])])
    if strategy.world_size > 1 and collective:
        sums = strategy.reduce(sums, reduce_op="sum")
    total = float(sums[-1])
    mean_before, mean_after = (sums[:-1] / total).chunk(2)
    return (
        distance_sum(before.values(), names, mean_before),
        distance_sum(after.values(), names, mean_after),
        count,
    )


def summed_over_processes(
    values: Mapping[str, float], ledger: CommunicationLedger, strategy: DIMATStrategy
) -> tuple[dict[str, float], dict[str, dict[int, int]]]:
    """``values`` summed over processes and the gathered ledger state, in one collective."""
    local: dict[str, Any] = {"values": dict(values), "ledger": ledger.state_dict()}
    parts = strategy.all_gather_object(local)
    summed = {name: float(sum(part["values"][name] for part in parts)) for name in values}
    state = gather_fields_by_agent(lambda _: [part["ledger"] for part in parts], {})
    return summed, state
