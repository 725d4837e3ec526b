"""Scale: memory and time of N agents of ResNet-20 in one process, as N grows (issue 14, item 5).

Each measured setting (N agents, width, merge method) runs in its own subprocess, so its peak resident
memory is its own; a baseline subprocess per width imports everything and builds one model but trains
nothing (the fixed cost of torch and Lightning). A setting trains N agents (``DIMATStrategy``, ring, IID
shards of random 3×32×32 images with 20 classes, batches of 32, Adam, one torch thread) for 2 epochs with
one merge after the second (``MergeCallback(every_n_epochs=2, num_batches=4, optimizer_state="reset")``, as
in ``configs/cpu/protocol.yaml``) and exports the consensus at the end of ``fit``. Measured:

- resident memory: the high-water mark (VmHWM) of every phase — setup, each epoch's training, the merge
  and its parts (begin_round, gather, match_and_combine, commit, batchnorm), the export — reset between
  phases (``/proc/self/clear_refs``); the setting's peak is the largest;
- memory per agent ``(peak − baseline) / N`` and the marginal cost of one more agent: the slope of the
  peak between the smallest and the largest N of a width (the honest per-agent figure);
- training time per image (epoch 0), merge time (per agent), export time;
- the merge's share of a round of the CPU protocol (N = 5, 2 epochs per merge, 200 images = 7 batches of
  32 per agent and epoch): measured on a run of exactly that shape, and computed from the scaled-down runs.
  ``--share-rounds 10 --share-basis shared`` measures the protocol's 10 rounds with the shipped merge (the
  first round aligns along a spanning tree, the others average in the shared basis); the default is one
  round in each agent's own basis (every merge matches). ``--share-validate 1000`` also validates every
  agent on 1,000 held-out images once per round, as the protocol does (``check_val_every_n_epoch: 2``), and
  gives the merge's share of that whole round beside its share of training + merge;
  ``--share-batchnorm average`` merges BatchNorm statistics like the weights instead of re-estimating them.

Saves ``benchmarks/results/scale.json`` and a plot beside it (``.png``).

    python benchmarks/scale.py                    # the issue's full grid (hours here, ~15 GB at its largest)
    python benchmarks/scale.py --widths 1,8 --agents 1=5,10,20,40,100 8=5,20,40 \\
        --methods 1=average,activation 8=average --method-agents 5,20 --before before.json   # docs/scale.md
    python benchmarks/scale.py --smoke      # N = 2, 3 at width 1, 1 batch, average, and a 2-round share
                                            # run of 5 agents in the shared basis, validated, BatchNorm
                                            # averaged: meaningless numbers
    python benchmarks/scale.py --replot     # redraw the plot of the saved JSON

``--release-memory on`` hands freed heap memory back after each agent's backward
(``DIMATStrategy(release_memory=True)``), ``off`` never; the default, ``auto``, from 32 agents on (each
setting records ``released_heap``).

``--before`` embeds an earlier run's JSON (e.g. of an older commit, imported with ``PYTHONPATH``) and plots
it dashed. Settings predicted (from the smaller N) to peak above ``--max-predicted-gb`` are skipped, and a
watchdog ends one whose resident memory passes ``--memory-limit-gb``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning
import torch
from common import MEASURED_CODE, RESULTS, output_path, parse_args, quiet_trainer, save_json
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

import lightning_dimat.callbacks.merge as merge_module
import lightning_dimat.strategy.export as export_module
import lightning_dimat.strategy.rounds as rounds_module
import lightning_dimat.strategy.strategy as strategy_module
from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.models import ImageClassifier
from lightning_dimat.strategy.rounds import MergeRound

CLASSES = 20
BATCH_SIZE = 32
MIB = 2**20
RESULT_MARK = "SCALE_RESULT "
OVER_LIMIT_EXIT = 3
EXTRAPOLATE_TO = 1000
RELEASE_MEMORY: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}

SMOKE = {
    "widths": "1",
    "agents": ["2,3"],
    "methods": ["average"],
    "batches": ["1"],
    "method_agents": "",
    "repeats": 1,
    "share_images": 32,
    "share_rounds": 2,
    "share_basis": "shared",
    "share_validate": 32,
    "share_batchnorm": "average",
}


# ----------------------------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM``: the high-water mark, ``VmRSS``: now)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # (KiB on Linux)


def _reset_high_water_mark() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class Phases:
    """High-water mark of resident memory and wall time of every phase of a run.

    Phases nest (``run/epoch1/merge/gather``); each interval between two phase boundaries is charged to the
    innermost open phase (its ``seconds`` exclude nested phases, ``inclusive_s`` include them), and the
    high-water mark is reset at every boundary, so a phase's ``peak`` is the most memory resident while it
    ran. ``overall`` is the largest of all: the process's peak.
    """

    def __init__(self) -> None:
        self.resets = _reset_high_water_mark()
        self.stack = ["run"]
        self.peak: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.inclusive: dict[str, float] = {}
        self.rss_after: dict[str, int] = {}
        self.overall = 0
        self._since = time.perf_counter()

    def _close(self) -> None:
        label = "/".join(self.stack)
        now = time.perf_counter()
        mark = _status_kib("VmHWM")
        self.overall = max(self.overall, mark)
        self.peak[label] = max(self.peak.get(label, 0), mark)
        self.seconds[label] = self.seconds.get(label, 0.0) + now - self._since
        self.rss_after[label] = _status_kib("VmRSS")
        if self.resets:
            _reset_high_water_mark()
        self._since = time.perf_counter()

    def enter(self, name: str) -> None:
        self._close()
        self.stack.append(name)

    def leave(self) -> None:
        self._close()
        self.stack.pop()

    def high_water_mark(self) -> int:
        """The process's peak so far, in KiB."""
        self._close()
        return self.overall

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        label = "/".join(self.stack)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.inclusive[label] = self.inclusive.get(label, 0.0) + time.perf_counter() - started
            self.leave()

    def table(self) -> dict[str, dict[str, float]]:
        return {
            label.removeprefix("run/"): {
                "peak_mib": self.peak[label] / 1024,
                "rss_after_mib": self.rss_after[label] / 1024,
                "seconds": self.seconds[label],
                **({"inclusive_s": self.inclusive[label]} if label in self.inclusive else {}),
            }
            for label in self.peak
        }


