"""``AgentReport``: per-agent accuracy curves (PNG + JSON) and a per-agent test table, with the consensus."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from lightning_dimat.callbacks.merge import MergeCallback
from lightning_dimat.swarm.log_routing import CONSENSUS_PREFIX

_AGENT_KEY = re.compile(r"^agent_(\d+)/(.+)$")


def agent_values(metrics: dict[str, Any], name: str) -> dict[int, float]:
    """``{agent id: value}`` of ``agent_<g>/<name>`` entries in ``metrics``."""
    values = {}
    for key, value in metrics.items():
        match = _AGENT_KEY.match(key)
        if match and match.group(2) == name:
            values[int(match.group(1))] = float(value)
    return dict(sorted(values.items()))


def format_table(values: dict[int, float], name: str, consensus: float | None = None) -> str:
    """A small text table: one row per agent, the mean, and the consensus when given.

    Examples:
        >>> print(format_table({0: 0.5, 1: 0.7}, "test_acc", consensus=0.75))
            agent | test_acc
        ----------+---------
                0 |   0.5000
                1 |   0.7000
        ----------+---------
             mean |   0.6000
        consensus |   0.7500
    """
    width, label = max(len(name), 8), 9
    rule = f"{'-' * label}-+-{'-' * width}"
    lines = [f"{'agent':>{label}} | {name:>{width}}", rule]
    lines += [f"{agent_id:>{label}} | {value:>{width}.4f}" for agent_id, value in values.items()]
    mean = sum(values.values()) / len(values)
    lines += [rule, f"{'mean':>{label}} | {mean:>{width}.4f}"]
    if consensus is not None:
        lines.append(f"{'consensus':>{label}} | {consensus:>{width}.4f}")
    return "\n".join(lines)


class AgentReport(Callback):
    """Records each agent's validation metric per epoch; after fit writes a plot, after test prints a table.

    The table ends with the agents' mean and, after ``fit`` with ``export="consensus"``, the accuracy of the
    consensus your module holds (``consensus/<test_metric>``).

    Args:
        monitor: the per-epoch metric to plot (logged by the module as ``monitor``).
        test_metric: the test metric to tabulate.
        output_dir: where ``<name>.png``, ``<name>.json`` and ``<name>_test.json`` are written; by default
            the logger's versioned folder (``trainer.log_dir``, e.g. ``outputs/quickstart/version_3``), so
            runs never overwrite each other. Without a logger and without ``output_dir`` nothing is written
            (the table is still printed).
        name: file stem of the outputs.

    Examples:
        >>> report = AgentReport(monitor="val_acc", test_metric="test_acc")
    """

    def __init__(
        self,
        monitor: str = "val_acc",
        test_metric: str = "test_acc",
        output_dir: str | None = None,
        name: str = "accuracy",
    ) -> None:
        self.monitor = monitor
        self.test_metric = test_metric
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.name = name
        self.history: list[dict[str, Any]] = []
        self.test_results: dict[int, float] = {}
        self.consensus_result: float | None = None
        self.directory: Path | None = self.output_dir
        """Where this run's files go (resolved at ``setup``: ``output_dir`` or the logger's folder)."""

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, name=self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The curves recorded so far, so that a resumed run's plot starts at epoch 0, not at the resume."""
        return {"history": [{"epoch": p["epoch"], "agents": dict(p["agents"])} for p in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [
            {"epoch": int(p["epoch"]), "agents": {int(g): float(v) for g, v in p["agents"].items()}}
            for p in state_dict.get("history", [])
        ]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolves this run's folder: ``output_dir``, else the logger's versioned folder, else none."""
        if self.output_dir is not None:
            self.directory = self.output_dir
        elif trainer.loggers and trainer.log_dir is not None:
            self.directory = Path(trainer.log_dir)
        else:
            self.directory = None

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Records every agent's value of ``monitor`` for this epoch."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = agent_values(trainer.callback_metrics, self.monitor)
        if values:
            self.history.append({"epoch": trainer.current_epoch, "agents": values})

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Writes the per-agent curves (JSON and PNG)."""
        if self.history and self.directory is not None:
            path = self.write(self._merge_epochs(trainer))
            rank_zero_info(f"AgentReport: {self.monitor} per agent plotted in {path}")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Prints and writes the per-agent test table (with the consensus when it was evaluated)."""
        self.test_results = agent_values(trainer.callback_metrics, self.test_metric)
        consensus = trainer.callback_metrics.get(f"{CONSENSUS_PREFIX}/{self.test_metric}")
        self.consensus_result = None if consensus is None else float(consensus)
        if self.test_results:
            self._print(self.test_results, self.consensus_result)
            if self.directory is not None:
                self._write_test(self.test_results, self.consensus_result)

    @rank_zero_only
    def _write_test(self, values: dict[int, float], consensus: float | None) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "metric": self.test_metric,
            "agents": values,
            "mean": sum(values.values()) / len(values),
            "consensus": consensus,
        }
        (self.directory / f"{self.name}_test.json").write_text(json.dumps(record, indent=2))

    @rank_zero_only
    def _print(self, values: dict[int, float], consensus: float | None) -> None:
        table = format_table(values, self.test_metric, consensus)
        print(f"\nPer-agent {self.test_metric}:\n{table}\n", flush=True)

    @staticmethod
    def _merge_epochs(trainer: Trainer) -> list[int]:
        for callback in trainer.callbacks:
            if isinstance(callback, MergeCallback):
                return list(callback.merged_epochs)
        return []

    @rank_zero_only
    def write(self, merge_epochs: list[int]) -> Path:
        """Writes ``<name>.json`` and ``<name>.png``; returns the PNG path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"monitor": self.monitor, "merge_epochs": merge_epochs, "history": self.history}
        (self.directory / f"{self.name}.json").write_text(json.dumps(record, indent=2))
        epochs = [entry["epoch"] + 1 for entry in self.history]
        agent_ids = sorted({agent_id for entry in self.history for agent_id in entry["agents"]})
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for agent_id in agent_ids:
            series = [entry["agents"].get(agent_id, float("nan")) for entry in self.history]
            axes.plot(epochs, series, marker="o", markersize=3, linewidth=1, label=f"agent {agent_id}")
        mean = [sum(entry["agents"].values()) / len(entry["agents"]) for entry in self.history]
        axes.plot(epochs, mean, color="black", linewidth=2.5, label="mean")
        for index, epoch in enumerate(merge_epochs):
            axes.axvline(
                epoch + 1, color="grey", linestyle=":", linewidth=1, label="merge" if index == 0 else None
            )
        axes.set_xlabel("epoch")
        axes.set_ylabel(self.monitor)
        axes.set_title(f"{self.monitor} per agent")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, ncol=2)
        figure.tight_layout()
        path = self.directory / f"{self.name}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path
