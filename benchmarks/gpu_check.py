"""GPU paths of DIMATStrategy in one short script: bf16-mixed, fp16-mixed (GradScaler over all agents),
merges with BatchNorm re-estimation on the GPU, exact resume, and the strategy's overhead on the GPU.

    python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --smoke          # seconds, on the CPU: 2 agents, 2 batches per epoch

Runs on CPU too (``--accelerator cpu``; the default of ``--smoke``) so it can be checked before spending
GPU time. Checks that need a GPU (fp16-mixed: on the CPU Lightning would quietly run bf16-mixed instead) are
then not run and are marked ``"status": "skipped: no GPU"`` in the JSON; every other check says ``"ok"`` or
``"error"``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, EpochClock, output_path, parse_args, quiet_trainer, save_json
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_dimat import DIMATStrategy, MergeCallback, partition
from lightning_dimat.data import DigitsDataModule
from lightning_dimat.models import ImageClassifier

SKIPPED_NO_GPU = "skipped: no GPU"


@dataclass(frozen=True)
class Sizes:
    """How big each check is: the full run's sizes, or :data:`SMOKE`'s."""

    agents: int = 5  # fit: agents on a ring
    epochs: int = 6  # fit: epochs (merges every 2)
    resume_agents: int = 3
    width: int = 64  # small CNN channels
    batches: int | None = None  # training batches per epoch (None: all)
    val_batches: int | None = None  # validation batches (None: all)
    overhead_agents: int = 5
    overhead_epochs: int = 3
    overhead_images: int | None = None  # training images of the overhead check (None: all)


SMOKE = Sizes(
    agents=2,
    epochs=2,
    resume_agents=2,
    width=8,
    batches=2,
    val_batches=1,
    overhead_agents=2,
    overhead_epochs=1,
    overhead_images=128,
)


def module(sizes: Sizes) -> ImageClassifier:
    return ImageClassifier(
        "small_cnn", {"in_channels": 1, "width": sizes.width}, num_classes=10, optimizer="msgd", lr=0.02
    )


def trainer(accelerator: str, epochs: int, callbacks: list[Any], sizes: Sizes, **options: Any) -> Any:
    """:func:`quiet_trainer`, limited to ``sizes``' batches per epoch."""
    if sizes.batches is not None:
        options.setdefault("limit_train_batches", sizes.batches)
    if sizes.val_batches is not None:
        options.setdefault("limit_val_batches", sizes.val_batches)
    return quiet_trainer(accelerator, epochs, callbacks, **options)


def fit(accelerator: str, precision: str, sizes: Sizes, **options: Any) -> dict[str, Any]:
    merge, clock = MergeCallback(every_n_epochs=2), EpochClock()
    strategy = DIMATStrategy(num_agents=sizes.agents, topology="ring", partition="by_class", export="none")
    run = trainer(
        accelerator,
        sizes.epochs,
        [merge, clock],
        sizes,
        strategy=strategy,
        precision=precision,
        enable_checkpointing=False,
        **options,
    )
    run.fit(module(sizes), datamodule=DigitsDataModule(batch_size=64))
    swarm = run.strategy.swarm
    parameters = [p for _, agent in swarm.items() for p in agent.parameters()]
    metrics = {key: float(value) for key, value in run.callback_metrics.items()}
    return {
        "precision": precision,
        "device_while_training": clock.device,
        "parameter_dtypes": sorted({str(p.dtype) for p in parameters}),
        "all_finite": all(bool(torch.isfinite(p).all()) for p in parameters),
        "val_acc_mean": metrics.get("val_acc"),
        "val_acc_agents": [metrics.get(f"agent_{g}/val_acc") for g in range(sizes.agents)],
        "merge_rounds": metrics.get("merge/round"),
        "merge_time_s": metrics.get("merge/time_s"),
        "global_step": run.global_step,
        "epoch_seconds_median": statistics.median(clock.seconds[1:] or clock.seconds),
    }


