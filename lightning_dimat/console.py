"""The ``lightning-dimat`` console command: ``fit``/``validate``/``test``/``predict`` through Lightning's CLI,
``experiment`` for grids of runs.

Examples:
    lightning-dimat fit --config configs/quickstart.yaml
    lightning-dimat experiment configs/cpu/grid.yaml --jobs 2
"""

from __future__ import annotations

import sys
from typing import Any

from lightning_dimat.cli import build_cli
from lightning_dimat.experiment import main as experiment_main


def main(args: Any = None) -> None:
    """Entry point of the ``lightning-dimat`` console script (``experiment`` runs an experiment grid)."""
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] == "experiment":
        experiment_main(argv[1:])
        return
    build_cli(args)


if __name__ == "__main__":
    main()