def _watch_memory(limit_mib: float) -> None:
    """Ends this process (exit code 3) when its resident memory passes ``limit_mib``: the machine is shared,
    and the kernel's OOM killer might otherwise pick another process."""

    def watch() -> None:
        while True:
            if _status_kib("VmRSS") / 1024 > limit_mib:
                print(f"resident memory over the limit of {limit_mib:.0f} MiB: stopping", file=sys.stderr)
                sys.stderr.flush()
                os._exit(OVER_LIMIT_EXIT)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def _instrument(owner: Any, name: str, label: str, phases: Phases) -> None:
    """Wraps ``owner.name`` so that each call is the phase ``label``."""
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with phases.phase(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)


class EpochPhases(Callback):
    """Opens a phase per training epoch and notes the high-water marks after epoch 0 and after the merge."""

    def __init__(self, phases: Phases, merge: MergeCallback) -> None:
        self.phases = phases
        self.merge = merge
        self.marks: dict[str, int] = {}
        self.merged_before_epoch_end = False

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch = self.phases.phase(f"epoch{trainer.current_epoch}")
        self._epoch.__enter__()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch.__exit__(None, None, None)
        epoch = trainer.current_epoch
        if epoch == 0:
            self.marks["after_epoch0"] = self.phases.high_water_mark()
        elif epoch == 1:  # (MergeCallback merges after the epoch's last batch, before this hook)
            self.merged_before_epoch_end = self.merge.merged_epochs == [1]
            self.marks["after_merge"] = self.phases.high_water_mark()


class ValidationPhase(Callback):
    """Charges every validation run to its own phase (``…/validation``), nested in the epoch's."""

    def __init__(self, phases: Phases) -> None:
        self.phases = phases

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.phases.enter("validation")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.phases.leave()


