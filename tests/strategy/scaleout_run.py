"""A DIMAT run on W processes, driven by tests/strategy/test_scaleout.py through a subprocess (Lightning's own
launcher re-runs this script for the other ranks). Rank 0 writes every agent's final weights and what each
rank sent. A one-process run (``--devices 1``) can also be called in the test's own process with
:func:`run`, which returns what rank 0 would write.

    python tests/strategy/scaleout_run.py --devices 2 --agents 4 --epochs 4 --output /tmp/out.pt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import BlobsData, TinyNet, make_trainer

from lightning_dimat import CDSGDCallback, DIMATStrategy, MergeCallback, SGPCallback


class ExitBeforeExchange(Callback):
    """Rank 1 dies right before the first merge's exchange: rank 0 must fail cleanly within the timeout."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.is_last_batch and trainer.current_epoch == 1 and trainer.global_rank == 1:
            os._exit(3)


class PoisonBeforeMerge(Callback):
    """Fills one agent's weights with NaN after the first merge epoch's last batch, before the merge."""

    def __init__(self, agent_id: int) -> None:
        self.agent_id = agent_id

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        swarm = trainer.strategy.swarm
        if trainer.is_last_batch and trainer.current_epoch == 1 and self.agent_id in swarm.agent_ids:
            with torch.no_grad():
                next(iter(dict(swarm.items())[self.agent_id].parameters())).fill_(float("nan"))


LAG_RELEASED = "test/lag/released"


class HoldRank1UntilRank0Merged(Callback):
    """A straggler without sleeping: at the first merge rank 1 waits until rank 0 has merged, so rank 0 must
    go on without rank 1's states once its deadline passes. Records rank 0's agents around that merge."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.missing: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if not (trainer.is_last_batch and trainer.current_epoch == 1):
            return
        if trainer.global_rank == 1:
            dist.distributed_c10d._get_default_store().wait([LAG_RELEASED], timedelta(seconds=120))
        else:
            self.before = _parameters(trainer)


class ReleaseRank1(Callback):
    """After rank 0's first merge: record it and let rank 1 go on."""

    def __init__(self, hold: HoldRank1UntilRank0Merged, merge: MergeCallback) -> None:
        self.hold, self.merge = hold, merge

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if not (trainer.is_last_batch and trainer.current_epoch == 1):
            return
        self.hold.missing = self.merge.missing_neighbours
        if trainer.global_rank == 0:
            self.hold.after = _parameters(trainer)
            dist.distributed_c10d._get_default_store().set(LAG_RELEASED, b"1")


def _parameters(trainer) -> dict[int, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    return {
        agent_id: {name: value.detach().clone() for name, value in agent.named_parameters()}
        for agent_id, agent in trainer.strategy.swarm.items()
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--checkpoints", type=Path, default=None)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--die", action="store_true")
    parser.add_argument(
        "--method", default="activation", help="a merge method, or cdsgd / sgp (per-step gossip)"
    )
    parser.add_argument("--basis", default="own", help="the merge callback's basis: own or shared")
    parser.add_argument("--compression", default="none", help="none, bf16, fp16 or int8")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--deadline", type=float, default=None, help="the merge callback's deadline (s)")
    parser.add_argument("--lag", action="store_true", help="rank 1 arrives at the first merge late")
    parser.add_argument(
        "--nan-agent", type=int, default=None, help="poison this agent before the first merge"
    )
    parser.add_argument("--on-nonfinite", default="restore", help="the callbacks' on_nonfinite")
    parser.add_argument("--start-method", default="popen", help="popen (script re-run), spawn or fork")
    parser.add_argument("--output", type=Path, default=None, help="where rank 0 saves (needed by main)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Fits one run; rank 0 returns ``{"states", "sent", "metrics", "exported", "lag"}`` (or, after a failure,
    ``{"error", "seconds"}`` and raises), other ranks return ``None``."""
    callbacks: list[Callback] = [ExitBeforeExchange()] if args.die else []
    if args.nan_agent is not None:
        callbacks.append(PoisonBeforeMerge(args.nan_agent))
    gossip = {"cdsgd": CDSGDCallback, "sgp": SGPCallback}.get(args.method)
    merge = (
        gossip(compression=args.compression, on_nonfinite=args.on_nonfinite)
        if gossip
        else MergeCallback(
            every_n_epochs=2,
            method=args.method,
            num_batches=2,
            basis=args.basis,
            compression=args.compression,
            deadline=args.deadline,
            on_nonfinite=args.on_nonfinite,
        )
    )
    hold = HoldRank1UntilRank0Merged()
    callbacks += [hold, merge, ReleaseRank1(hold, merge)] if args.lag else [merge]
    if args.checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoints, save_top_k=-1, every_n_epochs=1))
    strategy = DIMATStrategy(
        num_agents=args.agents,
        topology=args.topology,
        partition="by_class",
        timeout=timedelta(seconds=args.timeout),
        export=0 if gossip else "consensus",
        start_method=args.start_method,
    )
    trainer = make_trainer(
        strategy=strategy,
        devices=args.devices,
        callbacks=callbacks,
        max_epochs=args.epochs,
        enable_checkpointing=args.checkpoints is not None,
    )
    model = TinyNet(momentum=0.9, dropout=0.2)
    started = time.perf_counter()
    try:
        trainer.fit(model, datamodule=BlobsData(), ckpt_path=args.resume)
    except Exception as error:
        if args.output is not None:  # (rank r > 0 beside rank 0's file: <output>.rank<r>)
            rank = trainer.global_rank
            path = args.output if rank == 0 else args.output.with_name(f"{args.output.name}.rank{rank}")
            torch.save(
                {"error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}, path
            )
        raise
    exported = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if args.start_method != "popen":  # workers are gone: only the exported module came back
        return {"exported": exported, "metrics": dict(trainer.callback_metrics)}
    states = strategy.agent_states()
    merge = next((c for c in trainer.callbacks if isinstance(c, MergeCallback)), None)
    sent = strategy.all_gather_object(merge.last_bytes_between_processes if merge is not None else 0)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    lag = strategy.all_gather_object({"missing": hold.missing, "before": hold.before, "after": hold.after})
    if trainer.global_rank != 0:
        return None
    return {"states": states, "sent": sent, "metrics": metrics, "exported": exported, "lag": lag}


def main() -> None:
    args = parse()
    if args.output is None:
        raise SystemExit("--output is required when the script runs as a program")
    torch.set_num_threads(1)
    result = run(args)
    if result is not None:
        torch.save(result, args.output)


if __name__ == "__main__":
    main()
