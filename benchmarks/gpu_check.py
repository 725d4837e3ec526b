"""GPU paths of DIMATStrategy in one short script: bf16-mixed, fp16-mixed (GradScaler over all agents),
merges with BatchNorm re-estimation on the GPU, exact resume, and the strategy's overhead on the GPU.

    python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.json

Runs on CPU too (``--accelerator cpu``) so it can be checked before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import EpochClock, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Subset

from lightning_dimat import DIMATStrategy, MergeCallback, partition
from lightning_dimat.data import DigitsDataModule
from lightning_dimat.models import ImageClassifier


def module() -> ImageClassifier:
    return ImageClassifier(
        "small_cnn", {"in_channels": 1, "width": 64}, num_classes=10, optimizer="msgd", lr=0.02
    )


trainer = quiet_trainer


def fit(accelerator: str, precision: str, epochs: int = 6, **options: Any) -> dict[str, Any]:
    merge, clock = MergeCallback(every_n_epochs=2), EpochClock()
    strategy = DIMATStrategy(num_agents=5, topology="ring", partition="by_class", export="none")
    run = trainer(
        accelerator,
        epochs,
        [merge, clock],
        strategy=strategy,
        precision=precision,
        enable_checkpointing=False,
        **options,
    )
    run.fit(module(), datamodule=DigitsDataModule(batch_size=64))
    swarm = run.strategy.swarm
    parameters = [p for _, agent in swarm.items() for p in agent.parameters()]
    metrics = {key: float(value) for key, value in run.callback_metrics.items()}
    return {
        "precision": precision,
        "device_while_training": clock.device,
        "parameter_dtypes": sorted({str(p.dtype) for p in parameters}),
        "all_finite": all(bool(torch.isfinite(p).all()) for p in parameters),
        "val_acc_mean": metrics.get("val_acc"),
        "val_acc_agents": [metrics.get(f"agent_{g}/val_acc") for g in range(5)],
        "merge_rounds": metrics.get("merge/round"),
        "merge_time_s": metrics.get("merge/time_s"),
        "global_step": run.global_step,
        "epoch_seconds_median": statistics.median(clock.seconds[1:] or clock.seconds),
    }


def resume(accelerator: str) -> dict[str, Any]:
    """5 epochs straight vs 3 + resume to 5 (merges after epochs 1 and 3), bf16-mixed."""

    def run(directory: Path, ckpt: Path | None) -> dict[str, torch.Tensor]:
        callbacks = [MergeCallback(every_n_epochs=2), ModelCheckpoint(dirpath=directory, save_top_k=-1)]
        strategy = DIMATStrategy(num_agents=3, partition="by_class", export="none")
        t = trainer(accelerator, 5, callbacks, strategy=strategy, precision="bf16-mixed", deterministic=True)
        t.fit(module(), datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt)
        return {k: v.detach().float().cpu() for k, v in t.strategy.swarm.state_dict().items()}

    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        straight = run(Path(first), None)
        (checkpoint,) = Path(first).glob("epoch=2-*.ckpt")
        resumed = run(Path(second), checkpoint)
    max_diff = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
    return {"max_abs_diff": max_diff, "bit_exact": max_diff == 0.0}


def overhead(accelerator: str, repeats: int) -> dict[str, Any]:
    """DIMAT (5 agents, merging off) vs 5 plain fits on the same shards: training-time throughput ratio."""
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    train = data.train_set
    shards = partition(train.tensors[1], 5, "iid", seed=0)

    def dimat() -> float:
        clock = EpochClock()
        strategy = DIMATStrategy(num_agents=5, agent_init="copy", export="none")
        t = trainer(
            accelerator, 3, [clock], strategy=strategy, limit_val_batches=0, enable_checkpointing=False
        )
        t.fit(module(), DataLoader(train, batch_size=64, shuffle=True))
        return sum(clock.seconds)

    def plain() -> float:
        total = 0.0
        for shard in shards:
            clock = EpochClock()
            t = trainer(accelerator, 3, [clock], limit_val_batches=0, enable_checkpointing=False)
            t.fit(module(), DataLoader(Subset(train, shard.tolist()), batch_size=64, shuffle=True))
            total += sum(clock.seconds)
        return total

    dimat(), plain()
    ratios = []
    for _ in range(repeats):
        d, p = dimat(), plain()
        ratios.append(p / d)
    return {"ratios": ratios, "median_ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = parser.parse_args()
    report: dict[str, Any] = {"torch": torch.__version__}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    steps = [
        ("bf16_mixed", lambda: fit(args.accelerator, "bf16-mixed")),
        ("fp16_mixed", lambda: fit(args.accelerator, "16-mixed")),
        ("fp32", lambda: fit(args.accelerator, "32-true")),
        ("resume_bf16", lambda: resume(args.accelerator)),
        ("overhead", lambda: overhead(args.accelerator, args.repeats)),
    ]
    for name, step in steps:
        started = time.perf_counter()
        try:
            report[name] = step()
        except Exception as error:  # report every check, even after one fails
            report[name] = {"error": f"{type(error).__name__}: {error}"}
        report[name]["wall_s"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(report[name]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