def _random_images(images: int, generator: torch.Generator) -> TensorDataset:
    return TensorDataset(
        torch.randn(images, 3, 32, 32, generator=generator),
        torch.randint(0, CLASSES, (images,), generator=generator),
    )


class SyntheticData(LightningDataModule):
    """Random 3×32×32 images with ``CLASSES`` labels (fixed seed) in batches of ``BATCH_SIZE``, and
    ``val_images`` held-out ones (none: no validation)."""

    def __init__(self, images: int, val_images: int = 0, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.dataset = _random_images(images, generator)
        self.val_dataset = _random_images(val_images, generator) if val_images else None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=BATCH_SIZE, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None, "built without val_images: the trainer must not validate"
        return DataLoader(self.val_dataset, batch_size=BATCH_SIZE)


def _module(width: int) -> ImageClassifier:
    return ImageClassifier("resnet20", {"width": width}, num_classes=CLASSES, optimizer="adam", lr=1e-3)


def _mib(tensors: Iterator[torch.Tensor]) -> float:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors) / MIB


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting (or the baseline) in this process: what a ``--one`` subprocess prints."""
    torch.set_num_threads(spec["threads"])
    _watch_memory(spec["memory_limit_mib"])
    phases = Phases()
    seed_everything(0, verbose=False)
    module = _module(spec["width"])
    model_mib = _mib(module.state_dict().values())
    if spec.get("baseline"):
        return {"peak_mib": phases.high_water_mark() / 1024, "model_mib": model_mib, "resets": phases.resets}
    agents = spec["agents"]
    val_images = spec.get("val_images", 0)
    data = SyntheticData(agents * spec["images_per_agent"], val_images)
    # (basis "own" unless the setting names another: every merge matches, the activation merge measured since
    # the first version of this benchmark; in the shipped shared basis only the first round matches and the
    # rest average, which a share run of several rounds with ``--share-basis shared`` measures.)
    rounds = spec.get("rounds", 1)
    merge = MergeCallback(
        every_n_epochs=2,
        method=spec["method"],
        num_batches=4,
        optimizer_state="reset",
        basis=spec.get("basis", "own"),
        recompute_batchnorm=spec.get("batchnorm", "recompute") == "recompute",
    )
    probe = EpochPhases(phases, merge)
    for owner, name, label in (
        (MergeCallback, "merge", "merge"),
        (DIMATStrategy, "begin_round", "begin_round"),
        (MergeRound, "gather", "gather"),
        (merge_module, "merge_into_basis", "match_and_combine"),
        (MergeRound, "commit", "commit"),
        (rounds_module, "_recompute", "batchnorm"),
        (strategy_module, "export_to", "export"),
        (export_module, "merge_into_basis", "match_and_combine"),
        (export_module, "recompute_batchnorm", "batchnorm"),
    ):
        _instrument(owner, name, label, phases)
    strategy = DIMATStrategy(
        num_agents=agents,
        topology="ring",
        partition="iid",
        export="consensus",
        release_memory=RELEASE_MEMORY[spec.get("release_memory", "auto")],
    )
    # (validation, when asked for, once per round after the merge: as the protocol's check_val_every_n_epoch)
    validation = {"check_val_every_n_epoch": 2} if val_images else {"limit_val_batches": 0}
    trainer = quiet_trainer(
        "cpu",
        2 * rounds,
        [merge, probe, ValidationPhase(phases)],  # (the probe after MergeCallback)
        strategy=strategy,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **validation,
    )
    with phases.phase("fit"):
        trainer.fit(module, datamodule=data)
    after_fit = phases.high_water_mark()
    table = phases.table()
    batches = math.ceil(spec["images_per_agent"] / BATCH_SIZE)
    epoch0 = table["fit/epoch0"]["inclusive_s"]
    merges_s = [table[f"fit/epoch{2 * round_ + 1}/merge"]["inclusive_s"] for round_ in range(rounds)]
    merge_s = merges_s[0]  # (the first merge: the one the memory phases and the scaled runs describe)
    epochs_s = sum(table[f"fit/epoch{epoch}"]["inclusive_s"] for epoch in range(2 * rounds))
    validation_s = sum(p["seconds"] for label, p in table.items() if label.endswith("/validation"))
    return {
        "model_mib": model_mib,
        "data_mib": _mib(iter(data.dataset.tensors)),
        "batches_per_agent": batches,
        "resets": phases.resets,
        "merged_before_epoch_end": probe.merged_before_epoch_end,
        "released_heap": strategy.swarm.release_heap_after_backward,
        "peak_mib": phases.overall / 1024,
        "hwm_after_epoch0_mib": probe.marks["after_epoch0"] / 1024,
        "hwm_after_merge_mib": probe.marks["after_merge"] / 1024,
        "hwm_after_fit_mib": after_fit / 1024,
        "epoch0_s": epoch0,
        "epoch1_train_s": table["fit/epoch1"]["inclusive_s"] - merge_s,
        "merge_s": merge_s,
        "merges_s": merges_s,
        "train_s": epochs_s - sum(merges_s) - validation_s,
        "validation_s": validation_s,
        "export_s": table["fit/export"]["inclusive_s"],
        "fit_s": table["fit"]["inclusive_s"],
        "phases": table,
    }


# ------------------------------------------------------------------------------------------- the driver
def _per_width(values: list[str], widths: list[int], option: str) -> dict[int, str]:
    """``["5,10"]`` (every width) or ``["1=5,10", "8=5"]`` (per width) → ``{width: "5,10"}``."""
    given: dict[int, str] = {}
    for value in values:
        if "=" in value:
            width, _, rest = value.partition("=")
            given[int(width)] = rest
        else:
            given.update({width: value for width in widths})
    missing = [width for width in widths if width not in given]
    if missing:
        raise SystemExit(f"{option} names nothing for width(s) {missing}")
    return given


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The settings to measure, in order: per width, per N, per method."""
    widths = _ints(args.widths)
    agents = _per_width(args.agents, widths, "--agents")
    methods = _per_width(args.methods, widths, "--methods")
    batches = _per_width(args.batches, widths, "--batches")
    method_agents = set(_ints(args.method_agents))
    settings = []
    for width in widths:
        names = methods[width].split(",")
        for n in _ints(agents[width]):
            for index, method in enumerate(names):
                if index > 0 and method_agents and n not in method_agents:
                    continue
                images = int(batches[width]) * BATCH_SIZE
                settings.append({"agents": n, "width": width, "method": method, "images_per_agent": images})
    if args.share_images:
        for method in methods[widths[0]].split(","):
            share = {
                "agents": args.share_agents,
                "width": 1,
                "method": method,
                "images_per_agent": args.share_images,
                "rounds": args.share_rounds,
                "basis": args.share_basis,
                "val_images": args.share_validate,
                "batchnorm": args.share_batchnorm,
            }
            settings.append({**share, "share_run": True})
    return [{**setting, "release_memory": args.release_memory} for setting in settings]


