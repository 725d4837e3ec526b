"""Every script in ``benchmarks/`` still runs: each starts with ``--smoke`` (tiny sizes, CPU) in a subprocess,
exactly as a user starts it, and the JSON it saves is checked for its keys and for finite numbers.

The selected runs start together when the first of these tests needs one, two at a time (each run spends
most of its time importing torch and Lightning), so the module takes about as long as its two slowest runs
rather than the sum of all.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
TIMEOUT_S = 420  # per run; a smoke run takes seconds on an idle machine
PARALLEL = 2


@dataclass(frozen=True)
class Run:
    """One smoke run: the script, extra arguments, and whether it picks its own (temporary) output file."""

    script: str
    args: tuple[str, ...] = ()
    default_output: bool = False


# Longest first, so that the two workers finish at about the same time.
RUNS = {
    "exchange": Run("exchange.py", ("--timeout", str(TIMEOUT_S - 60))),
    "gpu_check": Run("gpu_check.py"),
    "merge_quality": Run("merge_quality.py"),
    "merge_speed": Run("merge_speed.py"),
    "network": Run("network.py"),  # a 7-cell digits grid
    "scale": Run("scale.py"),  # a baseline and 2 settings, each its own subprocess
    "overhead": Run("overhead.py", default_output=True),  # also checks where a smoke run saves by default
}


GPU_CHECKS = ("bf16_mixed", "fp16_mixed", "fp32", "resume_bf16", "overhead")
# Top-level keys each benchmark's JSON must have (full runs save the same structure).
KEYS = {
    "merge_speed": {"benchmark", "setting", "model", "model_mb", "data", "device", "repeats", "median"},
    "overhead": {"benchmark", "agents", "epochs", "images_per_run", "repeats", "median_ratio"},
    "exchange": {"benchmark", "agents", "world_size", "state_mb", "per_rank", "ratios_vs_naive"},
    "merge_quality": {"benchmark", "data", "image_size", "model", "epochs", "seconds", "curves"},
    "gpu_check": {"torch", "gpu", "accelerator", *GPU_CHECKS},
    "network": {"benchmark", "experiment", "commit", "iterations", "cells", "rows"},
    "scale": {
        "benchmark",
        "commit",
        "cpu_count",
        "torch",
        "baseline",
        "settings",
        "marginal_mib_per_agent",
        "extrapolation_1000",
        "merge_share",
    },
}


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    output: Path


def _results_snapshot() -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in RESULTS.iterdir()}


def _run(name: str, directory: Path) -> Finished:
    run = RUNS[name]
    output = directory / f"{name}.json"
    command = [sys.executable, str(BENCHMARKS / run.script), "--smoke", *run.args]
    if not run.default_output:
        command += ["--output", str(output)]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a timeout also ends the processes a benchmark spawned
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n[killed after {TIMEOUT_S} s]"
    if run.default_output:
        saved = [line.removeprefix("saved ") for line in stdout.splitlines() if line.startswith("saved ")]
        output = Path(saved[-1]) if saved else output
    return Finished(process.returncode, stdout, stderr, output)


@pytest.fixture(scope="module")
def smoke_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Starts the smoke runs of the selected tests of this module; yields ``{name: Future[Finished]}``."""
    selected = {item.name.removeprefix("test_").removesuffix("_smoke") for item in request.session.items}
    directory = tmp_path_factory.mktemp("benchmarks")
    before = _results_snapshot()
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        runs = {name: pool.submit(_run, name, directory) for name in RUNS if name in selected}
        yield runs
    assert _results_snapshot() == before, "a smoke run wrote into benchmarks/results/"


def _finished(runs: dict[str, Future[Finished]], name: str) -> dict[str, Any]:
    """The JSON the run ``name`` saved, once it has exited with 0."""
    done = runs[name].result()
    assert done.returncode == 0, f"{name} exited with {done.returncode}:\n{done.stderr[-4000:]}"
    assert done.output.is_file(), f"{name} saved nothing at {done.output}:\n{done.stdout[-2000:]}"
    return json.loads(done.output.read_text())


def _numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON value (booleans excluded), with where it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


def _check(result: dict[str, Any], benchmark: str) -> None:
    keys = KEYS[benchmark]
    assert keys <= set(result), f"missing keys: {sorted(keys - set(result))}"
    if "benchmark" in keys:
        assert result["benchmark"] == benchmark
    if benchmark != "network":  # (the commit it measured, when it started; network.py: a short "commit")
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", result["measured_code"]["commit"])
    numbers = list(_numbers(result))
    assert numbers, "the result holds no numbers"
    bad = [where for where, number in numbers if not math.isfinite(number)]
    assert not bad, f"non-finite numbers at {bad}"


def test_merge_speed_smoke(smoke_runs: dict[str, Future[Finished]]) -> None:
    result = _finished(smoke_runs, "merge_speed")
    _check(result, "merge_speed")
    assert result["smoke"] is True and len(result["repeats"]) == 1
    median = result["median"]
    for key in ("total_s", "forward_s", "statistics_s", "lap_s", "apply_s", "batchnorm_s", "lower_bound_s"):
        assert key in median
    assert median["total_s"] > 0 and median["lower_bound_s"] > 0 and median["ratio"] > 0
    assert median["lap_calls"] > 0  # the solver was timed where activation matching calls it


def test_overhead_smoke(smoke_runs: dict[str, Future[Finished]]) -> None:
    result = _finished(smoke_runs, "overhead")
    done = smoke_runs["overhead"].result()
    # Without --output a smoke run saves to a temporary file, never over the committed results.
    assert done.output.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    done.output.unlink()
    _check(result, "overhead")
    assert result["median_ratio"] > 0
    assert {"dimat_s", "plain_s", "dimat_released_s", "ratio", "release_cost"} <= set(result["repeats"][0])
    assert result["median_release_cost"] > 0


