"""Runs an experiment: the shared local pre-trainings first, then every cell, each cached by config hash."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_dimat.callbacks.metrics import communication_metrics
from lightning_dimat.cli import build_cli, finish_wandb_runs
from lightning_dimat.experiment.spec import Cell, Experiment, config_hash
from lightning_dimat.strategy import DIMATStrategy

MERGE_METRICS = (
    "merge/permuted_fraction",
    "merge/consensus_distance_before",
    "merge/consensus_distance_after",
)
"""What :class:`History` keeps of each iteration's merge."""


class History(Callback):
    """Every ``epochs_per_point`` epochs (when the runner validates), records the mean and per-agent
    ``metric`` and the communication so far. With ``before_merge=True`` it also records each local agent's
    validation accuracy after the epoch's last batch, before a merge callback placed after it runs: the
    accuracy the local training reached, next to the accuracy right after the merge."""

    def __init__(
        self, metric: str = "val_acc", epochs_per_point: int = 1, before_merge: bool = False
    ) -> None:
        self.metric = metric
        self.epochs_per_point = epochs_per_point
        self.before_merge = before_merge
        self.points: list[dict[str, Any]] = []
        self._before: list[float] | None = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.before_merge
            and trainer.is_last_batch
            and (trainer.current_epoch + 1) % self.epochs_per_point == 0
        ):
            strategy = trainer.strategy
            assert isinstance(strategy, DIMATStrategy) and strategy.swarm is not None
            loader = trainer.datamodule.val_dataloader()  # type: ignore[attr-defined]
            self._before = [_accuracy(agent, loader) for _, agent in strategy.swarm.items()]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics, epoch = trainer.callback_metrics, trainer.current_epoch + 1
        if self.metric not in metrics or epoch % self.epochs_per_point:  # no fresh validation this epoch
            return
        agents = sorted(
            _agent_order(k) for k in metrics if k.startswith("agent_") and k.endswith(f"/{self.metric}")
        )
        point: dict[str, Any] = {
            "epoch": epoch,
            "iteration": epoch / self.epochs_per_point,
            self.metric: float(metrics[self.metric]),
            "agents": [float(metrics[f"agent_{g}/{self.metric}"]) for g in agents],
        }
        for name in MERGE_METRICS:
            if name in metrics:  # this iteration's merge (logged at the merge, before this validation)
                point[name] = float(metrics[name])
        if self._before is not None:
            point[f"{self.metric}_before_merge"] = sum(self._before) / len(self._before)
            point["agents_before_merge"], self._before = self._before, None
        strategy = trainer.strategy
        for callback in trainer.callbacks:
            ledger = getattr(callback, "ledger", None)
            if ledger is not None:  # summed over processes (a collective: every process records)
                assert isinstance(strategy, DIMATStrategy)
                point.update(communication_metrics(ledger, strategy))
        self.points.append(point)


@torch.no_grad()
def _accuracy(agent: LightningModule, loader: Any) -> float:
    """Top-1 accuracy of ``agent`` on the ``(inputs, labels)`` batches of ``loader``, in eval mode."""
    was_training, correct, total = agent.training, 0, 0
    agent.eval()
    try:
        for inputs, labels in loader:
            logits = agent(inputs.to(agent.device))
            correct += int((logits.argmax(-1) == labels.to(agent.device)).sum())
            total += len(labels)
    finally:
        agent.train(was_training)
    return correct / max(total, 1)


def run_experiment(experiment: Experiment, jobs: int = 1) -> list[dict[str, Any]]:
    """Runs every missing pre-training and cell (``jobs`` at a time) and returns all cells' results.

    A cell found in ``experiment.archive_dir`` counts as finished unless the pre-trained agents it started
    from are on disk and differ; only the cells still to run get their pre-training run."""
    todo = [cell for cell in experiment.cells if not is_finished(experiment, "cell", cell)]
    pretrain_cells = {_pretrain_key(experiment, cell): cell for cell in todo}
    _run_all(experiment, [("pretrain", cell) for cell in pretrain_cells.values()], jobs)
    _run_all(experiment, [("cell", cell) for cell in experiment.cells], jobs)
    return [finished_result(experiment, cell) for cell in experiment.cells]


