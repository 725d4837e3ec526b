"""Routes each agent's ``self.log`` to the swarm: ``agent_<g>/<name>`` per agent and ``<name>`` as their mean.

The plain name keeps ``ModelCheckpoint(monitor="val_acc")``, ``EarlyStopping`` and progress bars working
unchanged. Tensor and number values are averaged over agents at every call (for evaluation, where all
agents see the same batches, Lightning's epoch reduction of that mean equals the mean of the agents'
epoch values). A ``torchmetrics.Metric`` logged for the epoch (``on_epoch=True``) is averaged at the end
of the epoch as the mean of the agents' ``compute()`` results, so non-decomposable metrics (F1, AUROC) are
exact too; its per-step value is the mean of the agents' last ``forward`` values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.connectors.logger_connector.fx_validator import _FxValidator
from torchmetrics import Metric

if TYPE_CHECKING:
    from lightning_dimat.swarm import AgentSwarm


def agent_key(agent_id: int, name: str) -> str:
    """The name under which agent ``agent_id``'s metric ``name`` is logged."""
    return f"agent_{agent_id}/{name}"


@dataclass
class _Pending:
    options: dict[str, Any]
    values: dict[int, Any] = field(default_factory=dict)
    batch_sizes: dict[int, int | None] = field(default_factory=dict)


class AgentLogRouter:
    """Collects agents' ``log`` calls during one fan-out and logs their means afterwards."""

    def __init__(self, swarm: AgentSwarm) -> None:
        self.swarm = swarm
        self._agent: int | None = None
        self._batch_size: int | None = None
        self._pending: dict[str, _Pending] = {}
        self._epoch_metrics: dict[str, _Pending] = {}

    @contextmanager
    def speaking_for(self, agent_id: int, batch_size: int | None = None) -> Iterator[None]:
        """Attributes ``log`` calls in the block to ``agent_id`` (with a default ``batch_size``)."""
        previous = self._agent, self._batch_size
        self._agent, self._batch_size = agent_id, batch_size
        try:
            yield
        finally:
            self._agent, self._batch_size = previous

    def log(self, agent_id: int, name: str, value: Any, **options: Any) -> None:
        """Stands in for an agent's ``LightningModule.log``."""
        if options.get("batch_size") is None and agent_id == self._agent and self._batch_size is not None:
            options["batch_size"] = self._batch_size
        mean_options = dict(options)
        options["prog_bar"] = False
        options["sync_dist"] = False
        LightningModule.log(self.swarm, agent_key(agent_id, name), value, **options)
        pending = self._pending.setdefault(name, _Pending(mean_options))
        pending.values[agent_id] = value
        pending.batch_sizes[agent_id] = options.get("batch_size")

    def flush(self) -> None:
        """Logs the mean over agents of everything logged since the last flush."""
        pending, self._pending = self._pending, {}
        for name, entry in pending.items():
            options = dict(entry.options)
            values = list(entry.values.values())
            if all(isinstance(value, Metric) for value in values):
                self._log_metric_means(name, entry, options)
                continue
            if any(isinstance(value, Metric) for value in values):
                raise TypeError(f"Agents logged {name!r} both as a torchmetrics Metric and as a number.")
            sizes = [size for size in entry.batch_sizes.values() if size is not None]
            if sizes and options.get("batch_size") is None:
                options["batch_size"] = sum(sizes)
            self._log_mean(name, [torch.as_tensor(value) for value in values], options)

    def _log_metric_means(self, name: str, entry: _Pending, options: dict[str, Any]) -> None:
        on_step, on_epoch = self._levels(options)
        metrics = list(entry.values.values())
        options.pop("metric_attribute", None)
        if on_step and all(metric._forward_cache is not None for metric in metrics):
            step_options = {**options, "on_step": True, "on_epoch": False}
            step_name = f"{name}_step" if on_epoch else name
            self._log_mean(step_name, [torch.as_tensor(m._forward_cache) for m in metrics], step_options)
        if on_epoch:
            epoch_name = f"{name}_epoch" if on_step else name
            self._epoch_metrics[epoch_name] = _Pending(
                {**options, "on_step": False, "on_epoch": True}, entry.values
            )

    def flush_epoch(self) -> None:
        """Logs the mean of the agents' epoch ``Metric`` values (call from an ``on_*_epoch_end`` hook)."""
        pending, self._epoch_metrics = self._epoch_metrics, {}
        for name, entry in pending.items():
            values = [metric.compute() for metric in entry.values.values()]
            self._log_mean(name, [torch.as_tensor(value) for value in values], dict(entry.options))

    def _levels(self, options: dict[str, Any]) -> tuple[bool, bool]:
        """Lightning's own defaults for the hook being run, where the agent left them open."""
        return _FxValidator.get_default_logging_levels(
            self.swarm._current_fx_name, options.get("on_step"), options.get("on_epoch")
        )

    def _log_mean(self, name: str, values: list[torch.Tensor], options: dict[str, Any]) -> None:
        device = self.swarm.device
        mean = torch.stack([value.detach().to(device=device, dtype=torch.float32) for value in values]).mean()
        options["sync_dist"] = self.swarm.world_size > 1
        LightningModule.log(self.swarm, name, mean, **options)
