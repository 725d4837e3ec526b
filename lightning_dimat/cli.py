"""Lightning's CLI with the package imported (so ``strategy: dimat`` and every registry name resolve) and an
optional test run right after ``fit``. The console command itself is :mod:`lightning_dimat.console`.

In Python (what ``lightning-dimat fit --config configs/quickstart.yaml`` runs)::

    cli = build_cli(["fit", "--config", "configs/quickstart.yaml"])
"""

from __future__ import annotations

import importlib
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import lightning_dimat  # registers the "dimat" strategy
import lightning_dimat.data  # the shipped datamodules, offered as --data choices
import lightning_dimat.models  # noqa: F401  (the shipped LightningModule, offered as a --model choice)
from lightning_dimat.data.splits import SplitDataModule
from lightning_dimat.swarm import AgentSwarm
from lightning_dimat.swarm.checkpoints import AgentCheckpointHooks
from lightning_dimat.swarm.transfer import AgentBatchTransferHooks

# Never a class to name in a config, so left out of the known subclasses that ``--help`` lists: what
# DIMATStrategy builds from your module (AgentSwarm, any subclass included, and its hook mixins) and the
# shipped datamodules' base class.
INTERNAL_CLASSES = (AgentSwarm, AgentCheckpointHooks, AgentBatchTransferHooks, SplitDataModule)
KNOWN_SUBCLASSES = ", known subclasses: "


def is_internal(class_path: str) -> bool:
    """Whether ``class_path`` (as ``--help`` lists it) names one of :data:`INTERNAL_CLASSES` or an
    ``AgentSwarm`` subclass.

    Examples:
        >>> is_internal("lightning_dimat.AgentSwarm"), is_internal("lightning_dimat.models.ImageClassifier")
        (True, False)
    """
    module_path, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return cls in INTERNAL_CLASSES or (isinstance(cls, type) and issubclass(cls, AgentSwarm))


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the package's internal classes left out of the "known subclasses" lists
    (jsonargparse lists every imported subclass of an argument's type, so the swarm shows up as a model)."""

    def _get_help_string(self, action: Any) -> str:
        text = super()._get_help_string(action)
        head, marker, tail = text.rpartition(KNOWN_SUBCLASSES)
        if not marker or not tail.endswith(")"):
            return text
        kept = [path for path in tail[:-1].split(", ") if not is_internal(path)]
        return head + (marker + ", ".join(kept) if kept else "") + ")"


class SaveConfigToLogDir(SaveConfigCallback):
    """Lightning's config saving, but only into a logger's versioned folder: with ``logger: false`` the
    run has no such folder and nothing is written (Lightning would write ``config.yaml`` into the current
    directory, overwritten by every run)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


def finish_wandb_runs(trainer: Trainer) -> None:
    """Finishes the W&B run of each of ``trainer``'s ``WandbLogger``s that started one.

    Lightning's ``WandbLogger`` never finishes its run: wandb does at interpreter exit, so in a process that
    goes on (a notebook, ``build_cli`` called from Python) the run stays open and the next ``WandbLogger``
    attaches to it. Finishing writes the run's final summary and exit record (offline: into the run's
    ``.wandb`` file, from which ``wandb sync`` makes ``files/wandb-summary.json``).
    """
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None)  # (``logger.experiment`` would start a run)
        if isinstance(logger, WandbLogger) and run is not None:
            run.finish()


class DIMATCLI(LightningCLI):
    """``LightningCLI`` plus ``--test_after_fit``: ``trainer.test`` on the trained agents after ``fit``; its
    help lists no internal classes (:class:`HelpFormatter`), and a subcommand that ran finishes its W&B run
    (:func:`finish_wandb_runs`; after ``--test_after_fit``'s test, so the run holds the test metrics too)."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("formatter_class", HelpFormatter)
        return super().init_parser(**kwargs)

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
        finish_wandb_runs(self.trainer)

    def after_validate(self) -> None:
        finish_wandb_runs(self.trainer)

    def after_test(self) -> None:
        finish_wandb_runs(self.trainer)

    def after_predict(self) -> None:
        finish_wandb_runs(self.trainer)


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
