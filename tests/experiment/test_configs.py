"""Every YAML config under ``configs/`` loads and builds: experiment grids cell by cell, and fit configs.

Nothing here reads a data set or trains: ``build_cli(..., run=False)`` only constructs the Trainer (with its
DIMATStrategy and callbacks), the LightningModule and the DataModule. The agents themselves are copied from
the module at fit time, so even 40 agents cost one model here.

The paper configs ask for ``accelerator: gpu``; without CUDA the tests switch them to ``cpu`` and full
precision (``32-true``) before building, so the same configs are checked on a CPU-only machine.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.cli import DIMATCLI, build_cli
from lightning_dimat.experiment import Cell, Experiment, load_experiment
from lightning_dimat.partition import partition
from lightning_dimat.topology import Topology, build_schedule

ROOT = Path(__file__).resolve().parents[2]  # tests/experiment/ → the checkout
CONFIG_DIR = ROOT / "configs"
ALL_CONFIGS = sorted(CONFIG_DIR.glob("**/*.yaml"))
MERGE_PATH = "lightning_dimat.MergeCallback"
GPU_NAMES = ("gpu", "cuda")
PAPER_SEEDS = [0, 1, 2, 3, 4]


def _load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


EXPERIMENTS = [path for path in ALL_CONFIGS if "grids" in _load_yaml(path)]
FIT_CONFIGS = [path for path in ALL_CONFIGS if "trainer" in _load_yaml(path)]
PAPER_EXPERIMENTS = [path for path in EXPERIMENTS if path.parent == CONFIG_DIR / "paper"]


def _short_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _header(path: Path) -> list[str]:
    """The comment lines at the top of a YAML file, without their ``#``."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def _needs_cpu(trainer: dict[str, Any]) -> bool:
    """Whether a ``trainer`` config asks for a GPU that this machine does not have."""
    return str(trainer.get("accelerator", "auto")) in GPU_NAMES and not torch.cuda.is_available()