def run_one(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Measures ``spec`` in a subprocess; its result, or ``{"error": ...}``."""
    spec = {**spec, "threads": args.threads, "memory_limit_mib": args.memory_limit_gb * 1024}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - started
    marked = [
        line.removeprefix(RESULT_MARK) for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)
    ]
    if done.returncode == 0 and marked:
        return {**json.loads(marked[-1]), "process_s": wall}
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode == OVER_LIMIT_EXIT:
        return {"error": f"over the memory limit of {args.memory_limit_gb:g} GiB", "over_limit": True}
    sys.stderr.write(done.stderr[-3000:])
    return {"error": f"exit code {done.returncode}: {tail}"}


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def predicted_peak_mib(spec: dict[str, Any], settings: list[dict[str, Any]]) -> float:
    """The peak of ``spec`` extrapolated from the measured settings of its width and method: the line through
    the two largest smaller N, or proportional to N from one; 0 without any."""
    done = sorted(
        (s["agents"], s["peak_mib"])
        for s in settings
        if "error" not in s
        and (s["width"], s["method"], s["images_per_agent"])
        == (spec["width"], spec["method"], spec["images_per_agent"])
        and s["agents"] < spec["agents"]
    )
    if not done:
        return 0.0
    if len(done) == 1:
        return done[0][1] * spec["agents"] / done[0][0]
    (n0, p0), (n1, p1) = done[-2:]
    return p1 + (spec["agents"] - n1) * (p1 - p0) / (n1 - n0)


def summarise(spec: dict[str, Any], rows: list[dict[str, Any]], baseline_mib: float) -> dict[str, Any]:
    """One setting's entry: memory from the first repeat, times as medians over repeats."""
    first = rows[0]
    n = spec["agents"]
    images = n * spec["images_per_agent"]
    epoch0 = _median(rows, "epoch0_s")
    merge_s = _median(rows, "merge_s")
    all_merges_s = statistics.median(sum(row["merges_s"]) for row in rows)
    return {
        **spec,
        "batches_per_agent": first["batches_per_agent"],
        "released_heap": first["released_heap"],
        "model_mib": first["model_mib"],
        "data_mib": first["data_mib"],
        "peak_mib": first["peak_mib"],
        "mib_per_agent": (first["peak_mib"] - baseline_mib) / n,
        "hwm_after_epoch0_mib": first["hwm_after_epoch0_mib"],
        "hwm_after_merge_mib": first["hwm_after_merge_mib"],
        "hwm_after_fit_mib": first["hwm_after_fit_mib"],
        "train_peak_mib": max(
            first["phases"]["fit/epoch0"]["peak_mib"], first["phases"]["fit/epoch1"]["peak_mib"]
        ),
        "merge_peak_mib": max(
            p["peak_mib"] for k, p in first["phases"].items() if k.startswith("fit/epoch1/merge")
        ),
        "export_peak_mib": max(
            p["peak_mib"] for k, p in first["phases"].items() if k.startswith("fit/export")
        ),
        "train_s_per_image": epoch0 / images,
        "train_s_per_step": epoch0 / first["batches_per_agent"],
        "merge_s": merge_s,
        "merge_s_per_agent": merge_s / n,
        "export_s": _median(rows, "export_s"),
        # (over every round of the run: with one round, the merge over the 2 epochs' training plus the merge)
        "merge_share": all_merges_s / (_median(rows, "train_s") + all_merges_s),
        # (the same over the whole rounds, their validation included; equal to merge_share without validation)
        "merge_share_of_round": all_merges_s
        / (_median(rows, "train_s") + _median(rows, "validation_s") + all_merges_s),
        "validation_s": _median(rows, "validation_s"),
        "merges_s": [
            statistics.median(merges) for merges in zip(*(row["merges_s"] for row in rows), strict=True)
        ],
        "merged_before_epoch_end": first["merged_before_epoch_end"],
        "phases": first["phases"],
        "repeats": [
            {
                key: row[key]
                for key in (
                    "epoch0_s",
                    "epoch1_train_s",
                    "merge_s",
                    "merges_s",
                    "train_s",
                    "validation_s",
                    "export_s",
                    "process_s",
                )
            }
            for row in rows
        ],
    }


def marginal(settings: list[dict[str, Any]], baselines: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per width, from its first method's runs of the scaled shape: the slope of the peak (and of the
    training and merge peaks) between the smallest and the largest N, and the extrapolation."""
    fits: dict[str, Any] = {}
    extrapolation: dict[str, Any] = {}
    for width, baseline in baselines.items():
        rows = [s for s in settings if s["width"] == width and "error" not in s and not s.get("share_run")]
        method = rows[0]["method"] if rows else None
        rows = sorted((s for s in rows if s["method"] == method), key=lambda s: s["agents"])
        if len(rows) < 2:
            continue
        low, high = rows[0], rows[-1]
        span = high["agents"] - low["agents"]

        def slope(
            key: str, low: dict[str, Any] = low, high: dict[str, Any] = high, span: int = span
        ) -> float:
            return (high[key] - low[key]) / span

        data = high["data_mib"] / high["agents"]
        fit = {
            "method": method,
            "from_agents": low["agents"],
            "to_agents": high["agents"],
            "peak": slope("peak_mib"),
            "train_peak": slope("train_peak_mib"),
            "merge_peak": slope("merge_peak_mib"),
            "export_peak": slope("export_peak_mib"),
            "data_per_agent": data,
            "peak_without_data": slope("peak_mib") - data,
            "model_mib": high["model_mib"],
        }
        fits[str(width)] = fit
        merge_per_agent = high["merge_s_per_agent"]
        extrapolation[str(width)] = {
            "agents": EXTRAPOLATE_TO,
            "peak_gib_line": (high["peak_mib"] + (EXTRAPOLATE_TO - high["agents"]) * fit["peak"]) / 1024,
            "peak_gib_baseline_plus_marginal": (baseline["peak_mib"] + EXTRAPOLATE_TO * fit["peak"]) / 1024,
            "merge_s": EXTRAPOLATE_TO * merge_per_agent,
            "train_s_per_epoch_of_200_images": EXTRAPOLATE_TO * 200 * high["train_s_per_image"],
        }
    return {"marginal": fits, "extrapolation": extrapolation}


def merge_share(settings: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The merge's share of the rounds (2 epochs + a merge) at N = ``--share-agents``, width 1: measured on
    a run of the protocol's shape (``--share-rounds`` rounds, ``--share-basis``), and computed for one round
    from the scaled runs' time per step (``--share-steps`` per epoch)."""
    ok = [s for s in settings if "error" not in s and s["width"] == 1]
    share_runs = [s for s in ok if s.get("share_run")]
    measured = {s["method"]: s["merge_share"] for s in share_runs}
    scaled = [s for s in ok if not s.get("share_run")]
    computed = {}
    if scaled:
        agents = (
            args.share_agents
            if any(s["agents"] == args.share_agents for s in scaled)
            else scaled[0]["agents"]
        )
        for s in scaled:
            if s["agents"] == agents:
                train = 2 * args.share_steps * s["train_s_per_step"]
                computed[s["method"]] = {"agents": agents, "share": s["merge_s"] / (train + s["merge_s"])}
    return {
        "agents": args.share_agents,
        "epochs_per_merge": 2,
        "images_per_agent_and_epoch": args.share_images,
        "steps_per_epoch": args.share_steps,
        "rounds": args.share_rounds,
        "basis": args.share_basis,
        "batchnorm": args.share_batchnorm,
        "validation_images": args.share_validate,
        "measured": measured,
        "measured_of_whole_round": {s["method"]: s["merge_share_of_round"] for s in share_runs},
        "measured_merge_s_per_round": {s["method"]: s["merges_s"] for s in share_runs},
        "measured_validation_s": {s["method"]: s["validation_s"] for s in share_runs},
        "computed_from_scaled": computed,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Peak memory, memory per agent and merge time per agent against N; an embedded earlier run dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure, (peak_axes, agent_axes, merge_axes) = plt.subplots(1, 3, figsize=(15, 4.6))
    runs = [("", "-", result)]
    if result.get("before"):
        runs.append((f" (before, {result['before']['commit'][:7]})", "--", result["before"]))
    colours: dict[tuple[int, str], str] = {}
    agents: set[int] = set()
    for suffix, style, run in runs:
        series: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for s in run["settings"]:
            if "error" not in s and not s.get("share_run"):
                series.setdefault((s["width"], s["method"]), []).append(s)
        for key, rows in sorted(series.items()):
            rows.sort(key=lambda s: s["agents"])
            n = [s["agents"] for s in rows]
            agents.update(n)
            colour = colours.setdefault(key, f"C{len(colours)}")
            style_of = {"linestyle": style, "marker": "o", "color": colour}
            label = f"width {key[0]}, {key[1]}{suffix}"
            peak_axes.plot(n, [s["peak_mib"] / 1024 for s in rows], label=label, **style_of)
            agent_axes.plot(n, [s["mib_per_agent"] for s in rows], label=label, **style_of)
            merge_axes.plot(n, [s["merge_s_per_agent"] for s in rows], label=label, **style_of)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axes, name in (
        (peak_axes, "peak resident memory (GiB)"),
        (agent_axes, "(peak − baseline) / N  (MiB per agent)"),
        (merge_axes, "merge time per agent (s)"),
    ):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(sorted(agents))
        axes.xaxis.set_major_formatter(plain)
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
        axes.tick_params(axis="y", which="minor", labelsize=7)
        axes.set_xlabel("agents N (one process)")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3, which="both")
    peak_axes.legend(fontsize=7)
    figure.suptitle(
        f"ResNet-20, batch 32, 2 epochs + 1 merge + consensus export, one process, {result['machine']}, "
        f"commit {result['commit'][:7]}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # (a subprocess measuring one setting)
    parser.add_argument("--widths", default="1,8", help="ResNet-20 widths, comma-separated")
    parser.add_argument(
        "--agents",
        nargs="+",
        default=["1=5,10,20,40,100", "8=5,20,40"],
        help="N: '5,10' or per width '1=5,10 8=5'",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["average,activation"],
        help="merge methods: 'a,b' or per width '1=a,b'",
    )
    parser.add_argument(
        "--method-agents",
        default="",
        help="N at which methods after the first are measured (default: every N)",
    )
    parser.add_argument(
        "--batches",
        nargs="+",
        default=["1=4", "8=1"],
        help="batches of 32 per agent and epoch (per width: '1=4')",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="times are medians over repeats; memory: repeat 1"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each measured process")
    parser.add_argument(
        "--release-memory",
        choices=sorted(RELEASE_MEMORY),
        default="auto",
        help="DIMATStrategy(release_memory=...): freed heap handed back after each agent's backward",
    )
    parser.add_argument("--share-agents", type=int, default=5, help="N of the merge-share run (width 1)")
    parser.add_argument("--share-images", type=int, default=200, help="its images per agent (0: no such run)")
    parser.add_argument(
        "--share-steps", type=int, default=7, help="batches per epoch of the protocol's round"
    )
    parser.add_argument(
        "--share-rounds", type=int, default=1, help="rounds (2 epochs + a merge) of the merge-share run"
    )
    parser.add_argument(
        "--share-basis",
        choices=("own", "shared"),
        default="own",
        help="MergeCallback(basis=...) of the merge-share run ('shared': the shipped default, which matches "
        "in the first round only)",
    )
    parser.add_argument(
        "--share-batchnorm",
        choices=("recompute", "average"),
        default="recompute",
        help="BatchNorm statistics after each merge of the merge-share run: re-estimated on 4 local batches "
        "(MergeCallback's default) or averaged like the weights (recompute_batchnorm=False)",
    )
    parser.add_argument(
        "--share-validate",
        type=int,
        default=0,
        help="held-out images every agent of the merge-share run is validated on once per round, as the "
        "protocol does on its 1,000 test images (0: no validation)",
    )
    parser.add_argument(
        "--max-predicted-gb", type=float, default=20.0, help="skip a setting predicted to peak above this"
    )
    parser.add_argument("--memory-limit-gb", type=float, default=18.0, help="stop a setting above this RSS")
    parser.add_argument("--before", type=Path, default=None, help="JSON of an earlier run to embed and plot")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: beside the JSON)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot of the JSON at --output")
    args = parse_args(parser, SMOKE)
    if args.one:
        print(RESULT_MARK + json.dumps(measure(json.loads(args.one))), flush=True)
        return
    output = output_path(args, RESULTS / "scale.json", "scale")
    if args.replot:
        plot(json.loads(output.read_text()), args.plot or output.with_suffix(".png"))
        return
    started = time.perf_counter()
    widths = _ints(args.widths)
    baselines = {}
    for width in widths:
        baselines[width] = run_one({"baseline": True, "width": width}, args)
        if "error" in baselines[width]:
            raise SystemExit(f"the baseline of width {width} failed: {baselines[width]['error']}")
        print(f"baseline width {width}: {baselines[width]['peak_mib']:.0f} MiB", flush=True)
    settings: list[dict[str, Any]] = []
    failed = False
    for spec in plan(args):
        predicted = predicted_peak_mib(spec, settings)
        if predicted > args.max_predicted_gb * 1024:
            reason = f"skipped: predicted peak {predicted / 1024:.1f} GiB > --max-predicted-gb"
            settings.append({**spec, "error": reason, "skipped": True})
            print(f"N={spec['agents']:4d} width {spec['width']} {spec['method']:10s}: {reason}", flush=True)
            continue
        rows = []
        for _ in range(args.repeats):
            row = run_one(spec, args)
            if "error" in row:
                break
            rows.append(row)
        if not rows:
            settings.append({**spec, **row})
            failed = failed or not row.get("over_limit")
            print(
                f"N={spec['agents']:4d} width {spec['width']} {spec['method']:10s}: {row['error']}",
                flush=True,
            )
            continue
        entry = summarise(spec, rows, baselines[spec["width"]]["peak_mib"])
        settings.append(entry)
        print(
            f"N={spec['agents']:4d} width {spec['width']} {spec['method']:10s}: "
            f"peak {entry['peak_mib']:7.0f} MiB ({entry['mib_per_agent']:6.1f} MiB/agent; "
            f"train {entry['train_peak_mib']:.0f}, merge "
            f"{entry['merge_peak_mib']:.0f}, export {entry['export_peak_mib']:.0f})  "
            f"{entry['train_s_per_image'] * 1e3:.2f} ms/image  merge {entry['merge_s']:.1f} s "
            f"({entry['merge_s_per_agent']:.2f} s/agent)  export {entry['export_s']:.1f} s",
            flush=True,
        )
    fitted = marginal(settings, baselines)
    result = {
        "benchmark": "scale",
        "smoke": args.smoke,
        "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} CPUs)".replace("  ", " "),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        **MEASURED_CODE,
        "model": "ResNet-20 (lightning_dimat.models.ImageClassifier), 20 classes, Adam lr 1e-3",
        "data": "random 3x32x32 images, 20 classes, IID shards, batch 32",
        "protocol": "ring, 2 epochs, MergeCallback(every_n_epochs=2, num_batches=4, "
        "optimizer_state='reset'), export='consensus', no validation (the merge-share run: on "
        f"--share-validate={args.share_validate} images once per round)",
        "threads": args.threads,
        "release_memory": args.release_memory,
        "environment": {
            key: value
            for key, value in sorted(os.environ.items())
            if key.startswith(("MALLOC_", "PYTHONPATH"))
        },
        "repeats": args.repeats,
        "seconds": time.perf_counter() - started,
        "baseline": {str(width): row for width, row in baselines.items()},
        "settings": settings,
        "marginal_mib_per_agent": fitted["marginal"],
        "extrapolation_1000": fitted["extrapolation"],
        "merge_share": merge_share(settings, args),
    }
    if args.before is not None:
        before = json.loads(args.before.read_text())
        keep = (
            "commit",
            "commit_subject",
            "package",
            "uncommitted",
            "baseline",
            "settings",
            "marginal_mib_per_agent",
        )
        result["before"] = {key: before[key] for key in keep if key in before}
    for width, fit in fitted["marginal"].items():
        line = fitted["extrapolation"][width]
        print(
            f"width {width}: {fit['peak']:.1f} MiB per extra agent "
            f"({fit['peak_without_data']:.1f} without its data); "
            f"{EXTRAPOLATE_TO} agents ≈ {line['peak_gib_line']:.1f} GiB"
        )
    shares = result["merge_share"]
    for method, share in shares["measured"].items():
        validated = (
            f"; of the whole rounds with their validation on {args.share_validate} images: "
            f"{shares['measured_of_whole_round'][method]:.1%}"
            if args.share_validate
            else ""
        )
        print(
            f"merge share (N={args.share_agents}, {method}, basis {args.share_basis}, BatchNorm "
            f"{args.share_batchnorm}d, "
            f"{args.share_rounds} round(s) of 2 epochs) of training + merge: {share:.1%}{validated}"
        )
    save_json(result, output)
    if any(not s.get("share_run") for s in settings):  # (a merge-share run alone has nothing to plot)
        picture = args.plot or output.with_suffix(".png")
        plot(result, picture)
        print(f"saved {picture}", flush=True)
    if failed:
        raise SystemExit("some settings failed (see above)")


if __name__ == "__main__":
    main()
