"""Bytes and time per merge exchange: N=8 agents (ResNet-20) on W=2 processes (gloo, localhost), ring and
fully connected, against a naive all-gather of every agent's state, in one run.

    python benchmarks/exchange.py --width 4 --repeats 5

Prints and saves ``benchmarks/results/exchange.json`` (medians over repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_dimat.communication import state_bytes
from lightning_dimat.exchange import all_gather_states, exchange_states, plan_exchange
from lightning_dimat.models import resnet20
from lightning_dimat.placement import agents_on_rank
from lightning_dimat.topology import build_topology

RESULTS = Path(__file__).parent / "results"


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--output", type=Path, default=RESULTS / "exchange.json")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [
        context.Process(target=worker, args=(r, args, args.port, queue)) for r in range(args.world_size)
    ]
    for process in processes:
        process.start()
    measured = queue.get()
    for process in processes:
        process.join()
    rank0 = measured["per_rank"][0]
    naive = rank0["naive_all_gather"]
    result = {
        "benchmark": "exchange",
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
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
