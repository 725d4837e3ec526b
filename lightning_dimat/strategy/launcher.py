"""Lightning's spawn/fork launcher, handing the exported module back instead of rank 0's agents."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from typing_extensions import override


class ExportingMultiProcessingLauncher(_MultiProcessingLauncher):
    """Hands the *exported* module (not rank 0's agents) back to the main process, where your module is."""

    @override
    def _collect_rank_zero_results(self, trainer: Trainer, results: Any) -> _WorkerOutput | None:
        """Lightning's results, with the user's module in place of the swarm."""
        strategy = trainer.strategy
        swarm, user_module = strategy._lightning_module, getattr(strategy, "user_module", None)
        if user_module is not None:
            strategy._lightning_module = user_module
        try:
            return super()._collect_rank_zero_results(trainer, results)
        finally:
            strategy._lightning_module = swarm
