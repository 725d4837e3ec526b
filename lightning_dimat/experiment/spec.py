"""The experiment file: a base ``fit`` config, named methods and a grid of cells to run them on.

Example (``configs/cpu/grid.yaml``)::

    name: cpu_grid
    base: base.yaml                 # a `lightning-dimat fit` config, relative to this file
    output_dir: outputs/experiments/cpu_grid
    archive_dir: docs/results/cpu_grid   # optional: every finished cell's result, kept under version control
    pretrain_epochs: 10             # local epochs before any communication, shared by every method
    iterations: 6                   # merge iterations after pre-training ...
    epochs_per_merge: 1             # ... of this many local epochs each
    methods:
      dimat:
        label: DIMAT
        callbacks: [{class_path: lightning_dimat.MergeCallback, init_args: {method: activation}}]
      cdsgd:
        label: CDSGD
        model: {optimizer: sgd}     # overrides of the model's init_args for this method
        callbacks: [{class_path: lightning_dimat.CDSGDCallback}]
    grids:
      - {methods: [dimat, cdsgd], topologies: [ring], partitions: [by_class], seeds: [0, 1], num_agents: [5]}
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_dimat.partition import PARTITIONS
from lightning_dimat.topology.graphs import GRAPHS
from lightning_dimat.topology.schedule import SCHEDULES
from lightning_dimat.validation import check_int

GRID_AXES = ("methods", "topologies", "partitions", "seeds", "num_agents")
TOP_LEVEL_KEYS = (
    "name",
    "base",
    "output_dir",
    "archive_dir",
    "base_overrides",
    "pretrain_epochs",
    "iterations",
    "epochs_per_merge",
    "methods",
    "grids",
)
MERGE_CALLBACK = "lightning_dimat.MergeCallback"


def _refuse_unknown(keys: Any, known: tuple[str, ...], where: str) -> None:
    """A ``ValueError`` for keys outside ``known``, with the closest known key for each (typos)."""
    unknown = [key for key in keys if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{where} has unknown keys {', '.join(hints)}; known keys: {list(known)}.")


def _importable(class_path: str, where: str) -> None:
    module_name, _, name = class_path.rpartition(".")
    try:
        found = hasattr(importlib.import_module(module_name), name) if module_name else False
    except ImportError:
        found = False
    if not found:
        raise ValueError(f"{where}: class_path {class_path!r} cannot be imported; check its spelling.")


@dataclass(frozen=True)
class Method:
    """One named method: the callbacks it adds to the base config and its model overrides."""

    name: str
    label: str
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a method on a topology, a data partition, a seed and a number of agents."""

    method: str
    topology: str
    partition: str
    seed: int
    num_agents: int

    @property
    def group(self) -> tuple[int, str, str]:
        """The table row the cell belongs to (seeds are averaged within it)."""
        return (self.num_agents, self.topology, self.partition)


@dataclass
class Experiment:
    """A parsed, validated experiment file (see the module docstring)."""

    name: str
    base: dict[str, Any]
    output_dir: Path
    pretrain_epochs: int
    iterations: int
    epochs_per_merge: int
    methods: dict[str, Method]
    cells: list[Cell]
    archive_dir: Path | None = None
    """Where a copy of every finished cell's result is kept (tracked files that outlive ``output_dir``)."""

    # ------------------------------------------------------------- configs
    def pretrain_config(self, cell: Cell) -> dict[str, Any]:
        """The ``fit`` config of the local pre-training shared by every method and topology of ``cell``."""
        config = self._with_run(cell, epochs=self.pretrain_epochs)
        strategy = config["trainer"]["strategy"]["init_args"]
        strategy["topology"] = "fully_connected"  # unused: nothing is exchanged while pre-training
        strategy.pop("topology_options", None)
        strategy.pop("mixing_rule", None)
        config["trainer"]["check_val_every_n_epoch"] = max(1, self.pretrain_epochs)
        return config

    def cell_config(self, cell: Cell, init_from: str | None) -> dict[str, Any]:
        """The ``fit`` config of ``cell``: the base, the cell's axes, the method's callbacks and overrides."""
        method = self.methods[cell.method]
        config = self._with_run(cell, epochs=self.iterations * self.epochs_per_merge)
        config["trainer"]["strategy"]["init_args"]["init_from"] = init_from
        config["trainer"]["check_val_every_n_epoch"] = self.epochs_per_merge
        _merge_into(config["model"].setdefault("init_args", {}), method.model)
        callbacks = copy.deepcopy(method.callbacks)
        for callback in callbacks:
            if callback.get("class_path") == MERGE_CALLBACK:
                callback.setdefault("init_args", {})["every_n_epochs"] = self.epochs_per_merge
        config["trainer"]["callbacks"] = [*config["trainer"].get("callbacks", []), *callbacks]
        return config

    def _with_run(self, cell: Cell, epochs: int) -> dict[str, Any]:
        config = copy.deepcopy(self.base)
        config["seed_everything"] = cell.seed
        trainer = config.setdefault("trainer", {})
        trainer["max_epochs"] = epochs
        trainer["logger"] = False
        trainer["enable_checkpointing"] = False
        trainer.setdefault("callbacks", [])
        strategy = trainer["strategy"].setdefault("init_args", {})
        strategy.update(
            num_agents=cell.num_agents,
            topology=cell.topology,
            partition=cell.partition,
            seed=cell.seed,
            export="none",
        )
        return config