def _on_cpu_if_needed(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` switched to CPU and full precision when it asks for a GPU and this machine has none."""
    trainer = config.setdefault("trainer", {})
    if _needs_cpu(trainer):
        trainer["accelerator"] = "cpu"
        trainer["precision"] = "32-true"
    return config


def _build(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, meta: bool = False) -> DIMATCLI:
    """Parses and instantiates ``config`` as the experiment runner does (``run=False``).

    With ``meta`` the tensors are created on PyTorch's meta device: every class is still constructed, but
    no weight is allocated or initialized, which keeps building dozens of large networks cheap.
    """
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # the CLI must read only `config`
    if not meta:
        return build_cli(args=copy.deepcopy(config), run=False)
    with torch.device("meta"):
        return build_cli(args=copy.deepcopy(config), run=False)


def _callback_names(cli: DIMATCLI) -> set[str]:
    return {type(callback).__name__ for callback in cli.trainer.callbacks}


def _covering_cells(cells: list[Cell]) -> Iterator[Cell]:
    """Cells in which every method, topology, partition and number of agents of the grid appears.

    A cell's config is the base plus its method's callbacks and model overrides plus its agents, topology,
    partition and seed, each set on its own; building every value of every axis once covers them all with a
    handful of builds (each takes ~0.1-0.2 s) instead of all 24 (method, agents, topology, partition) of a
    paper grid.
    """
    seen: set[tuple[str, object]] = set()
    for cell in cells:
        values = {
            ("method", cell.method),
            ("agents", cell.num_agents),
            ("topology", cell.topology),
            ("partition", cell.partition),
        }
        if not values <= seen:
            seen |= values
            yield cell


def _one_per_pretraining(cells: list[Cell]) -> Iterator[Cell]:
    """The first cell of each (partition, num_agents): what the shared pre-training depends on."""
    seen: set[tuple[str, int]] = set()
    for cell in cells:
        if (cell.partition, cell.num_agents) not in seen:
            seen.add((cell.partition, cell.num_agents))
            yield cell


def _covering_pretrainings(cells: list[Cell]) -> Iterator[Cell]:
    """Pre-training cells in which every partition and every number of agents appears at least once."""
    partitions: set[str] = set()
    agents: set[int] = set()
    for cell in _one_per_pretraining(cells):
        if cell.partition not in partitions or cell.num_agents not in agents:
            partitions.add(cell.partition)
            agents.add(cell.num_agents)
            yield cell


def _check_strategy(cli: DIMATCLI, cell: Cell, topology: str, init_from: str | None) -> None:
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DIMATStrategy)
    assert strategy.num_agents == cell.num_agents
    assert strategy.partition == cell.partition
    assert strategy.seed == cell.seed
    assert strategy.init_from == init_from
    assert strategy.export == "none"
    schedule = build_schedule(topology, cell.num_agents)
    if schedule is not None:  # a graph per round: the strategy merges on the schedule's rounds
        assert strategy.schedule is not None and strategy.schedule.name == schedule.name
        expected = schedule.union.mixing
    else:
        expected = Topology.from_name(topology, cell.num_agents).mixing
    np.testing.assert_array_equal(strategy.topology.mixing, expected)


def _check_model_and_data(cli: DIMATCLI, experiment: Experiment, overrides: dict[str, Any]) -> None:
    base = experiment.base
    assert type(cli.model).__name__ == _short_name(base["model"]["class_path"])
    assert type(cli.datamodule).__name__ == _short_name(base["data"]["class_path"])
    expected = {**base["model"].get("init_args", {}), **overrides}
    for key, value in expected.items():
        assert cli.model.hparams[key] == value, key


# ----------------------------------------------------------------------------------- experiment files
@pytest.mark.parametrize("path", EXPERIMENTS, ids=[_relative(path) for path in EXPERIMENTS])
def test_experiment_cells_build(path: Path, tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = load_experiment(path)
    assert experiment.cells, f"{_relative(path)} has no cells"
    used = {cell.method for cell in experiment.cells}
    assert used == set(experiment.methods), f"methods never used in a grid: {set(experiment.methods) - used}"
    checkpoint = tmp_cwd / "agents.ckpt"  # init_from must name an existing file; it is read only at fit
    checkpoint.write_bytes(b"")
    epochs = experiment.iterations * experiment.epochs_per_merge
    for index, cell in enumerate(_covering_cells(experiment.cells)):
        method = experiment.methods[cell.method]
        config = _on_cpu_if_needed(experiment.cell_config(cell, init_from=str(checkpoint)))
        cli = _build(config, monkeypatch, meta=index > 0)  # the first one with real weights
        _check_strategy(cli, cell, cell.topology, str(checkpoint))
        assert cli.trainer.max_epochs == epochs
        assert cli.trainer.check_val_every_n_epoch == experiment.epochs_per_merge
        assert cli.trainer.logger is None
        wanted = {_short_name(callback["class_path"]) for callback in method.callbacks}
        assert wanted <= _callback_names(cli), f"{cell}: callbacks {wanted} not all built"
        merges = [callback for callback in cli.trainer.callbacks if isinstance(callback, MergeCallback)]
        merge_args = [c.get("init_args", {}) for c in method.callbacks if c["class_path"] == MERGE_PATH]
        assert len(merges) == len(merge_args)
        for merge, init_args in zip(merges, merge_args, strict=True):
            assert merge.every_n_epochs == experiment.epochs_per_merge
            expected = init_args.get("method", "activation")
            if isinstance(expected, dict):  # a matcher with options, by class_path
                assert type(merge.method).__name__ == expected["class_path"].rsplit(".", 1)[1]
                for option, value in expected.get("init_args", {}).items():
                    assert getattr(merge.method, option) == value, (cell, option)
            else:
                assert merge.method == expected
        _check_model_and_data(cli, experiment, method.model)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[_relative(path) for path in EXPERIMENTS])
def test_experiment_pretraining_builds(path: Path, tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = load_experiment(path)
    method_callbacks = {
        _short_name(callback["class_path"])
        for method in experiment.methods.values()
        for callback in method.callbacks
    }
    for cell in _covering_pretrainings(experiment.cells):
        cli = _build(_on_cpu_if_needed(experiment.pretrain_config(cell)), monkeypatch, meta=True)
        _check_strategy(cli, cell, "fully_connected", None)
        assert cli.trainer.max_epochs == experiment.pretrain_epochs
        assert not method_callbacks & _callback_names(cli), "pre-training must not merge or gossip"
        _check_model_and_data(cli, experiment, {})


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[_relative(path) for path in EXPERIMENTS])
def test_experiment_partitions_are_feasible(path: Path) -> None:
    """Each (partition, num_agents) of the grid splits the model's classes without an empty agent."""
    experiment = load_experiment(path)
    num_classes = int(experiment.base["model"]["init_args"]["num_classes"])
    labels = np.repeat(np.arange(num_classes), 20)  # far fewer samples per class than any real data set
    for cell in _one_per_pretraining(experiment.cells):
        shards = partition(labels, cell.num_agents, scheme=cell.partition, seed=cell.seed)
        assert len(shards) == cell.num_agents and min(len(shard) for shard in shards) > 0


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[_relative(path) for path in EXPERIMENTS])
def test_experiment_header_gives_its_command(path: Path) -> None:
    header = " ".join(_header(path))
    assert f"lightning-dimat experiment {_relative(path)}" in header, (
        f"{_relative(path)} should start with a comment giving `lightning-dimat experiment {_relative(path)}`"
    )


@pytest.mark.parametrize("path", PAPER_EXPERIMENTS, ids=[_relative(path) for path in PAPER_EXPERIMENTS])
def test_paper_experiment_follows_the_paper_protocol(path: Path) -> None:
    """Sec. 5: 100 pre-training epochs, 100 iterations of 2 epochs and a merge, 5 runs of each setting."""
    header = _header(path)
    assert header[0].startswith("Reproduces") and re.search(r"\b(Table|Fig)", header[0])
    assert f"lightning-dimat experiment {_relative(path)} --jobs 1" in header
    experiment = load_experiment(path)
    assert (experiment.pretrain_epochs, experiment.iterations, experiment.epochs_per_merge) == (100, 100, 2)
    assert {"DIMAT", "WA", "CDSGD", "SGP"} <= {method.label for method in experiment.methods.values()}
    seeds: dict[tuple[str, int, str, str], list[int]] = {}
    for cell in experiment.cells:
        seeds.setdefault((cell.method, cell.num_agents, cell.topology, cell.partition), []).append(cell.seed)
    assert all(sorted(found) == PAPER_SEEDS for found in seeds.values())
    five = {(topology, part) for method, agents, topology, part in seeds if agents == 5 and method == "dimat"}
    assert five == {(t, p) for t in ("fully_connected", "ring") for p in ("iid", "by_class")}
    assert {agents for _, agents, _, _ in seeds} == {5, 10, 20, 40}
    dimat = experiment.methods["dimat"].callbacks
    # (the paper's DIMAT: every agent in its own basis, re-matching at every merge)
    assert dimat == [{"class_path": MERGE_PATH, "init_args": {"method": "activation", "basis": "own"}}]
    assert experiment.methods["cdsgd"].model == {"optimizer": "sgd"}
    trainer = experiment.base["trainer"]
    assert (trainer["accelerator"], trainer["devices"]) == ("gpu", 1)
    init_args = experiment.base["model"]["init_args"]
    if init_args["model"] == "resnet20":
        assert init_args["model_options"] == {"width": 8, "shortcut": "conv3x3"}


# ---------------------------------------------------------------------------------- plain fit configs
def _documented_configs(path: Path) -> list[Path]:
    """The ``--config`` files of the ``lightning-dimat fit`` command in ``path``'s header (or ``path``)."""
    for line in _header(path):
        if line.startswith("lightning-dimat fit"):
            words = shlex.split(line)
            configs = [ROOT / words[i + 1] for i, word in enumerate(words) if word == "--config"]
            assert path in configs, f"{_relative(path)}: its documented command does not use it: {line}"
            return configs
    return [path]


def _merged_trainer(configs: list[Path]) -> dict[str, Any]:
    """``trainer`` of the configs applied in order (a later file's key replaces an earlier one's)."""
    trainer: dict[str, Any] = {}
    for config in configs:
        trainer.update(_load_yaml(config).get("trainer", {}))
    return trainer


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=[_relative(path) for path in FIT_CONFIGS])
def test_fit_config_builds(path: Path, tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fit config builds as its header says to use it (an overlay on top of the config it names)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    configs = _documented_configs(path)
    merged = {key: value for config in configs for key, value in _load_yaml(config).items()}
    assert {"model", "data"} <= set(merged), (
        f"{_relative(path)} has no model/data and no `lightning-dimat fit --config ...` line naming a base"
    )
    trainer = _merged_trainer(configs)
    args = [word for config in configs for word in ("--config", str(config))]
    if _needs_cpu(trainer):
        args += ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with torch.device("meta"):  # no weights: the experiment tests build each network once with real ones
        cli = build_cli(args=args, run=False)
    assert isinstance(cli.trainer.strategy, DIMATStrategy)
    assert type(cli.model).__name__ == _short_name(merged["model"]["class_path"])
    assert type(cli.datamodule).__name__ == _short_name(merged["data"]["class_path"])
    wanted = {_short_name(callback["class_path"]) for callback in trainer.get("callbacks", [])}
    assert wanted <= _callback_names(cli)
    assert ("MergeCallback" in wanted) == ("MergeCallback" in _callback_names(cli))
    logger = trainer.get("logger", True)
    if isinstance(logger, dict):
        assert type(cli.trainer.logger).__name__ == _short_name(logger["class_path"])
    elif logger is False:
        assert cli.trainer.logger is None


def test_overlays_are_found_and_combined() -> None:
    """The overlays of the quick-start are built on top of it, not alone."""
    quickstart = CONFIG_DIR / "quickstart.yaml"
    for name in ("local_only.yaml", "quickstart_wa.yaml", "quickstart_wandb.yaml"):
        assert _documented_configs(CONFIG_DIR / name) == [quickstart, CONFIG_DIR / name]
    assert _documented_configs(quickstart) == [quickstart]


# ------------------------------------------------------------------------------- bad experiment files
BASE = str(CONFIG_DIR / "cpu" / "base.yaml")
DIMAT = {"callbacks": [{"class_path": MERGE_PATH, "init_args": {"method": "activation"}}]}
GRID = {"methods": ["dimat"], "topologies": ["ring"], "partitions": ["iid"], "seeds": [0], "num_agents": [5]}


def _experiment_file(tmp_path: Path, **changes: Any) -> Path:
    raw: dict[str, Any] = {"name": "bad", "base": BASE, "methods": {"dimat": DIMAT}, "grids": [GRID]}
    raw.update(changes)
    raw = {key: value for key, value in raw.items() if value is not None}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_minimal_experiment_loads(tmp_path: Path) -> None:
    experiment = load_experiment(_experiment_file(tmp_path))
    assert experiment.cells == [Cell("dimat", "ring", "iid", 0, 5)]


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"grids": [{**GRID, "methods": ["dimat", "dimta"]}]}, ValueError, r"names methods \['dimta'\]"),
        ({"grids": None}, ValueError, r"lacks \['grids'\]"),
        ({"grids": []}, ValueError, "grids must be a non-empty list"),
        ({"grids": [{**GRID, "seeds": []}]}, ValueError, r"grids\[0\] lacks .*\['seeds'\]"),
        (
            {
                "methods": {
                    "dimat": {"callbacks": [{"class_path": MERGE_PATH, "init_args": {"every_n_epochs": 2}}]}
                }
            },
            ValueError,
            "sets MergeCallback every_n_epochs=2.*Remove it",
        ),
        (
            {"methods": {"dimat": {**DIMAT, "optimizer": "sgd"}}},
            ValueError,
            r"unknown keys 'optimizer'; known keys: \['label', 'callbacks', 'model'\]",
        ),
        ({"iterations": 0}, ValueError, "iterations must be an integer >= 1"),
        ({"base": "missing.yaml"}, FileNotFoundError, "base config 'missing.yaml' not found"),
    ],
    ids=[
        "unknown-method",
        "missing-grids",
        "empty-grids",
        "empty-axis",
        "merge-every-n-epochs",
        "unknown-method-key",
        "zero-iterations",
        "missing-base",
    ],
)
def test_bad_experiment_file_is_refused(
    tmp_path: Path, changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        load_experiment(_experiment_file(tmp_path, **changes))
