"""The ``lightning-dimat`` console command: ``fit``/``validate``/``test``/``predict`` through Lightning's CLI,
``experiment`` for grids of runs, ``export`` for a plain checkpoint of one agent or the consensus, ``data`` to
build a dataset subset.

Examples:
    lightning-dimat fit --config configs/quickstart.yaml
    lightning-dimat experiment configs/cpu/grid.yaml --jobs 2
    lightning-dimat export run.ckpt --agent 0 --output agent0.ckpt
    lightning-dimat data tiny-imagenet tiny-imagenet-200.zip --classes 20
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from lightning_dimat.cli import build_cli
from lightning_dimat.data.subset import main as data_main
from lightning_dimat.experiment import main as experiment_main
from lightning_dimat.strategy.plain_checkpoint import export_checkpoint

RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)


class _NoTips(logging.Filter):
    """Drops Lightning's promotional "💡 Tip" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_console() -> None:
    """Keeps the console to what matters: no promotional tips from Lightning, and no deprecation warning
    that Lightning's own internals raise on every run (``LeafSpec`` in ``lightning/pytorch/utilities``)."""
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def main(args: Any = None) -> None:
    """Entry point of the ``lightning-dimat`` console script (``experiment``, ``export`` and ``data`` are this
    package's own subcommands; everything else goes to Lightning's CLI)."""
    quiet_console()
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] == "experiment":
        experiment_main(argv[1:])
        return
    if argv and argv[0] == "export":
        export_command(argv[1:])
        return
    if argv and argv[0] == "data":
        data_main(argv[1:])
        return
    build_cli(args)


def export_command(argv: Sequence[str]) -> None:
    """``lightning-dimat export CKPT --agent consensus|G --output FILE [--config YAML ...]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-dimat export",
        description="Writes a plain Lightning checkpoint of one agent, or of the consensus of all agents, "
        "of a DIMAT checkpoint; your module's load_from_checkpoint reads it.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by a DIMATStrategy run")
    parser.add_argument("--agent", default="consensus", help="'consensus' (default) or an agent id")
    parser.add_argument("--output", required=True, help="where to write the plain checkpoint")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="for --agent consensus: the run's fit config (repeatable, as for `lightning-dimat fit`)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    agent: int | Literal["consensus"]
    if args.agent == "consensus":
        agent = "consensus"
    elif args.agent.isdigit():
        agent = int(args.agent)
    else:
        parser.error(f"--agent {args.agent!r}: pass 'consensus' or an agent id (0, 1, ...).")
    trainer = model = datamodule = None
    if agent == "consensus":
        if not args.config:
            parser.error(
                "--agent consensus needs --config <the run's config>: the consensus is computed with the "
                "run's merge method and data. (--agent <id> needs no config.)"
            )
        trainer, model, datamodule = _from_config(args.config)
    path = export_checkpoint(
        args.checkpoint,
        args.output,
        agent,
        trainer=trainer,
        model=model,
        datamodule=datamodule,
        overwrite=args.overwrite,
    )
    if trainer is None or trainer.is_global_zero:
        print(f"Wrote {path} (agent: {agent}); load it with YourModule.load_from_checkpoint({str(path)!r}).")


def _from_config(configs: Sequence[str]) -> tuple[Trainer, LightningModule, LightningDataModule | None]:
    """The trainer, model and datamodule of a ``fit`` config, without a logger."""
    args: list[str] = []  # (run=False: the parser has no subcommands)
    for config in configs:
        args += ["--config", config]
    # (checkpoint callbacks are dropped by export_checkpoint)
    args += ["--trainer.logger", "false", "--trainer.enable_model_summary", "false"]
    cli = build_cli(args, run=False)
    return cli.trainer, cli.model, cli.datamodule


if __name__ == "__main__":
    main()
