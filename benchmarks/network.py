"""Networks that change and links that are slow (issue 13): final accuracy against the bytes each agent sent,
for graphs that change per round (ring vs one-peer exponential vs random matching) and for compressed
exchanges (none / bf16 / int8), DIMAT (shared basis) and WA.

Runs the experiment grid ``configs/cpu/network.yaml`` — the CPU protocol of ``configs/cpu/protocol.yaml``
(Adam 1e-3 reset at each merge, 2 local epochs between merges, 10 merges, ResNet-20 ×1, Tiny ImageNet-20 at
32 px, 50 training images per class, non-IID by-class shards, 5 agents) — through the experiment runner,
whose cache lets a stopped run resume, then writes one row per finished cell: method, topology, compression,
final test accuracy (mean over agents), the consensus's accuracy, MB sent per agent over the run, and the
accuracy and bytes relative to the same method uncompressed on the ring. Saves
``benchmarks/results/network.json`` and a plot of accuracy against MB sent beside it (``.png``).

    python benchmarks/network.py --jobs 2            # the grid (hours on 2 cores), then table and plot
    python benchmarks/network.py --report-only       # table and plot from the cells finished so far
    python benchmarks/network.py --smoke             # a 1-merge digits grid in a temporary folder:
                                                     # seconds, meaningless numbers

``--set`` edits the experiment file like ``lightning-dimat experiment --set``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import MEASURED_CODE  # noqa: E402

from lightning_dimat.experiment import (  # noqa: E402
    Experiment,
    finished_results,
    load_experiment,
    run_experiment,
)
from lightning_dimat.experiment.report import consensus_accuracy, final_accuracy  # noqa: E402

CONFIG = ROOT / "configs" / "cpu" / "network.yaml"
RESULTS = ROOT / "benchmarks" / "results"
BASELINE_TOPOLOGY = "ring"


def compression_of(experiment: Experiment, method: str) -> str:
    """The ``compression`` a method's merge or gossip callback uses (``"none"`` when it sets none)."""
    for callback in experiment.methods[method].callbacks:
        compression = callback.get("init_args", {}).get("compression")
        if compression is not None:
            return str(compression)
    return "none"


def family_of(experiment: Experiment, method: str) -> str:
    """The method without its compression: cells of one family differ only in what crosses the wire."""
    callbacks = [
        {
            **callback,
            "init_args": {k: v for k, v in callback.get("init_args", {}).items() if k != "compression"},
        }
        for callback in experiment.methods[method].callbacks
    ]
    return json.dumps([callbacks, experiment.methods[method].model], sort_keys=True)


