"""Lightning's CLI with the package imported (so ``strategy: dimat`` and every registry name resolve) and an
optional test run right after ``fit``. The console command itself is :mod:`lightning_dimat.console`.

In Python (what ``lightning-dimat fit --config configs/quickstart.yaml`` runs)::

    cli = build_cli(["fit", "--config", "configs/quickstart.yaml"])
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import lightning_dimat  # noqa: F401  (registers the "dimat" strategy)


class SaveConfigToLogDir(SaveConfigCallback):
    """Lightning's config saving, but only into a logger's versioned folder: with ``logger: false`` the
    run has no such folder and nothing is written (Lightning would write ``config.yaml`` into the current
    directory, overwritten by every run)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class DIMATCLI(LightningCLI):
    """``LightningCLI`` plus ``--test_after_fit``: ``trainer.test`` on the trained agents after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run trainer.test on the trained agents (per-agent and mean test metrics).",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


DESCRIPTION = (
    "lightning-dimat: N agents trained with DIMAT through Lightning's CLI (fit, validate, test, predict "
    "with a config that sets trainer.strategy to lightning_dimat.DIMATStrategy). "
    "Also: `lightning-dimat experiment FILE [--jobs N] [--dry-run]` runs a grid of runs from shared "
    "pre-trained agents and writes its tables and plots; `lightning-dimat export CKPT --agent consensus|G "
    "--output FILE` writes a plain checkpoint that your LightningModule's load_from_checkpoint reads; "
    "`lightning-dimat data tiny-imagenet SOURCE --classes K` builds a Tiny ImageNet class subset."
)


def build_cli(args: Any = None, run: bool = True, exit_on_error: bool = True) -> DIMATCLI:
    """The CLI over any LightningModule/LightningDataModule named by ``class_path``; returns it.

    ``exit_on_error=False`` raises the parser's error (with its message) instead of printing it and exiting.
    """
    return DIMATCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToLogDir,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": exit_on_error, "description": DESCRIPTION},
        args=args,
        run=run,
    )