def finished_results(experiment: Experiment) -> list[dict[str, Any]]:
    """The results of the cells that have finished (of a grid still running, or stopped), in grid order."""
    return [
        finished_result(experiment, cell)
        for cell in experiment.cells
        if is_finished(experiment, "cell", cell)
    ]


def finished_result(experiment: Experiment, cell: Cell) -> dict[str, Any]:
    """``cell``'s result: the one in ``output_dir`` if it is still valid, else its archived copy."""
    result = _valid_result(experiment, cell)
    if result is None:
        raise FileNotFoundError(f"{cell} has not finished: no valid result and no archived copy.")
    return result


def _valid_result(experiment: Experiment, cell: Cell) -> dict[str, Any] | None:
    """``cell``'s result in ``output_dir`` if it started from the pre-trained agents on disk now (a re-run
    pre-training invalidates it); else its copy in ``archive_dir`` if those agents, when on disk, do not
    contradict it; else ``None``."""
    fingerprint = _pretrained_fingerprint(experiment, cell)
    local = _local_result(experiment, cell, fingerprint)
    if local is not None:
        return local
    archived = _read_cached(archive_path(experiment, cell)) if experiment.archive_dir else None
    if archived is None:
        return None
    # Without the pre-trained agents on disk, or a summary archived without their fingerprint, there is
    # nothing to hold an archived result against: it stands as recorded.
    recorded = archived.get("pretrained_fingerprint")
    return archived if fingerprint is None or recorded is None or recorded == fingerprint else None


def _pretrained_fingerprint(experiment: Experiment, cell: Cell) -> str | None:
    """The fingerprint of the pre-trained agents ``cell`` starts from now (``None``: not on disk)."""
    pretrained = _read_cached(pretrain_dir(experiment, cell) / "result.json")
    return pretrained.get("fingerprint") if pretrained is not None else None


def _local_result(experiment: Experiment, cell: Cell, fingerprint: str | None) -> dict[str, Any] | None:
    """``cell``'s result in ``output_dir`` if it started from the pre-trained agents of ``fingerprint``."""
    result = _read_cached(cell_dir(experiment, cell) / "result.json")
    valid = fingerprint is not None and result is not None
    return result if valid and result.get("pretrained_fingerprint") == fingerprint else None


def archive_path(experiment: Experiment, cell: Cell) -> Path:
    """The file in ``experiment.archive_dir`` that keeps ``cell``'s result (named like its cell folder).

    Raises:
        ValueError: if the experiment has no ``archive_dir``.
    """
    if experiment.archive_dir is None:
        raise ValueError(f"{experiment.name}: no archive_dir is set in the experiment file.")
    return experiment.archive_dir / f"{cell_dir(experiment, cell).name}.json"


def archive_finished(experiment: Experiment) -> int:
    """Copies every finished result in ``output_dir`` that the archive lacks or holds an older run of into
    ``experiment.archive_dir``; returns how many it wrote (0 without an archive)."""
    if experiment.archive_dir is None:
        return 0
    written = 0
    for cell in experiment.cells:
        local = _local_result(experiment, cell, _pretrained_fingerprint(experiment, cell))
        if local is not None and _read_cached(archive_path(experiment, cell)) != local:
            _write_atomically(archive_path(experiment, cell), json.dumps(local, indent=1))
            written += 1
    return written


