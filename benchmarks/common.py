"""Pieces shared by the benchmark scripts: an epoch clock, a quiet Trainer, ``--smoke`` and ``--output``, and
the measured code's commit in every saved JSON."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

import lightning_dimat

RESULTS = Path(__file__).parent / "results"


def measured_code() -> dict[str, Any]:
    """Where ``lightning_dimat`` was imported from, its checkout's commit and subject, and uncommitted changes
    to the package (``unknown`` outside a git checkout)."""
    folder = Path(lightning_dimat.__file__).resolve().parent

    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(folder), *command], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    return {
        "package": str(folder),
        "commit": git("rev-parse", "HEAD"),
        "commit_subject": git("log", "-1", "--format=%s")[:200],
        "uncommitted": git("status", "--porcelain", "--", ".").splitlines(),
    }


# Taken when a benchmark starts (it imports this module first), not when it saves: a run that outlasts a
# commit records the code it measured.
MEASURED_CODE = measured_code()

SMOKE_HELP = (
    "tiny sizes on the CPU (seconds, 1 repeat, random data where the real data would be slow): checks that "
    "the benchmark runs, its numbers mean nothing; saves to a temporary file unless --output is given"
)


class EpochClock(Callback):
    """Wall time of every training epoch (synchronising CUDA first), and the device the module trained on."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.device = "unknown"
        self._started = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._started)
        self.device = str(next(pl_module.parameters()).device)  # (teardown moves modules back to the CPU)


def quiet_trainer(accelerator: str, epochs: int, callbacks: list[Callback], **options: Any) -> Trainer:
    """A Trainer on one device without logger, progress bar or model summary."""
    defaults: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": 1,
        "max_epochs": epochs,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
    }
    return Trainer(**{**defaults, **options})


def parse_args(
    parser: argparse.ArgumentParser, smoke: Mapping[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Adds ``--smoke`` and ``--output`` to ``parser`` and parses; ``--smoke`` swaps in ``smoke``'s defaults.

    Options given on the command line win over the smoke defaults, so ``--smoke --repeats 2`` repeats twice.
    A smoke run also uses one torch thread: its tensors are too small to gain from more, and on a busy
    machine idle-spinning threads slow tiny convolutions down tenfold. ``args.output`` stays ``None`` unless
    given: see :func:`output_path`.
    """
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    parser.add_argument("--output", type=Path, default=None, help="where to save the JSON")
    known, _ = parser.parse_known_args(argv)
    if known.smoke:
        parser.set_defaults(**smoke)
    args = parser.parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
    return args


def output_path(args: argparse.Namespace, default: Path, name: str) -> Path:
    """``--output`` if given; else a new temporary file for a smoke run (committed results stay untouched),
    else ``default``."""
    if args.output is not None:
        return Path(args.output)
    if args.smoke:
        handle, path = tempfile.mkstemp(prefix=f"{name}_smoke_", suffix=".json")
        os.close(handle)  # a unique name; save_json fills the file
        return Path(path)
    return default


def save_json(result: Mapping[str, Any], path: Path) -> None:
    """Writes ``result`` as indented JSON to ``path`` (creating its folder), with ``measured_code`` (the
    package's commit when the benchmark started) unless it has one, and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({**result, "measured_code": result.get("measured_code", MEASURED_CODE)}, indent=2)
    )
    print(f"saved {path}", flush=True)
