"""Neighbour-only exchange between processes (comm/transport.py): the plan of what each process sends and
receives, computed without starting a process. Runs on two real processes:
tests/strategy/test_scaleout*.py."""

from __future__ import annotations

import pytest

from lightning_dimat.comm.transport import plan_exchange
from lightning_dimat.topology import build_topology


@pytest.mark.parametrize(("topology", "dense"), [("ring", False), ("fully_connected", True), ("star", False)])
def test_exchange_plans_are_symmetric_and_neighbour_only(topology: str, dense: bool) -> None:
    graph = build_topology(topology, 8)
    plans = [plan_exchange(graph, world_size=2, rank=rank) for rank in range(2)]
    assert plans[0].sends.get(1, []) == plans[1].receives.get(0, [])
    assert plans[1].sends.get(0, []) == plans[0].receives.get(1, [])
    assert all(plan.dense == dense for plan in plans)
    for rank, plan in enumerate(plans):
        mine = range(4 * rank, 4 * rank + 4)
        needed = {j for i in mine for j in graph.neighbors(i) if j not in mine}
        assert set(plan.receives.get(1 - rank, [])) == needed
