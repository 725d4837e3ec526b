"""Merge and gossip variants on 2 processes (gloo on CPU) give the agents of one process: fully connected
(one all-gather), the shared basis with a topology schedule on an uneven placement, per-step gossip (CDSGD,
SGP) with a checkpoint that moves between process counts, and int8-compressed exchanges. Runs as in
test_scaleout.py (tests/strategy/scaleout_harness.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scaleout_harness import in_process, max_difference, one_and_two_processes

from lightning_dimat.comm.compression import COMPRESSIONS


def test_fully_connected_uses_one_all_gather(tmp_path: Path) -> None:
    # (Uneven placement, 3 + 2 agents, is the shared-basis test's: its exchanges cross it both ways.)
    fc_1, fc_2 = one_and_two_processes(tmp_path, "--topology", "fully_connected", "--epochs", "2")
    assert max_difference(fc_1["states"], fc_2["states"]) <= 1e-6
    state_bytes = sum(t.numel() * t.element_size() for t in fc_1["states"][0].values())
    assert fc_2["sent"] == [2 * state_bytes, 2 * state_bytes]  # all-gather: each process's 2 agents, once


def test_the_shared_basis_and_a_topology_schedule_on_two_processes_give_the_agents_of_one_process(
    tmp_path: Path,
) -> None:
    # 5 agents on an uneven placement (3 + 2): tree neighbours and permutation indices cross the process
    # boundary both ways. Each round exchanges that round's neighbours only (one-peer exponential rounds are
    # directed: a state goes to the agents that take from it); the shared basis is built along the union
    # graph's spanning tree. (SGP on random matchings across processes was checked the same way when the
    # schedules were written; in the suite one case keeps the multi-process tests' time down.)
    common = ("--agents", "5", "--topology", "one_peer_exponential", "--basis", "shared", "--epochs", "4")
    one, two = one_and_two_processes(tmp_path, *common)
    assert max_difference(one["states"], two["states"]) <= 1e-6
    assert one["metrics"]["merge/round"] == 2.0
    for key in ("comm/bytes_sent", "merge/permuted_fraction", "agent_3/val_acc", "val_acc"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key


@pytest.mark.parametrize("method", ["cdsgd", "sgp"])
def test_per_step_gossip_on_two_processes_gives_the_agents_of_one_process(
    tmp_path: Path, method: str
) -> None:
    common = ("--method", method, "--epochs", "2")
    one, two = one_and_two_processes(tmp_path, *common, checkpoints=str(tmp_path / "ck"))
    # The checkpoint after epoch 0, written by two processes, resumed in one (gossip state gathered by agent).
    (checkpoint,) = (tmp_path / "ck").glob("epoch=0-*.ckpt")
    resumed = in_process(*common, "--resume", str(checkpoint))
    for run in (two, resumed):
        assert max_difference(one["states"], run["states"]) <= 1e-6
        for key in (
            "comm/rounds",
            "comm/bytes_sent",
            "comm/agent_3/bytes_sent",
            "comm/agent_0/rounds",
            "val_acc",
        ):
            assert run["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key
    state_bytes = sum(t.numel() * t.element_size() for t in one["states"][0].values())
    steps = one["metrics"]["comm/rounds"]
    # Ring of 4: every agent sends its state to 2 neighbours per step (SGP adds its push-sum scalar).
    per_message = state_bytes + (8 if method == "sgp" else 0)
    assert one["metrics"]["comm/bytes_sent"] == 4 * 2 * steps * per_message


@pytest.mark.parametrize("method", ["activation"])  # (SGP's exact push-sum weight: tests/comm)
def test_int8_compression_on_two_processes_gives_the_agents_of_one_process(
    tmp_path: Path, method: str
) -> None:
    # Neighbour states are decode(encode(.)) in one process too, so the layout does not change the results;
    # only the int8 payloads (codes, float32 scales, the int64 BatchNorm counter) cross the wire.
    one, two = one_and_two_processes(tmp_path, "--method", method, "--compression", "int8", "--epochs", "2")
    assert max_difference(one["states"], two["states"]) <= 1e-6
    for key in ("comm/bytes_sent", "comm/agent_3/bytes_sent", "val_acc", "agent_3/val_acc"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key
    codec = COMPRESSIONS.get("int8")
    state = one["states"][0]
    payload_bytes = codec.payload_bytes(codec.encode(state))
    assert sum(t.numel() * t.element_size() for t in state.values()) / payload_bytes >= 3.5
    if method == "sgp":  # every step, 4 agents push to 2 neighbours: payload + the exact float64 weight
        steps = one["metrics"]["comm/rounds"]
        assert one["metrics"]["comm/bytes_sent"] == 4 * 2 * steps * (payload_bytes + 8)
        return
    # One merge (after epoch 1); ring of 4 on 2 processes: each process sends two of its agents' payloads.
    assert one["metrics"]["comm/bytes_sent"] == one["metrics"]["merge/bytes"] == 4 * 2 * payload_bytes
    assert two["sent"] == [2 * payload_bytes, 2 * payload_bytes]
    assert two["metrics"]["merge/bytes_between_processes"] == 4 * payload_bytes
