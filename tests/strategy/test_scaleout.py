"""Agents spread over 2 processes (gloo on CPU, Lightning's own launcher): the same results as one process,
neighbour-only exchange, checkpoints that move between process counts, every launcher, and a clean failure
when a peer dies or is late. This is where property 6 of DESIGN.md §3 (same results at any scale-out) is
tested; the merge and gossip variants on two processes are in test_scaleout_methods.py.

Each multi-process run is a subprocess (tests/strategy/scaleout_run.py), exactly as a user starts one; the
one-process run it is compared with runs the same script's ``run`` in the test's own process meanwhile
(tests/strategy/scaleout_harness.py). The exchange plans themselves (no process started) are tested in
tests/comm/test_transport.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from scaleout_harness import Started, in_process, max_difference, run_subprocess


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("scaleout")
    w2 = Started(tmp, "w2", "--devices", "2", "--checkpoints", str(tmp / "ck2"))
    w1 = in_process("--checkpoints", str(tmp / "ck1"))
    results = {"w1": w1, "w2": w2.result()}
    (w2_checkpoint,) = (tmp / "ck2").glob("epoch=2-*.ckpt")
    (w1_checkpoint,) = (tmp / "ck1").glob("epoch=2-*.ckpt")
    # The resumed two-process run merges with a deadline every state meets: the same agents as strict.
    w1_to_w2 = Started(tmp, "w1_to_w2", "--devices", "2", "--resume", str(w1_checkpoint), "--deadline", "60")
    results["w2_to_w1"] = in_process("--resume", str(w2_checkpoint))
    results["w1_to_w2"] = w1_to_w2.result()
    return results


def test_two_processes_give_the_agents_of_one_process(runs: dict[str, Any]) -> None:
    # 4 agents, ring, by_class, activation matching, merges after epochs 1 and 3.
    assert float(runs["w2"]["metrics"]["merge/round"]) == 2.0
    assert max_difference(runs["w1"]["states"], runs["w2"]["states"]) <= 1e-6
    assert max_difference({0: runs["w1"]["exported"]}, {0: runs["w2"]["exported"]}) <= 1e-6
    for key in ("val_acc", "agent_3/val_acc", "merge/consensus_distance_after", "merge/bytes"):
        assert runs["w2"]["metrics"][key] == pytest.approx(runs["w1"]["metrics"][key], abs=1e-6), key


def test_each_process_sends_only_its_agents_neighbours_needs(runs: dict[str, Any]) -> None:
    state = runs["w1"]["states"][0]
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    # Ring of 4 on 2 processes: agents 0,1 | 2,3; each process needs exactly two of the other's agents.
    assert runs["w2"]["sent"] == [2 * state_bytes, 2 * state_bytes]
    assert runs["w1"]["sent"] == [0]
    assert runs["w2"]["metrics"]["merge/bytes_between_processes"] == 4 * state_bytes
    assert runs["w1"]["metrics"]["merge/bytes_between_processes"] == 0
    # What the algorithm sends over the graph does not depend on the process layout.
    assert runs["w2"]["metrics"]["comm/bytes_sent"] == runs["w1"]["metrics"]["comm/bytes_sent"]


def test_checkpoints_move_between_process_counts(runs: dict[str, Any]) -> None:
    assert max_difference(runs["w1"]["states"], runs["w2_to_w1"]["states"]) <= 1e-6
    assert max_difference(runs["w1"]["states"], runs["w1_to_w2"]["states"]) <= 1e-6
    assert runs["w1_to_w2"]["metrics"]["merge/missing_neighbours"] == 0  # (with a deadline all came in time)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_spawn_and_fork_launchers_hand_the_exported_module_back(
    runs: dict[str, Any], tmp_path: Path, start_method: str
) -> None:
    result = run_subprocess(tmp_path, start_method, "--devices", "2", "--start-method", start_method)
    assert max_difference({0: runs["w1"]["exported"]}, {0: result["exported"]}) <= 1e-6


def test_a_peer_that_dies_mid_exchange_ends_the_run_with_a_clear_error(tmp_path: Path) -> None:
    result = run_subprocess(
        tmp_path, "dies", "--devices", "2", "--die", "--timeout", "20", expect_failure=True
    )
    assert "another process died or did not answer (the timeout is 20 s" in result["error"]
    assert "resume from it with ckpt_path" in result["error"]
    assert result["seconds"] < 20 + 10


def test_a_non_finite_agent_with_raise_stops_every_process_with_the_same_error(tmp_path: Path) -> None:
    # Ring of 6 on 2 processes (agents 0-2 | 3-5): agent 1's neighbours are both on rank 0, so rank 1 neither
    # holds nor receives its state; it must still raise NonFiniteAgentError, not wait out the timeout.
    common = ("--agents", "6", "--method", "average", "--nan-agent", "1", "--on-nonfinite", "raise")
    result = run_subprocess(
        tmp_path, "nan", "--devices", "2", *common, "--timeout", "60", expect_failure=True
    )
    other = torch.load(tmp_path / "nan.pt.rank1", weights_only=False)
    for error in (result["error"], other["error"]):
        assert error.startswith("NonFiniteAgentError: Agent(s) 1 hold NaN or infinite weights"), error


def test_a_straggler_past_the_deadline_does_not_block_the_others(tmp_path: Path) -> None:
    # Ring of 4 on 2 processes (agents 0, 1 | 2, 3). At the first merge rank 1 waits until rank 0 has merged
    # (no sleep: a store key), so rank 0 can only finish by going on without agents 2 and 3 past its 2-second
    # deadline; rank 1 then merges with what rank 0 sent in time, and the run goes on to its end.
    common = ("--method", "average", "--epochs", "2", "--deadline", "2", "--lag")
    result = run_subprocess(tmp_path, "lag", "--devices", "2", *common, timeout=180)
    rank0, rank1 = result["lag"]
    assert rank0["missing"] == 2  # agent 0 misses agent 3, agent 1 misses agent 2
    assert rank1["missing"] == 0
    # Agent 0's weights are (1/3, 1/3, 1/3) over {3, 0, 1}; without 3 they renormalise to (1/2, 1/2).
    before, after = rank0["before"], rank0["after"]
    for name, value in after[0].items():
        torch.testing.assert_close(value, (before[0][name] + before[1][name]) / 2, atol=1e-6, rtol=0)
    assert sorted(result["states"]) == [0, 1, 2, 3]
