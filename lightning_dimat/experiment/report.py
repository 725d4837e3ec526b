"""Tables (Markdown and CSV, mean ± std over seeds) and plots of accuracy against iterations and rounds."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_dimat.experiment.spec import Cell, Experiment

Results = list[dict[str, Any]]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _by_group(experiment: Experiment, results: Results) -> dict[tuple[int, str, str], dict[str, Results]]:
    groups: dict[tuple[int, str, str], dict[str, Results]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        cell = Cell(**result["cell"])
        groups[cell.group][cell.method].append(result)
    return groups


def final_accuracy(result: dict[str, Any]) -> float | None:
    """The agents' mean test accuracy at the end of the run (after the last merge)."""
    return result["test_acc"]


def before_last_merge(result: dict[str, Any]) -> float | None:
    """The agents' mean accuracy on the validation split just before the last merge (``None`` if unknown)."""
    return (result["history"] or [{}])[-1].get("val_acc_before_merge")


def consensus_accuracy(result: dict[str, Any]) -> float | None:
    """Test accuracy of the module you hold after ``fit`` (the exported consensus; ``None`` if unknown)."""
    return result.get("consensus_test_acc")


def accuracy_table(
    experiment: Experiment,
    results: Results,
    value: Callable[[dict[str, Any]], float | None] = final_accuracy,
) -> tuple[list[str], list[list[str]]]:
    """Rows (agents, topology, partition) × method columns of ``value`` (default: the final mean-agent test
    accuracy) in %, mean ± std over the seeds that have it."""
    methods = [name for name in experiment.methods if any(r["cell"]["method"] == name for r in results)]
    header = ["agents", "topology", "data", *(experiment.methods[m].label for m in methods)]
    rows = []
    for (num_agents, topology, partition), by_method in sorted(_by_group(experiment, results).items()):
        row = [str(num_agents), topology, partition]
        for method in methods:
            values = [100 * v for v in map(value, by_method.get(method, [])) if v is not None]
            if len(values) > 1:
                mean, std = _mean_std(values)
                row.append(f"{mean:.2f} ± {std:.2f} (n={len(values)})")
            elif values:
                row.append(f"{values[0]:.2f} (n=1)")
            else:
                row.append("—")
        rows.append(row)
    return header, rows


