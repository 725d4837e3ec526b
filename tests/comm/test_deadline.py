"""The deadline exchange in one process, two ranks played against one in-process store: what arrives in time
is used, what does not is missing, layouts are checked, old rounds are deleted. The real two-process runs
(a straggler past the deadline) are in tests/strategy/test_scaleout.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_dimat.comm import ExchangeError, exchange_with_deadline, plan_exchange
from lightning_dimat.comm.deadline import entry_name
from lightning_dimat.topology import build_topology

RING = build_topology("ring", 4)  # agents 0, 1 on rank 0; 2, 3 on rank 1
PLAN_0 = plan_exchange(RING, world_size=2, rank=0)
PLAN_1 = plan_exchange(RING, world_size=2, rank=1)


def _states(agent_ids: list[int], width: int = 3) -> dict[int, dict[str, torch.Tensor]]:
    return {g: {"w": torch.full((width,), float(g)), "n": torch.tensor(g)} for g in agent_ids}


def test_states_published_in_time_arrive_and_bytes_count_what_was_published() -> None:
    store = dist.HashStore()
    exchange_with_deadline(_states([2, 3]), PLAN_1, store, "fit", 0, 0.01)
    remote, sent = exchange_with_deadline(_states([0, 1]), PLAN_0, store, "fit", 0, 5.0)
    assert sorted(remote) == [2, 3]
    for g in (2, 3):
        torch.testing.assert_close(remote[g]["w"], torch.full((3,), float(g)))
        assert remote[g]["n"] == g
    entry = store.get(entry_name("fit", 0, 0))
    assert sent == 2 * len(entry)  # agents 0 and 1, each read by rank 1


def test_a_peer_that_never_answers_is_missing_once_the_deadline_passes() -> None:
    store = dist.HashStore()
    remote, _ = exchange_with_deadline(_states([0, 1]), PLAN_0, store, "fit", 0, 0.05)
    assert remote == {}
    # It publishes late: the round that went on without it does not see it, the late process sees rank 0's.
    late, _ = exchange_with_deadline(_states([2, 3]), PLAN_1, store, "fit", 0, 0.05)
    assert sorted(late) == [0, 1]


def test_rounds_and_fits_never_read_each_other() -> None:
    store = dist.HashStore()
    exchange_with_deadline(_states([2, 3]), PLAN_1, store, "fit", 0, 0.01)
    assert exchange_with_deadline(_states([0, 1]), PLAN_0, store, "fit", 1, 0.01)[0] == {}
    assert exchange_with_deadline(_states([0, 1]), PLAN_0, store, "other-fit", 0, 0.01)[0] == {}


def test_own_entries_are_deleted_two_rounds_later() -> None:
    store = dist.HashStore()
    for round_index in range(3):
        exchange_with_deadline(_states([0, 1]), PLAN_0, store, "fit", round_index, 0.0)
    assert not store.check([entry_name("fit", 0, 0)])
    assert store.check([entry_name("fit", 1, 0)]) and store.check([entry_name("fit", 2, 0)])


def test_a_peer_with_another_architecture_fails_clearly() -> None:
    store = dist.HashStore()
    exchange_with_deadline(_states([2, 3], width=5), PLAN_1, store, "fit", 0, 0.01)
    with pytest.raises(ExchangeError, match="different architectures"):
        exchange_with_deadline(_states([0, 1]), PLAN_0, store, "fit", 0, 1.0)


def test_a_deadline_must_be_positive() -> None:
    from lightning_dimat import MergeCallback

    with pytest.raises(ValueError, match="deadline"):
        MergeCallback(deadline=0)