def _run_all(experiment: Experiment, tasks: list[tuple[str, Cell]], jobs: int) -> None:
    todo = [(kind, cell) for kind, cell in tasks if not is_finished(experiment, kind, cell)]
    for kind, cell in tasks:
        if (kind, cell) not in todo:
            print(f"[{experiment.name}] cached {kind}: {_dir(experiment, kind, cell)}", flush=True)
    if jobs <= 1 or len(todo) <= 1:
        for kind, cell in todo:
            run_task(experiment, kind, cell)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(
        jobs, mp_context=get_context("spawn"), initializer=_limit_threads, initargs=(threads,)
    ) as pool:
        for future in [pool.submit(run_task, experiment, kind, cell) for kind, cell in todo]:
            future.result()


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_task(experiment: Experiment, kind: str, cell: Cell) -> Path:
    """Runs one pre-training (``kind="pretrain"``) or one cell and writes its ``result.json``."""
    folder = _dir(experiment, kind, cell)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "pretrain":
        config = experiment.pretrain_config(cell)
    else:
        pretrained = pretrain_dir(experiment, cell) / "agents.ckpt"
        config = experiment.cell_config(cell, str(pretrained) if experiment.pretrain_epochs else None)
    print(f"[{experiment.name}] running {kind}: {folder}", flush=True)
    started = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads only `config`, not this command's arguments
    try:
        cli = build_cli(args=copy.deepcopy(config), run=False)
    finally:
        sys.argv = argv
    epochs_per_point = experiment.epochs_per_merge if kind == "cell" else max(1, experiment.pretrain_epochs)
    history = History("val_acc", epochs_per_point, before_merge=kind == "cell")
    cli.trainer.callbacks.insert(0, history)  # before the merge callback: it sees the agents before a merge
    if kind == "cell":  # the consensus goes into your module at the end of fit, to be tested below
        assert isinstance(cli.trainer.strategy, DIMATStrategy)
        cli.trainer.strategy.export = "consensus"
    result: dict[str, Any] = {"kind": kind, "cell": cell.__dict__, "config": config}
    if kind == "pretrain" and experiment.pretrain_epochs == 0:
        result["history"] = []
    else:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        result["history"] = history.points
        if not history.points:
            raise RuntimeError(
                f"{folder}: no '{history.metric}' was logged at the end of any iteration; the experiment "
                "runner records the mean-agent 'val_acc' each iteration (log it in validation_step)."
            )
    if kind == "pretrain":
        if experiment.pretrain_epochs:
            cli.trainer.save_checkpoint(folder / "agents.ckpt")
        result["fingerprint"] = _fingerprint(folder / "agents.ckpt")
    else:
        tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        result["test_acc"] = float(tested["test_acc"])
        result["agents_test_acc"] = [
            float(tested[k])
            for k in sorted(tested, key=_agent_order)
            if k.startswith("agent_") and k.endswith("/test_acc")
        ]
        # After fit your module holds the strategy's export (the consensus by default): the model you ship.
        result["consensus_test_acc"] = _accuracy(cli.model, cli.datamodule.test_dataloader())
        pretrained = _read(pretrain_dir(experiment, cell) / "result.json")
        result["pretrained"], result["pretrained_fingerprint"] = (
            pretrained["history"],
            pretrained["fingerprint"],
        )
    finish_wandb_runs(cli.trainer)  # (runs share this process: each W&B run ends with its cell)
    result["wall_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=1)
    _write_atomically(folder / "result.json", text)
    if kind == "cell" and experiment.archive_dir is not None:
        _write_atomically(archive_path(experiment, cell), text)
    return folder


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that the file is complete, or absent (a killed run leaves no half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def is_finished(experiment: Experiment, kind: str, cell: Cell) -> bool:
    """Whether ``cell``'s run (``kind``: ``"pretrain"`` or ``"cell"``) has a result that is still valid: for a
    cell, one in ``output_dir`` that started from the pre-trained agents on disk now (a re-run pre-training
    invalidates it), or one in ``archive_dir`` that those agents, when on disk, do not contradict."""
    if kind == "pretrain":
        path = pretrain_dir(experiment, cell) / "result.json"
        if _read_cached(path) is None:
            return False
        checkpoint = path.parent / "agents.ckpt"
        if experiment.pretrain_epochs and not checkpoint.is_file():
            warnings.warn(f"{checkpoint} is missing: pre-training again.", stacklevel=2)
            return False
        return True
    return _valid_result(experiment, cell) is not None


def _read_cached(path: Path) -> dict[str, Any] | None:
    """A cached result, or ``None`` if it is absent or unreadable (then, with a warning, it runs again)."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        warnings.warn(f"{path} is truncated or corrupt ({error}): running it again.", stacklevel=3)
        return None
    return result if isinstance(result, dict) else None


def check_experiment(experiment: Experiment) -> dict[str, int]:
    """Builds every distinct run's config the way the runner will (classes, names and types checked by
    the CLI) and checks that each run's data exists, before any work; returns the counts of pre-training
    and grid runs, and of those still to run.

    Raises:
        ValueError: naming the run and what is wrong, for the first config that cannot be built or whose
            data is missing.
    """
    configs: dict[Any, tuple[str, dict[str, Any]]] = {}
    for cell in experiment.cells:  # a seed changes no class, name or type: one build per other axes
        axes = (cell.method, cell.topology, cell.partition, cell.num_agents)
        configs.setdefault(
            ("pretrain", *axes[1:]), (f"pre-training of {cell}", experiment.pretrain_config(cell))
        )
        configs.setdefault(axes, (str(cell), experiment.cell_config(cell, None)))
    for name, config in configs.values():
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            cli = build_cli(args=copy.deepcopy(config), run=False, exit_on_error=False)
        except Exception as error:
            raise ValueError(f"{experiment.name}: the config of {name} cannot be built: {error}") from error
        finally:
            sys.argv = argv
        missing = getattr(cli.datamodule, "missing_data", lambda: None)()
        if missing:
            raise ValueError(f"{experiment.name}: {name}: {missing}.")
    pretrain_cells = {_pretrain_key(experiment, cell): cell for cell in experiment.cells}
    return {
        "pretrain_runs": len(pretrain_cells),
        "pretrain_to_run": sum(not is_finished(experiment, "pretrain", c) for c in pretrain_cells.values()),
        "grid_runs": len(experiment.cells),
        "grid_to_run": sum(not is_finished(experiment, "cell", c) for c in experiment.cells),
    }


def _fingerprint(checkpoint: Path) -> str:
    """SHA-256 of the pre-trained agents' file ("none" without pre-training)."""
    if not checkpoint.is_file():
        return "none"
    digest = hashlib.sha256()
    with checkpoint.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _agent_order(key: str) -> int:
    return int(key.split("/")[0][6:]) if key.startswith("agent_") else -1


def _pretrain_key(experiment: Experiment, cell: Cell) -> str:
    return config_hash(experiment.pretrain_config(cell))


def pretrain_dir(experiment: Experiment, cell: Cell) -> Path:
    """Where the pre-trained agents of ``cell`` (shared by all its methods and topologies) are kept."""
    name = f"{cell.partition}-n{cell.num_agents}-s{cell.seed}-{_pretrain_key(experiment, cell)}"
    return experiment.output_dir / "pretrain" / name


def cell_dir(experiment: Experiment, cell: Cell) -> Path:
    """Where ``cell``'s result is kept; the name ends with the hash of its full config."""
    key = config_hash(experiment.cell_config(cell, str(pretrain_dir(experiment, cell))))
    name = f"{cell.method}-{cell.topology}-{cell.partition}-n{cell.num_agents}-s{cell.seed}-{key}"
    return experiment.output_dir / "cells" / name


def _dir(experiment: Experiment, kind: str, cell: Cell) -> Path:
    return pretrain_dir(experiment, cell) if kind == "pretrain" else cell_dir(experiment, cell)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
