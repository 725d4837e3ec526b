"""Overhead of DIMATStrategy: N agents in one DIMAT run (merging off) vs N plain ``Trainer.fit`` runs.

Both sides train the same module on the same shards for the same epochs; only training time is timed
(epoch start to epoch end, no validation), so the numbers compare the training loops themselves.
Prints and saves (``benchmarks/results/overhead.json``) the median throughput ratio over repeats:
``ratio = images/s with DIMATStrategy / images/s of the plain runs`` (goal: >= 0.95). DIMAT runs as shipped
(``release_memory="auto"``: off below 32 agents in a process) and, as a third side of every repeat, with
``release_memory=True`` (freed heap handed back after each agent's backward): ``release_cost`` is the median
of their time ratio (> 1: handing memory back costs time).

    python benchmarks/overhead.py --repeats 5 --model small_cnn
    python benchmarks/overhead.py --smoke          # seconds: 2 agents, 1 epoch on 128 images, 1 repeat
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from typing import Any

import torch
from common import RESULTS, EpochClock, output_path, parse_args, quiet_trainer, save_json
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_dimat import DIMATStrategy, partition
from lightning_dimat.data import DigitsDataModule
from lightning_dimat.models import ImageClassifier

SMOKE = {"agents": 2, "epochs": 1, "repeats": 1, "train_images": 128}


def _trainer(clock: EpochClock, epochs: int, **options: Any) -> Trainer:
    return quiet_trainer(
        "cpu",
        epochs,
        [clock],
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **options,
    )


def _module(model: str) -> ImageClassifier:
    options = {"in_features": 64} if model == "mlp" else {"in_channels": 1, "width": 32}
    return ImageClassifier(model, options, num_classes=10, optimizer="msgd", lr=0.02)


def run_dimat(train: TensorDataset, args: argparse.Namespace, release_memory: bool | str = "auto") -> float:
    clock = EpochClock()
    strategy = DIMATStrategy(
        num_agents=args.agents,
        partition=args.partition,
        agent_init="copy",
        export="none",
        release_memory=release_memory,
    )
    trainer = _trainer(clock, args.epochs, strategy=strategy)
    trainer.fit(_module(args.model), DataLoader(train, batch_size=args.batch_size, shuffle=True))
    return sum(clock.seconds)


def run_plain(train: TensorDataset, args: argparse.Namespace) -> float:
    shards = partition(train.tensors[1], args.agents, args.partition, seed=0)
    total = 0.0
    for shard in shards:
        clock = EpochClock()
        trainer = _trainer(clock, args.epochs)
        loader = DataLoader(Subset(train, shard.tolist()), batch_size=args.batch_size, shuffle=True)
        trainer.fit(_module(args.model), loader)
        total += sum(clock.seconds)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", choices=["mlp", "small_cnn"], default="small_cnn")
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    parser.add_argument("--train-images", type=int, default=0, help="first n training images (0: all)")
    args = parse_args(parser, SMOKE)
    output = output_path(args, RESULTS / "overhead.json", "overhead")
    torch.set_num_threads(args.threads)
    seed_everything(0, verbose=False)
    data = DigitsDataModule()
    data.setup("fit")
    train = data.train_set
    if args.train_images:
        train = TensorDataset(*(tensor[: args.train_images] for tensor in train.tensors))
    images = len(train) * args.epochs

    run_dimat(train, args)  # warm-up (imports, allocator, first-call costs) for both sides
    run_plain(train, args)
    sides = {
        "dimat_s": lambda: run_dimat(train, args),
        "plain_s": lambda: run_plain(train, args),
        "dimat_released_s": lambda: run_dimat(train, args, release_memory=True),
    }
    names = list(sides)
    rows = []
    for repeat in range(args.repeats):
        # Rotate the order so drifts in machine speed hit every side alike.
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        row = {name: sides[name]() for name in order}
        row["ratio"] = row["plain_s"] / row["dimat_s"]
        row["release_cost"] = row["dimat_released_s"] / row["dimat_s"]
        rows.append(row)
        dimat, plain = row["dimat_s"], row["plain_s"]
        print(
            f"repeat {repeat}: DIMAT {images / dimat:8.0f} img/s   plain {images / plain:8.0f} img/s   "
            f"ratio {plain / dimat:.3f}   release_memory cost {row['release_cost']:.3f}"
        )
    result = {
        "benchmark": "overhead",
        "smoke": args.smoke,
        "agents": args.agents,
        "epochs": args.epochs,
        "model": args.model,
        "batch_size": args.batch_size,
        "partition": args.partition,
        "train_images": len(train),
        "images_per_run": images,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} CPUs)",
        "torch": torch.__version__,
        "repeats": rows,
        "median_dimat_images_per_s": images / statistics.median(row["dimat_s"] for row in rows),
        "median_plain_images_per_s": images / statistics.median(row["plain_s"] for row in rows),
        "median_ratio": statistics.median(row["ratio"] for row in rows),
        "release_memory": "auto",
        "median_release_cost": statistics.median(row["release_cost"] for row in rows),
    }
    print(f"median throughput ratio (DIMAT / plain): {result['median_ratio']:.3f}  (goal >= 0.95)")
    print(f"median time with release_memory=True / as shipped: {result['median_release_cost']:.3f}")
    save_json(result, output)


if __name__ == "__main__":
    main()
