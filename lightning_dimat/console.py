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

import logging
import sys
import warnings
from typing import Any

from lightning_dimat.cli import build_cli
from lightning_dimat.experiment import main as experiment_main

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
        from lightning_dimat.strategy.plain_checkpoint import main as export_main

        export_main(argv[1:])
        return
    if argv and argv[0] == "data":
        from lightning_dimat.data.subset import main as data_main

        data_main(argv[1:])
        return
    build_cli(args)


if __name__ == "__main__":
    main()