def communication_table(experiment: Experiment, results: Results) -> tuple[list[str], list[list[str]]]:
    """Per method, agents, topology and partition, per agent over the whole run (mean over seeds): rounds,
    MB sent and extra forward samples."""
    header = [
        "method",
        "agents",
        "topology",
        "data",
        "rounds / agent",
        "MB sent / agent",
        "extra forwards / agent",
    ]
    runs: dict[tuple[str, int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        cell = Cell(**result["cell"])
        runs[(cell.method, cell.num_agents, cell.topology, cell.partition)].append(result["history"][-1])
    rows = []
    for (method, num_agents, topology, partition), lasts in sorted(runs.items()):

        def mean(name: str, lasts: list[dict[str, Any]] = lasts) -> float:
            return statistics.fmean(last.get(name, 0.0) for last in lasts)

        rows.append(
            [
                experiment.methods[method].label,
                str(num_agents),
                topology,
                partition,
                f"{mean('comm/rounds'):.0f}",
                f"{mean('comm/bytes_sent') / num_agents / 1e6:.1f}",
                f"{mean('comm/forward_samples') / num_agents:.0f}",
            ]
        )
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def curves(result: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(iteration, communication rounds, mean-agent accuracy), from the pre-trained point on; where the
    accuracy before a merge was recorded, it comes first at the same x (a merge is a vertical step)."""
    points = [(0.0, 0.0, p["val_acc"]) for p in result.get("pretrained", [])[-1:]]
    for p in result["history"]:
        rounds = p.get("comm/rounds", 0.0)
        if "val_acc_before_merge" in p:
            points.append((p["iteration"], rounds, p["val_acc_before_merge"]))
        points.append((p["iteration"], rounds, p["val_acc"]))
    return points


def with_curves(experiment: Experiment, results: Results) -> Results:
    """The results that kept a point for every iteration (an archived summary may hold only the last)."""
    return [result for result in results if len(result["history"]) >= experiment.iterations]


def plot(experiment: Experiment, results: Results, path: Path, x_axis: str) -> None:
    """One panel per (agents, topology, partition): every method's mean over seeds against ``x_axis``
    (``"iteration"`` or ``"rounds"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(_by_group(experiment, with_curves(experiment, results)).items())
    if not groups:
        raise ValueError(f"No results to plot for experiment {experiment.name!r}.")
    # Ten colours, then the same ten dashed, dotted, ...: every method keeps a style of its own.
    styles = {
        name: {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}
        for index, name in enumerate(experiment.methods)
    }
    columns = min(4, len(groups))
    rows = (len(groups) + columns - 1) // columns
    panels_height = 3.4 * rows  # inches
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, panels_height), squeeze=False)
    for axis, ((num_agents, topology, partition), by_method) in zip(axes.flat, groups, strict=False):
        for method, runs in by_method.items():
            series = [curves(run) for run in runs]
            length = min(len(s) for s in series)
            xs = [
                statistics.fmean(s[i][0 if x_axis == "iteration" else 1] for s in series)
                for i in range(length)
            ]
            ys = [100 * statistics.fmean(s[i][2] for s in series) for i in range(length)]
            axis.plot(xs, ys, marker=".", label=experiment.methods[method].label, **styles[method])
        axis.set_title(f"{topology}, {partition}, {num_agents} agents", fontsize=10)
        axis.set_xlabel("iteration" if x_axis == "iteration" else "communication rounds per agent")
        if x_axis == "rounds":
            axis.set_xscale("symlog", linthresh=1)
        axis.set_ylabel("mean-agent test accuracy (%)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(groups) :]:
        axis.axis("off")
    handles = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    order = [experiment.methods[name].label for name in experiment.methods]
    labels = [label for label in order if label in handles]
    legend_columns = max(1, min(len(labels), columns * 4 // 3))
    legend_rows = -(-len(labels) // legend_columns)
    # The legend gets its own strip below the panels (0.3 inch per row), so it never covers an axis label.
    legend_height = 0.3 * legend_rows + 0.15
    figure.set_figheight(panels_height + legend_height)
    figure.legend(
        [handles[label] for label in labels], labels, loc="lower center", ncol=legend_columns, frameon=False
    )
    figure.tight_layout(rect=(0, legend_height / figure.get_figheight(), 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plotted_note(experiment: Experiment, results: Results) -> str:
    plotted = len(with_curves(experiment, results))
    if plotted == len(results):
        return ""
    return (
        f"\nThe plots show {plotted} of these {len(results)} runs: the others are archived summaries "
        "without their per-iteration history.\n"
    )


def write_report(experiment: Experiment, results: Results) -> dict[str, Path]:
    """Writes results.md, results.csv, accuracy_vs_iteration.png and accuracy_vs_rounds.png (the plots only
    when some result kept its per-iteration history); returns their paths."""
    out = experiment.output_dir
    out.mkdir(parents=True, exist_ok=True)
    header, rows = accuracy_table(experiment, results)
    comm_header, comm_rows = communication_table(experiment, results)
    paths = {
        "markdown": out / "results.md",
        "csv": out / "results.csv",
        "iteration_plot": out / "accuracy_vs_iteration.png",
        "rounds_plot": out / "accuracy_vs_rounds.png",
    }
    sections = [
        ("Mean-agent accuracy just before the last merge (%, validation split)", before_last_merge),
        (
            "Test accuracy of the exported module you hold after fit (%, consensus by default)",
            consensus_accuracy,
        ),
    ]
    extra = ""
    for title, value in sections:
        extra_header, extra_rows = accuracy_table(experiment, results, value)
        extra += f"\n{title}\n\n" + markdown(extra_header, extra_rows)
    paths["markdown"].write_text(
        f"# {experiment.name}\n\nFinal mean-agent test accuracy (%), mean ± std over seeds\n\n"
        + markdown(header, rows)
        + extra
        + "\nCommunication per agent over the whole run (after pre-training)\n\n"
        + markdown(comm_header, comm_rows)
        + _plotted_note(experiment, results)
    )
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "agents",
                "topology",
                "partition",
                "seed",
                "test_acc",
                "before_last_merge",
                "consensus_test_acc",
                "rounds",
                "bytes_sent",
                "forward_samples",
            ]
        )
        for result in results:
            cell, last = result["cell"], (result["history"] or [{}])[-1]
            writer.writerow(
                [
                    cell["method"],
                    cell["num_agents"],
                    cell["topology"],
                    cell["partition"],
                    cell["seed"],
                    result["test_acc"],
                    before_last_merge(result),
                    consensus_accuracy(result),
                    last.get("comm/rounds", 0),
                    last.get("comm/bytes_sent", 0),
                    last.get("comm/forward_samples", 0),
                ]
            )
    if not with_curves(experiment, results):  # archived summaries only: nothing to draw
        del paths["iteration_plot"], paths["rounds_plot"]
        return paths
    plot(experiment, results, paths["iteration_plot"], "iteration")
    plot(experiment, results, paths["rounds_plot"], "rounds")
    return paths
