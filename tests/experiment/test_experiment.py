"""The experiment runner on a 2-cell digits grid: shared pre-training, results, report, cache skip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lightning_dimat.experiment import load_experiment, run_experiment, write_report
from lightning_dimat.experiment import runner as runner_module
from lightning_dimat.experiment.runner import archive_path, cell_dir, is_finished, pretrain_dir

BASE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_train_batches": 4,
        "strategy": {"class_path": "lightning_dimat.DIMATStrategy", "init_args": {"num_agents": 3}},
    },
    "model": {
        "class_path": "lightning_dimat.models.ImageClassifier",
        "init_args": {"model": "mlp", "model_options": {"in_features": 64, "hidden": [16]}, "lr": 0.05},
    },
    "data": {"class_path": "lightning_dimat.data.DigitsDataModule", "init_args": {"batch_size": 16}},
}

GRID = {
    "name": "tiny",
    "base": "base.yaml",
    "pretrain_epochs": 1,
    "iterations": 2,
    "epochs_per_merge": 1,
    "methods": {
        "wa": {
            "label": "WA",
            "callbacks": [
                {"class_path": "lightning_dimat.MergeCallback", "init_args": {"method": "average"}}
            ],
        },
        "cdsgd": {
            "label": "CDSGD",
            "model": {"optimizer": "sgd"},
            "callbacks": [{"class_path": "lightning_dimat.CDSGDCallback"}],
        },
    },
    "grids": [
        {
            "methods": ["wa", "cdsgd"],
            "topologies": ["ring"],
            "partitions": ["by_class"],
            "seeds": [0],
            "num_agents": [3],
        }
    ],
}


def write_experiment(folder: Path, **changes: object) -> Path:
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = {**GRID, "output_dir": str(folder / "out"), **changes}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_two_cell_grid_runs_reports_and_skips_finished_cells(
    tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = load_experiment(write_experiment(tmp_cwd))
    assert [cell.method for cell in experiment.cells] == ["wa", "cdsgd"]
    # Both methods share one pre-training: same (partition, seed, agents) → one folder.
    assert pretrain_dir(experiment, experiment.cells[0]) == pretrain_dir(experiment, experiment.cells[1])

    results = run_experiment(experiment)
    pretrained = json.loads((pretrain_dir(experiment, experiment.cells[0]) / "result.json").read_text())
    assert (
        len(pretrained["history"]) == 1
        and (pretrain_dir(experiment, experiment.cells[0]) / "agents.ckpt").is_file()
    )
    for result in results:
        assert 0 <= result["test_acc"] <= 1 and len(result["agents_test_acc"]) == 3
        assert 0 <= result["consensus_test_acc"] <= 1
        assert [p["iteration"] for p in result["history"]] == [1.0, 2.0]
        assert result["pretrained"] == pretrained["history"]
    wa, cdsgd = results
    assert wa["history"][-1]["comm/rounds"] == 2  # one merge per iteration
    steps = cdsgd["history"][-1]["comm/rounds"]
    assert steps == 2 * 4  # one gossip round per optimizer step: 4 batches × 2 epochs
    assert cdsgd["config"]["model"]["init_args"]["optimizer"] == "sgd"
    # Accuracy before each merge is recorded next to the one after; without a merge they are the same model.
    for point in wa["history"] + cdsgd["history"]:
        assert len(point["agents_before_merge"]) == 3 and 0 <= point["val_acc_before_merge"] <= 1
    for point in cdsgd["history"]:
        assert point["agents_before_merge"] == pytest.approx(point["agents"], abs=1e-6)
    assert all(p["merge/permuted_fraction"] == 0.0 for p in wa["history"])  # WA permutes nothing
    assert all("merge/permuted_fraction" not in p for p in cdsgd["history"])
    assert any(p["agents_before_merge"] != pytest.approx(p["agents"], abs=1e-6) for p in wa["history"])

    paths = write_report(experiment, results)
    table = paths["markdown"].read_text()
    assert "| 3 | ring | by_class |" in table and f"{100 * wa['test_acc']:.2f} (n=1)" in table
    assert f"{100 * wa['history'][-1]['val_acc_before_merge']:.2f} (n=1)" in table
    assert f"{100 * cdsgd['consensus_test_acc']:.2f} (n=1)" in table
    assert paths["iteration_plot"].stat().st_size > 0 and paths["rounds_plot"].stat().st_size > 0
    assert len(paths["csv"].read_text().splitlines()) == 3

    # A second run finds every result by its config hash and trains nothing.
    def fail(*args: object) -> None:
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(runner_module, "run_task", fail)
    assert run_experiment(experiment) == results

    # Re-running the shared pre-training (new agents on disk) makes both cells stale.
    monkeypatch.undo()
    assert all(is_finished(experiment, "cell", cell) for cell in experiment.cells)
    record = pretrain_dir(experiment, experiment.cells[0]) / "result.json"
    record.write_text(json.dumps({**pretrained, "fingerprint": "another run"}))
    assert not any(is_finished(experiment, "cell", cell) for cell in experiment.cells)

    # Changing a method's config changes its hash: only that cell is new.
    changed = load_experiment(write_experiment(tmp_cwd, iterations=3))
    assert cell_dir(changed, changed.cells[0]) != cell_dir(experiment, experiment.cells[0])


def test_cells_start_from_the_shared_pretrained_agents(tmp_cwd: Path) -> None:
    methods = {
        **GRID["methods"],
        "wa": {**GRID["methods"]["wa"], "model": {"model_options": {"hidden": [8]}}},
    }
    experiment = load_experiment(write_experiment(tmp_cwd, iterations=1, methods=methods))
    cell = experiment.cells[0]
    config = experiment.cell_config(cell, init_from="agents.ckpt")
    strategy = config["trainer"]["strategy"]["init_args"]
    assert strategy["init_from"] == "agents.ckpt" and strategy["topology"] == "ring"
    assert config["trainer"]["max_epochs"] == 1
    assert config["trainer"]["callbacks"][-1]["init_args"]["every_n_epochs"] == 1
    assert experiment.pretrain_config(cell)["trainer"]["max_epochs"] == 1
    # A method's model overrides merge into the base's nested options rather than replacing them.
    assert config["model"]["init_args"]["model_options"] == {"in_features": 64, "hidden": [8]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {
                "grids": [
                    {
                        "methods": ["nope"],
                        "topologies": ["ring"],
                        "partitions": ["iid"],
                        "seeds": [0],
                        "num_agents": [3],
                    }
                ]
            },
            "methods \\['nope'\\] not defined",
        ),
        ({"grids": [{"methods": ["wa"], "topologies": ["ring"]}]}, "lacks \\(or has empty\\)"),
        ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
        (
            {
                "methods": {
                    "wa": {
                        "callbacks": [
                            {
                                "class_path": "lightning_dimat.MergeCallback",
                                "init_args": {"every_n_epochs": 3},
                            }
                        ]
                    }
                }
            },
            "sets MergeCallback every_n_epochs=3",
        ),
        ({"methods": {"wa": {"callback": []}}}, "unknown keys 'callback' \\(did you mean 'callbacks'\\?\\)"),
        # Caught before any work (issue 11 item 7): typo'd keys, float seeds, unknown names.
        ({"iteratons": 3}, "unknown keys 'iteratons' \\(did you mean 'iterations'\\?\\)"),
        ({"grids": [{**GRID["grids"][0], "topolgy": ["ring"]}]}, "unknown keys 'topolgy'"),
        ({"grids": [{**GRID["grids"][0], "seeds": [0.5]}]}, "seed must be an integer >= 0, got 0.5"),
        ({"grids": [{**GRID["grids"][0], "topologies": ["rnig"]}]}, "unknown topology 'rnig' in topologies"),
        ({"grids": [{**GRID["grids"][0], "partitions": ["byclass"]}]}, "unknown partition scheme 'byclass'"),
        (
            {"methods": {"wa": {"callbacks": [{"class_path": "lightning_dimat.MergeCallbak"}]}}},
            "class_path 'lightning_dimat.MergeCallbak' cannot be imported",
        ),
    ],
)
def test_bad_experiment_files_are_refused_with_the_offending_value(
    tmp_cwd: Path, changes: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_experiment(write_experiment(tmp_cwd, **changes))


def test_without_pretraining_and_with_two_epochs_per_merge_points_follow_the_merges(tmp_cwd: Path) -> None:
    grid = {"methods": ["wa"], "topologies": ["ring"], "partitions": ["iid"], "seeds": [1], "num_agents": [3]}
    experiment = load_experiment(
        write_experiment(tmp_cwd, pretrain_epochs=0, epochs_per_merge=2, grids=[grid])
    )
    (result,) = run_experiment(experiment)
    assert result["config"]["trainer"]["strategy"]["init_args"]["init_from"] is None
    assert [(p["epoch"], p["iteration"], p["comm/rounds"]) for p in result["history"]] == [
        (2, 1.0, 1),
        (4, 2.0, 2),
    ]
    assert result["pretrained"] == []


def test_a_truncated_result_or_a_deleted_checkpoint_runs_again_instead_of_crashing(
    tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_dimat.experiment import main

    grid = {"methods": ["wa"], "topologies": ["ring"], "partitions": ["iid"], "seeds": [0], "num_agents": [3]}
    path = write_experiment(tmp_cwd, grids=[grid])
    experiment = load_experiment(path)
    (cell,) = experiment.cells
    with pytest.raises(SystemExit, match="no run has finished yet"):
        main([str(path), "--report-only"])
    run_experiment(experiment)
    main([str(path), "--report-only"])  # a report of what has finished, running nothing
    assert "1 of 1 grid runs reported" in capsys.readouterr().out
    result = cell_dir(experiment, cell) / "result.json"
    result.write_text(result.read_text()[:50])  # a run killed while writing (before the atomic rename)
    with pytest.warns(UserWarning, match="result.json is truncated or corrupt"):
        assert not is_finished(experiment, "cell", cell)
    (pretrain_dir(experiment, cell) / "agents.ckpt").unlink()
    with pytest.warns(UserWarning, match="agents.ckpt is missing: pre-training again"):
        assert not is_finished(experiment, "pretrain", cell)


def test_dry_run_checks_the_whole_grid_and_counts_the_runs(
    tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_dimat.experiment import main

    main([str(write_experiment(tmp_cwd)), "--dry-run"])
    assert (
        "1 pre-training runs (1 to run), 2 grid runs (2 to run): the grid checks out."
        in capsys.readouterr().out
    )
    assert not (tmp_cwd / "out").exists()  # nothing ran
    missing = {
        "class_path": "lightning_dimat.data.TinyImageNetDataModule",
        "init_args": {"data_dir": "nowhere.zip"},
    }
    (tmp_cwd / "base.yaml").write_text(yaml.safe_dump({**BASE, "data": missing}))
    # (The error says how to get the data: where to download it, or the command that builds a subset.)
    with pytest.raises(
        ValueError, match=r"(?s)Tiny ImageNet not found at 'nowhere\.zip'.*--output nowhere\.zip"
    ):
        main([str(tmp_cwd / "grid.yaml"), "--dry-run"])
    bad_option = {**BASE["model"], "init_args": {**BASE["model"]["init_args"], "optimiser": "sgd"}}
    (tmp_cwd / "base.yaml").write_text(yaml.safe_dump({**BASE, "model": bad_option}))
    with pytest.raises(ValueError, match=r"(?s)cannot be built.*Option .optimiser. is not accepted"):
        main([str(tmp_cwd / "grid.yaml"), "--dry-run"])


def test_archived_results_outlive_the_output_dir_and_a_fresh_checkout_runs_only_what_is_missing(
    tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_dimat.experiment import archive_finished, finished_results, main

    path = write_experiment(tmp_cwd, archive_dir=str(tmp_cwd / "archive"))
    experiment = load_experiment(path)
    wa_cell, cdsgd_cell = experiment.cells
    results = run_experiment(experiment)
    archived = {cell: archive_path(experiment, cell) for cell in experiment.cells}
    assert [json.loads(archived[cell].read_text()) for cell in experiment.cells] == results
    assert archive_finished(experiment) == 0  # the archive already holds every finished run

    # A fresh checkout: no output_dir, only the archive. Both cells are finished; nothing runs.
    shutil.rmtree(tmp_cwd / "out")
    ran: list[tuple[str, str]] = []
    real_run_task = runner_module.run_task

    def record(experiment_: object, kind: str, cell: object) -> Path:
        ran.append((kind, cell.method))  # type: ignore[attr-defined]
        return real_run_task(experiment_, kind, cell)  # type: ignore[arg-type]

    monkeypatch.setattr(runner_module, "run_task", record)
    assert run_experiment(experiment) == results and ran == []
    main([str(path), "--report-only"])
    assert "2 of 2 grid runs reported" in capsys.readouterr().out

    # One archived result lost: its pre-training is made again and only that cell runs. The re-made
    # pre-training is byte-identical (same seed, same code), so it still vouches for the other cell.
    archived[cdsgd_cell].unlink()
    run_experiment(experiment)
    assert ran == [("pretrain", "cdsgd"), ("cell", "cdsgd")]  # (a pre-training is named by a cell needing it)
    assert finished_results(experiment)[0] == results[0]

    # Pre-trained agents that differ from the ones an archived cell started from make it stale.
    record_path = pretrain_dir(experiment, wa_cell) / "result.json"
    record = record_path.read_text()
    record_path.write_text(json.dumps({**json.loads(record), "fingerprint": "other"}))
    assert not is_finished(experiment, "cell", wa_cell)
    # A summary archived without the fingerprint (restored from a table) cannot be checked: it stands.
    summary = {**json.loads(archived[wa_cell].read_text()), "pretrained_fingerprint": None}
    archived[wa_cell].write_text(json.dumps(summary))
    assert is_finished(experiment, "cell", wa_cell)

    # Results made before the archive existed are copied into it by the next run or report (here the
    # one cell that ran in this output_dir).
    record_path.write_text(record)
    shutil.rmtree(tmp_cwd / "archive")
    assert archive_finished(experiment) == 1 and archived[cdsgd_cell].is_file()
    assert not archived[wa_cell].exists()


def test_a_report_of_archived_summaries_without_history_has_tables_but_no_curves(tmp_cwd: Path) -> None:
    experiment = load_experiment(write_experiment(tmp_cwd, archive_dir=str(tmp_cwd / "archive")))
    summaries = [
        {
            "cell": cell.__dict__,
            "test_acc": 0.5 + index / 10,
            "consensus_test_acc": 0.4,
            "history": [{"iteration": 2.0, "val_acc_before_merge": 0.3, "comm/rounds": 2}],
        }
        for index, cell in enumerate(experiment.cells)
    ]
    paths = write_report(experiment, summaries)
    table = paths["markdown"].read_text()
    assert "| data | CDSGD | WA |" in table and "| 3 | ring | by_class | 60.00 (n=1) | 50.00 (n=1) |" in table
    assert "iteration_plot" not in paths
    assert not (experiment.output_dir / "accuracy_vs_iteration.png").exists()
    # Next to a run that kept its history, only that run is drawn, and the report says so.
    full = run_experiment(load_experiment(write_experiment(tmp_cwd)))[0]
    paths = write_report(experiment, [full, summaries[1]])
    assert paths["iteration_plot"].stat().st_size > 0
    assert "The plots show 1 of these 2 runs" in paths["markdown"].read_text()