def test_exchange_smoke(smoke_runs: dict[str, Future[Finished]]) -> None:
    result = _finished(smoke_runs, "exchange")
    _check(result, "exchange")
    assert result["world_size"] == 2 and len(result["per_rank"]) == 2
    rank0 = result["per_rank"][0]
    assert rank0["ring"]["dense"] is False  # point-to-point sends
    assert rank0["fully_connected"]["dense"] is True  # one all-gather
    assert all(row["bytes_sent"] > 0 for row in rank0.values())
    assert set(result["ratios_vs_naive"]) == {"ring", "fully_connected"}


def test_merge_quality_smoke(smoke_runs: dict[str, Future[Finished]]) -> None:
    result = _finished(smoke_runs, "merge_quality")
    _check(result, "merge_quality")
    methods = ("average", "weight", "activation")
    assert set(result["curves"]) == {f"{m}{reset}" for m in methods for reset in ("", " + BN reset")}
    for curve in result["curves"].values():
        assert [point["alpha"] for point in curve["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert all({"accuracy", "loss"} <= set(point) for point in curve["points"])
    assert smoke_runs["merge_quality"].result().output.with_suffix(".png").is_file()


def test_scale_smoke(smoke_runs: dict[str, Future[Finished]]) -> None:
    result = _finished(smoke_runs, "scale")
    _check(result, "scale")
    settings = result["settings"]
    assert [(s["agents"], s["width"], s["method"], s.get("share_run")) for s in settings] == [
        (2, 1, "average", None),
        (3, 1, "average", None),
        (5, 1, "average", True),  # the merge-share run: 2 rounds of 2 epochs + a merge, shared basis
    ]
    for setting in settings:
        assert setting["merged_before_epoch_end"] is True  # the merge ran inside epoch 1, before its end
        assert setting["release_memory"] == "auto"  # (the strategy's default, recorded per setting)
        assert setting["released_heap"] is False  # (2 and 3 agents: "auto" keeps the memory)
        assert setting["peak_mib"] >= setting["train_peak_mib"] > 0 and setting["merge_s"] > 0
        assert {"fit/epoch0", "fit/epoch1/merge", "fit/epoch1/merge/commit", "fit/export"} <= set(
            setting["phases"]
        )
    assert set(result["extrapolation_1000"]) == {"1"}
    assert "average" in result["merge_share"]["computed_from_scaled"]
    share_run = settings[-1]
    assert (share_run["rounds"], share_run["basis"]) == (2, "shared")
    assert len(share_run["merges_s"]) == 2 and min(share_run["merges_s"]) > 0  # one merge per round, timed
    assert 0 < result["merge_share"]["measured"]["average"] < 1
    # validated once per round (its own phase, nested in the epoch's): the share of the whole round is smaller
    assert share_run["val_images"] == 32 and share_run["validation_s"] > 0
    assert {"fit/epoch1/validation", "fit/epoch3/validation"} <= set(share_run["phases"])
    assert "fit/epoch0/validation" not in share_run["phases"]
    # BatchNorm statistics averaged with the weights: no re-estimation pass in its merges, unlike the others'
    assert share_run["batchnorm"] == "average"
    assert not any(label.endswith("/batchnorm") and "/merge/" in label for label in share_run["phases"])
    assert "fit/epoch1/merge/commit/batchnorm" in settings[0]["phases"]
    whole = result["merge_share"]["measured_of_whole_round"]["average"]
    assert 0 < whole < result["merge_share"]["measured"]["average"]
    assert smoke_runs["scale"].result().output.with_suffix(".png").is_file()


def test_gpu_check_smoke(smoke_runs: dict[str, Future[Finished]]) -> None:
    result = _finished(smoke_runs, "gpu_check")
    _check(result, "gpu_check")
    assert result["accelerator"] == "cpu"
    errors = {name: result[name].get("error") for name in GPU_CHECKS if result[name]["status"] == "error"}
    assert not errors, errors
    assert result["fp16_mixed"]["status"] == "skipped: no GPU"  # fp16 autocast needs a GPU
    for name in ("bf16_mixed", "fp32"):
        assert result[name]["device_while_training"] == "cpu"
        assert result[name]["all_finite"] is True and result[name]["merge_rounds"] >= 1
    assert isinstance(result["gpu"], str)  # the GPU's name, or "skipped: no GPU"


def test_network_smoke(smoke_runs: dict[str, Future[Finished]]) -> None:
    result = _finished(smoke_runs, "network")
    _check(result, "network")
    rows = {(row["method"], row["topology"]): row for row in result["rows"]}
    assert result["cells"] == len(rows) == 7
    for (method, topology), row in rows.items():
        assert 0 <= row["accuracy"] <= 100 and row["mb_sent_per_agent"] > 0, (method, topology)
    # One message per agent and round on the one-peer and matching graphs, two on the ring.
    assert rows[("wa", "one_peer_exponential")]["bytes_vs_ring_uncompressed"] == pytest.approx(0.5)
    assert rows[("wa", "random_matching")]["bytes_vs_ring_uncompressed"] == pytest.approx(0.5)
    assert rows[("wa_int8", "ring")]["compression"] == "int8"
    assert rows[("wa_int8", "ring")]["bytes_vs_ring_uncompressed"] <= 1 / 3.5
    assert smoke_runs["network"].result().output.with_suffix(".png").is_file()