def resume(accelerator: str, sizes: Sizes) -> dict[str, Any]:
    """5 epochs straight vs 3 + resume to 5 (merges after epochs 1 and 3), bf16-mixed."""

    def run(directory: Path, ckpt: Path | None) -> dict[str, torch.Tensor]:
        callbacks = [MergeCallback(every_n_epochs=2), ModelCheckpoint(dirpath=directory, save_top_k=-1)]
        strategy = DIMATStrategy(num_agents=sizes.resume_agents, partition="by_class", export="none")
        t = trainer(
            accelerator, 5, callbacks, sizes, strategy=strategy, precision="bf16-mixed", deterministic=True
        )
        t.fit(module(sizes), datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt)
        return {k: v.detach().float().cpu() for k, v in t.strategy.swarm.state_dict().items()}

    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        straight = run(Path(first), None)
        (checkpoint,) = Path(first).glob("epoch=2-*.ckpt")
        resumed = run(Path(second), checkpoint)
    max_diff = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
    return {"max_abs_diff": max_diff, "bit_exact": max_diff == 0.0}


def overhead(accelerator: str, repeats: int, sizes: Sizes) -> dict[str, Any]:
    """DIMAT (5 agents, merging off) vs 5 plain fits on the same shards: training-time throughput ratio."""
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    train = data.train_set
    if sizes.overhead_images is not None:
        train = TensorDataset(*(tensor[: sizes.overhead_images] for tensor in train.tensors))
    agents, epochs = sizes.overhead_agents, sizes.overhead_epochs
    shards = partition(train.tensors[1], agents, "iid", seed=0)
    full = Sizes(width=sizes.width)  # every batch of the (possibly smaller) training set

    def dimat() -> float:
        clock = EpochClock()
        strategy = DIMATStrategy(num_agents=agents, agent_init="copy", export="none")
        t = trainer(
            accelerator,
            epochs,
            [clock],
            full,
            strategy=strategy,
            limit_val_batches=0,
            enable_checkpointing=False,
        )
        t.fit(module(sizes), DataLoader(train, batch_size=64, shuffle=True))
        return sum(clock.seconds)

    def plain() -> float:
        total = 0.0
        for shard in shards:
            clock = EpochClock()
            t = trainer(accelerator, epochs, [clock], full, limit_val_batches=0, enable_checkpointing=False)
            t.fit(module(sizes), DataLoader(Subset(train, shard.tolist()), batch_size=64, shuffle=True))
            total += sum(clock.seconds)
        return total

    dimat(), plain()
    ratios = []
    for _ in range(repeats):
        d, p = dimat(), plain()
        ratios.append(p / d)
    return {"ratios": ratios, "median_ratio": statistics.median(ratios)}


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` resolves to a CUDA GPU here."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accelerator", default="gpu", help="Lightning accelerator (--smoke: cpu)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, {"accelerator": "cpu", "repeats": 1})
    output = output_path(args, RESULTS / "gpu_check.json", "gpu_check")
    sizes = SMOKE if args.smoke else Sizes()
    gpu = uses_gpu(args.accelerator)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else SKIPPED_NO_GPU,
        "accelerator": args.accelerator,
        "smoke": args.smoke,
        "sizes": asdict(sizes),
    }
    steps: list[tuple[str, bool, Callable[[], dict[str, Any]]]] = [  # (name, needs a GPU, check)
        ("bf16_mixed", False, lambda: fit(args.accelerator, "bf16-mixed", sizes)),
        ("fp16_mixed", True, lambda: fit(args.accelerator, "16-mixed", sizes)),
        ("fp32", False, lambda: fit(args.accelerator, "32-true", sizes)),
        ("resume_bf16", False, lambda: resume(args.accelerator, sizes)),
        ("overhead", False, lambda: overhead(args.accelerator, args.repeats, sizes)),
    ]
    for name, needs_gpu, step in steps:
        started = time.perf_counter()
        if needs_gpu and not gpu:
            report[name] = {"status": SKIPPED_NO_GPU}
        else:
            try:
                report[name] = {"status": "ok", **step()}
            except Exception as error:  # report every check, even after one fails
                report[name] = {"status": "error", "error": f"{type(error).__name__}: {error}"}
        report[name]["wall_s"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(report[name]), flush=True)
    save_json(report, output)


if __name__ == "__main__":
    main()