def _merge_into(target: dict[str, Any], changes: dict[str, Any]) -> None:
    """Recursively applies ``changes`` to ``target`` (nested mappings are merged, not replaced)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a config (what the cache of finished runs is keyed by)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Reads and validates an experiment file; ``overrides`` are ``dotted.key=yaml_value`` edits of it.

    Examples:
        >>> experiment = load_experiment("configs/cpu/grid.yaml")
        >>> len(experiment.cells), experiment.cells[0]
        (66, Cell(method='dimat', topology='fully_connected', partition='iid', seed=0, num_agents=5))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Experiment file '{path}' not found.")
    raw = yaml.safe_load(path.read_text()) or {}
    for override in overrides or []:
        _apply_override(raw, override)
    if not isinstance(raw, dict):
        raise ValueError(f"Experiment file '{path}' must be a mapping, got {type(raw).__name__}.")
    _refuse_unknown(raw, TOP_LEVEL_KEYS, f"Experiment file '{path}'")
    required = ("name", "base", "methods", "grids")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"Experiment file '{path}' lacks {missing}; it needs {list(required)}.")
    base_path = (path.parent / raw["base"]).resolve()
    if not base_path.is_file():
        raise FileNotFoundError(f"'{path}': base config '{raw['base']}' not found at '{base_path}'.")
    base = yaml.safe_load(base_path.read_text()) or {}
    for override in raw.get("base_overrides", []) or []:
        _apply_override(base, override)
    if "strategy" not in base.get("trainer", {}):
        raise ValueError(f"The base config '{base_path}' needs trainer.strategy (a DIMATStrategy).")
    methods = {name: _method(name, entry, path) for name, entry in raw["methods"].items()}
    cells = _cells(raw["grids"], methods, path)
    numbers = {key: raw.get(key, default) for key, default in _NUMBERS.items()}
    for key, value in numbers.items():
        numbers[key] = check_int(f"'{path}': {key}", value, minimum=0 if key == "pretrain_epochs" else 1)
    return Experiment(
        name=str(raw["name"]),
        base=base,
        output_dir=Path(raw.get("output_dir", f"outputs/experiments/{raw['name']}")),
        methods=methods,
        cells=cells,
        archive_dir=Path(raw["archive_dir"]) if raw.get("archive_dir") else None,
        **numbers,
    )


_NUMBERS = {"pretrain_epochs": 0, "iterations": 1, "epochs_per_merge": 1}


def _method(name: str, entry: Any, path: Path) -> Method:
    if not isinstance(entry, dict):
        raise ValueError(f"'{path}': method {name!r} must be a mapping with callbacks/model/label.")
    _refuse_unknown(entry, ("label", "callbacks", "model"), f"'{path}': method {name!r}")
    callbacks = list(entry.get("callbacks") or [])
    for callback in callbacks:
        if not isinstance(callback, dict) or "class_path" not in callback:
            raise ValueError(
                f"'{path}': each callback of method {name!r} needs a class_path, got {callback!r}."
            )
        _importable(str(callback["class_path"]), f"'{path}': method {name!r}")
        every = (callback.get("init_args") or {}).get("every_n_epochs")
        if callback["class_path"] == MERGE_CALLBACK and every is not None:
            raise ValueError(
                f"'{path}': method {name!r} sets MergeCallback every_n_epochs={every}; the runner sets it "
                "from epochs_per_merge (one merge per iteration). Remove it."
            )
    return Method(name, str(entry.get("label", name)), callbacks, dict(entry.get("model") or {}))


def _cells(grids: Any, methods: dict[str, Method], path: Path) -> list[Cell]:
    if not isinstance(grids, list) or not grids:
        raise ValueError(f"'{path}': grids must be a non-empty list of mappings with keys {GRID_AXES}.")
    cells: list[Cell] = []
    for index, grid in enumerate(grids):
        where = f"'{path}': grids[{index}]"
        if not isinstance(grid, dict):
            raise ValueError(f"{where} must be a mapping with keys {GRID_AXES}, got {grid!r}.")
        _refuse_unknown(grid, GRID_AXES, where)
        missing = [axis for axis in GRID_AXES if not grid.get(axis)]
        if missing:
            raise ValueError(f"{where} lacks (or has empty) {missing}; give lists for {GRID_AXES}.")
        not_lists = [axis for axis in GRID_AXES if not isinstance(grid[axis], list)]
        if not_lists:
            raise ValueError(f"{where}: {not_lists} must be lists, e.g. seeds: [0, 1, 2].")
        unknown = [name for name in grid["methods"] if name not in methods]
        if unknown:
            raise ValueError(f"{where} names methods {unknown} not defined under methods.")
        for name in grid["topologies"]:
            if name not in GRAPHS and name not in SCHEDULES:
                raise ValueError(
                    f"{where}: unknown topology {name!r} in topologies; known graphs: {GRAPHS.names()}, "
                    f"schedules (a graph per round): {SCHEDULES.names()}."
                )
        for name in grid["partitions"]:
            if name not in PARTITIONS:
                raise ValueError(
                    f"{where}: unknown {PARTITIONS.kind} {name!r} in partitions; known: {PARTITIONS.names()}."
                )
        seeds = [check_int(f"{where}: seed", seed, minimum=0) for seed in grid["seeds"]]
        sizes = [check_int(f"{where}: num_agents", size, minimum=2) for size in grid["num_agents"]]
        axes = (grid["methods"], grid["topologies"], grid["partitions"], seeds, sizes)
        for method, topology, partition, seed, num_agents in itertools.product(*axes):
            cell = Cell(method, str(topology), str(partition), seed, num_agents)
            if cell not in cells:
                cells.append(cell)
    return cells


def _apply_override(config: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ValueError(f"Override {override!r} must look like dotted.key=value.")
    key, value = override.split("=", 1)
    *parents, leaf = key.split(".")
    target = config
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = yaml.safe_load(value)