def rows_of(experiment: Experiment, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, topology, partition, agents), seeds averaged; relative to the family's
    uncompressed ring."""
    runs: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        cell = result["cell"]
        runs[(cell["method"], cell["topology"], cell["partition"], cell["num_agents"])].append(result)
    rows = []
    for (method, topology, partition, num_agents), cell_results in sorted(runs.items()):
        accuracies = [a for a in map(final_accuracy, cell_results) if a is not None]
        consensus = [a for a in map(consensus_accuracy, cell_results) if a is not None]
        sent = [r["history"][-1].get("comm/bytes_sent", 0.0) / num_agents / 1e6 for r in cell_results]
        rows.append(
            {
                "method": method,
                "label": experiment.methods[method].label,
                "family": family_of(experiment, method),
                "topology": topology,
                "compression": compression_of(experiment, method),
                "partition": partition,
                "agents": num_agents,
                "seeds": len(cell_results),
                "accuracy": 100 * statistics.fmean(accuracies) if accuracies else None,
                "consensus_accuracy": 100 * statistics.fmean(consensus) if consensus else None,
                "mb_sent_per_agent": statistics.fmean(sent),
            }
        )
    for row in rows:
        baseline = next(
            (
                other
                for other in rows
                if other["family"] == row["family"]
                and other["compression"] == "none"
                and other["topology"] == BASELINE_TOPOLOGY
                and (other["partition"], other["agents"]) == (row["partition"], row["agents"])
            ),
            None,
        )
        row["bytes_vs_ring_uncompressed"] = (
            row["mb_sent_per_agent"] / baseline["mb_sent_per_agent"]
            if baseline and baseline["mb_sent_per_agent"]
            else None
        )
        row["accuracy_vs_ring_uncompressed"] = (
            row["accuracy"] - baseline["accuracy"]
            if baseline and row["accuracy"] is not None and baseline["accuracy"] is not None
            else None
        )
    for row in rows:
        del row["family"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    columns = ["method", "topology", "compression", "seeds", "accuracy", "consensus", "MB sent / agent"]
    columns += ["bytes ×", "Δ accuracy"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:

        def number(value: float | None, template: str) -> str:
            return "—" if value is None else template.format(value)

        lines.append(
            f"| {row['label']} | {row['topology']} | {row['compression']} | {row['seeds']} | "
            f"{number(row['accuracy'], '{:.2f}')} | {number(row['consensus_accuracy'], '{:.2f}')} | "
            f"{row['mb_sent_per_agent']:.2f} | {number(row['bytes_vs_ring_uncompressed'], '{:.2f}')} | "
            f"{number(row['accuracy_vs_ring_uncompressed'], '{:+.2f}')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against MB sent per agent, one point per row, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    markers = {"ring": "o", "one_peer_exponential": "^", "random_matching": "s"}
    for row in rows:
        if row["accuracy"] is None:
            continue
        colour = "tab:blue" if row["label"].startswith("DIMAT") else "tab:orange"
        axes.scatter(
            row["mb_sent_per_agent"],
            row["accuracy"],
            marker=markers.get(row["topology"], "D"),
            color=colour,
            alpha=1.0 if row["compression"] == "none" else 0.55,
        )
        text = f"{row['topology']}" + ("" if row["compression"] == "none" else f", {row['compression']}")
        axes.annotate(text, (row["mb_sent_per_agent"], row["accuracy"]), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("MB sent per agent over the run (log scale)")
    axes.set_ylabel("final test accuracy, mean over agents (%)")
    axes.set_title("Accuracy against bytes sent (blue: DIMAT shared basis, orange: WA)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def smoke_experiment(folder: Path) -> Path:
    """A digits grid of the same methods and axes, one merge: runs in seconds on a CPU."""
    base = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_train_batches": 2,
            "limit_val_batches": 2,
            "strategy": {"class_path": "lightning_dimat.DIMATStrategy", "init_args": {"num_agents": 4}},
        },
        "model": {
            "class_path": "lightning_dimat.models.ImageClassifier",
            "init_args": {"model": "mlp", "model_options": {"in_features": 64, "hidden": [16]}},
        },
        "data": {"class_path": "lightning_dimat.data.DigitsDataModule", "init_args": {"batch_size": 16}},
    }
    merge = {"class_path": "lightning_dimat.MergeCallback"}
    methods = {
        "wa": {"label": "WA", "callbacks": [{**merge, "init_args": {"method": "average", "num_batches": 1}}]},
        "wa_int8": {
            "label": "WA, int8 exchange",
            "callbacks": [
                {**merge, "init_args": {"method": "average", "num_batches": 1, "compression": "int8"}}
            ],
        },
        "dimat": {
            "label": "DIMAT (shared basis)",
            "callbacks": [
                {**merge, "init_args": {"method": "activation", "num_batches": 1, "basis": "shared"}}
            ],
        },
    }
    grid = {
        "name": "network_smoke",
        "base": "base.yaml",
        "output_dir": str(folder / "out"),
        "pretrain_epochs": 1,
        "iterations": 1,
        "epochs_per_merge": 1,
        "methods": methods,
        "grids": [
            {
                "methods": ["wa", "dimat"],
                "topologies": ["ring", "one_peer_exponential", "random_matching"],
                "partitions": ["by_class"],
                "seeds": [0],
                "num_agents": [4],
            },
            {
                "methods": ["wa_int8"],
                "topologies": ["ring"],
                "partitions": ["by_class"],
                "seeds": [0],
                "num_agents": [4],
            },
        ],
    }
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    path = folder / "network_smoke.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="the experiment file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="edit it: key=value")
    parser.add_argument("--jobs", type=int, default=1, help="cells at a time, each in its own process")
    parser.add_argument("--report-only", action="store_true", help="no training: the finished cells only")
    parser.add_argument("--smoke", action="store_true", help="a tiny digits grid in a temporary folder")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        config = smoke_experiment(Path(scratch)) if args.smoke else args.config
        experiment = load_experiment(config, args.overrides)
        if not args.report_only:
            run_experiment(experiment, jobs=args.jobs)
        results = finished_results(experiment)
    if not results:
        raise SystemExit(f"{experiment.name}: no cell has finished yet; nothing to report.")
    rows = rows_of(experiment, results)
    print(table(rows), end="")
    output = args.output or (
        Path(tempfile.gettempdir()) / "network_smoke.json" if args.smoke else RESULTS / "network.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "benchmark": "network",
        "smoke": args.smoke,
        "experiment": experiment.name,
        "config": str(config.resolve().relative_to(ROOT))
        if config.resolve().is_relative_to(ROOT)
        else config.name,
        "overrides": args.overrides,
        # The commit when this script started: the code of the cells it ran (its workers import it then);
        # cells an earlier run left in the cache ran their own day's code, and --report-only runs none.
        "commit": MEASURED_CODE["commit"][:7],
        "iterations": experiment.iterations,
        "epochs_per_merge": experiment.epochs_per_merge,
        "cells": len(results),
        "rows": rows,
    }
    output.write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, output.with_suffix(".png"))
    print(f"saved {output}")


if __name__ == "__main__":
    main()
