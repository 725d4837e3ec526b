"""Experiment grids: ``lightning-dimat experiment configs/cpu/grid.yaml [--jobs 2] [--set key=value ...]``.

Methods × topologies × data partitions × seeds × numbers of agents, all starting from the same locally
pre-trained agents per (partition, seed, agents); each finished run is cached by the hash of its config
(and, with ``archive_dir`` set, copied there: tracked results that a fresh checkout reports and skips);
the report is a Markdown/CSV table of mean ± std final test accuracy and plots against iterations and
communication rounds.
"""

from __future__ import annotations

import argparse

from lightning_dimat.experiment.report import write_report
from lightning_dimat.experiment.runner import (
    History,
    archive_finished,
    cell_dir,
    check_experiment,
    finished_results,
    run_experiment,
)
from lightning_dimat.experiment.spec import Cell, Experiment, Method, load_experiment

__all__ = [
    "Cell",
    "Experiment",
    "History",
    "Method",
    "archive_finished",
    "check_experiment",
    "finished_results",
    "load_experiment",
    "main",
    "run_experiment",
    "write_report",
]


def main(argv: list[str] | None = None) -> None:
    """``lightning-dimat experiment FILE [--jobs N] [--set dotted.key=value ...]``."""
    parser = argparse.ArgumentParser(prog="lightning-dimat experiment", description=__doc__)
    parser.add_argument("file", help="an experiment YAML file, e.g. configs/cpu/grid.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="edit the file: key=value"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the whole grid (names, types, data) and list its runs, without training",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the runs that have finished, without running anything",
    )
    args = parser.parse_args(argv)
    experiment = load_experiment(args.file, args.overrides)
    if experiment.archive_dir is not None and not args.dry_run:
        copied = archive_finished(experiment)  # results of runs made before the archive, or by older code
        if copied:
            print(f"{copied} finished results copied into {experiment.archive_dir}.")
    if args.report_only:
        finished = finished_results(experiment)
        if not finished:
            raise SystemExit(f"{experiment.name}: no run has finished yet; nothing to report.")
        paths = write_report(experiment, finished)
        print(paths["markdown"].read_text())
        print(f"{len(finished)} of {len(experiment.cells)} grid runs reported; the rest have not finished.")
        return
    counts = check_experiment(experiment)  # everything checked before any work
    if args.dry_run:
        for cell in experiment.cells:
            print(cell_dir(experiment, cell))
        print(
            f"{counts['pretrain_runs']} pre-training runs ({counts['pretrain_to_run']} to run), "
            f"{counts['grid_runs']} grid runs ({counts['grid_to_run']} to run): the grid checks out."
        )
        return
    results = run_experiment(experiment, jobs=args.jobs)
    paths = write_report(experiment, results)
    print(paths["markdown"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")
