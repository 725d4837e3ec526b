"""Bytes and time per merge exchange: N=8 agents (ResNet-20) on W=2 processes (gloo, localhost), ring and
fully connected, against a naive all-gather of every agent's state, in one run.

    python benchmarks/exchange.py --width 4 --repeats 5
    python benchmarks/exchange.py --smoke      # seconds: 6 agents of width 1 on the same 2 gloo processes

Prints and saves ``benchmarks/results/exchange.json`` (medians over repeats).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import RESULTS, output_path, parse_args, save_json

from lightning_dimat.comm.placement import agents_on_rank
from lightning_dimat.comm.transport import all_gather_states, exchange_states, plan_exchange
from lightning_dimat.merge import state_bytes
from lightning_dimat.models import resnet20
from lightning_dimat.topology import build_topology

SMOKE = {"agents": 6, "width": 1, "repeats": 1}  # 6 agents: the ring needs point-to-point sends


def _timed(function: Any, repeats: int) -> tuple[float, int]:
    times, sent = [], 0
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        _, sent = function()
        dist.barrier()
        times.append(time.perf_counter() - started)
    return statistics.median(times), sent


def worker(rank: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    device, timeout = torch.device("cpu"), timedelta(seconds=120)
    states = {}
    for agent_id in agents_on_rank(args.agents, args.world_size, rank):
        torch.manual_seed(agent_id)
        states[agent_id] = resnet20(width=args.width, num_classes=20).state_dict()
    size = state_bytes(next(iter(states.values())))
    rows = {}
    for topology in ("ring", "fully_connected"):
        plan = plan_exchange(build_topology(topology, args.agents), args.world_size, rank)
        seconds, sent = _timed(lambda plan=plan: exchange_states(states, plan, device, timeout), args.repeats)
        rows[topology] = {"seconds": seconds, "bytes_sent": sent, "dense": plan.dense}
    seconds, sent = _timed(lambda: all_gather_states(states, args.world_size, device, timeout), args.repeats)
    rows["naive_all_gather"] = {"seconds": seconds, "bytes_sent": sent}
    gathered: list[Any] = [None] * args.world_size
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        queue.put({"state_mb": size / 2**20, "per_rank": gathered})
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_result(queue: Any, processes: list[Any], timeout: float) -> Any:
    """Rank 0's measurements, or an error as soon as a worker dies without them (instead of hanging)."""
    deadline = time.monotonic() + timeout
    while queue.empty():
        failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        finished = all(p.exitcode is not None for p in processes)
        if failed or (finished and queue.empty()):
            raise SystemExit(f"exchange workers exited without a result (exit codes {failed or 0})")
        if time.monotonic() > deadline:
            for process in processes:
                process.terminate()
            raise SystemExit(f"exchange workers gave no result within {timeout:.0f} s")
        time.sleep(0.1)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=0, help="rendezvous port (0: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the workers")
    args = parse_args(parser, SMOKE)
    output = output_path(args, RESULTS / "exchange.json", "exchange")
    port = args.port or free_port()
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=worker, args=(r, args, port, queue)) for r in range(args.world_size)]
    for process in processes:
        process.start()
    measured = wait_for_result(queue, processes, args.timeout)
    for process in processes:
        process.join()
    rank0 = measured["per_rank"][0]
    naive = rank0["naive_all_gather"]
    result = {
        "benchmark": "exchange",
        "smoke": args.smoke,
        "agents": args.agents,
        "world_size": args.world_size,
        "model": f"resnet20 width {args.width}",
        "state_mb": measured["state_mb"],
        "backend": "gloo (localhost)",
        "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
        "repeats": args.repeats,
        "per_rank": measured["per_rank"],
        "ratios_vs_naive": {
            topology: {
                "bytes": rank0[topology]["bytes_sent"] / naive["bytes_sent"],
                "time": rank0[topology]["seconds"] / naive["seconds"],
            }
            for topology in ("ring", "fully_connected")
        },
    }
    print(f"agent state {result['state_mb']:.1f} MB; rank 0, median of {args.repeats}:")
    for name, row in rank0.items():
        print(f"  {name:18s} sent {row['bytes_sent'] / 2**20:8.1f} MB in {row['seconds'] * 1000:8.1f} ms")
    for topology, ratio in result["ratios_vs_naive"].items():
        print(f"  {topology:18s} / naive all-gather: bytes {ratio['bytes']:.3f}, time {ratio['time']:.3f}")
    save_json(result, output)


if __name__ == "__main__":
    main()
