"""Routes each agent's ``self.log`` to the swarm: ``agent_<g>/<name>`` per agent and ``<name>`` as their mean.

The plain name keeps ``ModelCheckpoint(monitor="val_acc")``, ``EarlyStopping`` and progress bars working
unchanged. Each agent's own key is logged through Lightning exactly as the agent asked. The mean is:

- per step (``on_step``): the mean over the agents that logged at that step;
- per epoch (``on_epoch``): the mean over agents of each agent's own epoch value, reduced the way Lightning
  reduces it (``reduce_fx`` mean weighted by batch size, sum, max, min, or a callable; a
  ``torchmetrics.Metric`` by its ``compute()``), logged at the end of that stage's epoch. It is therefore
  exact with unequal shards and for non-decomposable metrics.

Both at once give ``<name>_step`` and ``<name>_epoch``, as Lightning names them. With several evaluation
dataloaders the mean is ``<name>/dataloader_idx_<k>`` per loader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.trainer.connectors.logger_connector.fx_validator import _FxValidator
from torchmetrics import Metric

from lightning_dimat.comm.gather import AllGatherObject, gather_fields_by_agent

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

CONSENSUS_PREFIX = "consensus"
"""Metrics of the consensus evaluated after ``fit`` are logged as ``consensus/<name>``."""

_MEAN, _SUM, _MAX, _MIN = ("mean", torch.mean), ("sum", torch.sum), ("max", torch.max), ("min", torch.min)


def agent_key(agent_id: int, name: str) -> str:
    """The name under which agent ``agent_id``'s metric ``name`` is logged.

    Examples:
        >>> agent_key(3, "val_acc")
        'agent_3/val_acc'
    """
    return f"agent_{agent_id}/{name}"


def with_dataloader_suffix(name: str, options: dict[str, Any], trainer: Trainer | None) -> str:
    """``name`` with Lightning's ``/dataloader_idx_<k>`` suffix when an evaluation loader index is set."""
    index = getattr(trainer._results if trainer is not None else None, "dataloader_idx", None)
    if options.get("add_dataloader_idx", True) and index is not None:
        return f"{name}/dataloader_idx_{index}"
    return name


@dataclass
class _EpochValues:
    """One metric's logged values over an epoch, per agent (tensors with batch sizes, or the Metric)."""

    options: dict[str, Any]
    values: dict[int, list[tuple[torch.Tensor, int | None]]] = field(default_factory=dict)
    metrics: dict[int, Metric] = field(default_factory=dict)


class AgentLogRouter:
    """Collects agents' ``log`` calls and logs their means over agents, per step and per epoch.

    The router knows nothing of the module it logs on: it is handed what it needs.

    Args:
        log: ``LightningModule.log`` of the module Lightning drives (bound to it).
        current_hook: returns the name of the hook Lightning is running (it decides the default
            ``on_step``/``on_epoch``, as in Lightning).
        trainer: returns the trainer, or ``None`` outside one (for the running stage and the evaluation
            dataloader index).
        device: returns the device the means are computed and logged on.
        all_gather_object: returns an object from every process in rank order (``[obj]`` in one process).
        agent_ids: global ids of the agents that live in this process.

    Examples:
        >>> logged = {}
        >>> router = AgentLogRouter(
        ...     log=lambda name, value, **options: logged.update({name: float(value)}),
        ...     current_hook=lambda: "training_step",
        ...     trainer=lambda: None,
        ...     device=lambda: torch.device("cpu"),
        ...     all_gather_object=lambda obj: [obj],
        ...     agent_ids=[0, 1],
        ... )
        >>> router.log(0, "loss", 1.0)
        >>> router.log(1, "loss", 3.0)
        >>> router.flush()
        >>> logged
        {'agent_0/loss': 1.0, 'agent_1/loss': 3.0, 'loss': 2.0}
    """

    def __init__(
        self,
        *,
        log: Callable[..., None],
        current_hook: Callable[[], str | None],
        trainer: Callable[[], Trainer | None],
        device: Callable[[], torch.device],
        all_gather_object: AllGatherObject,
        agent_ids: Iterable[int],
    ) -> None:
        self._log = log
        self._current_hook = current_hook
        self._trainer = trainer
        self._device = device
        self._all_gather_object = all_gather_object
        self._agent_ids = frozenset(agent_ids)
        self._agent: int | None = None
        self._batch_size: int | None = None
        self._step: dict[str, tuple[dict[str, Any], dict[int, Any]]] = {}
        self._epoch: dict[str, dict[str, _EpochValues]] = {}

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
        self._log(agent_key(agent_id, name), value, **{**options, "prog_bar": False, "sync_dist": False})
        on_step, on_epoch = _FxValidator.get_default_logging_levels(
            self._current_hook(), options.get("on_step"), options.get("on_epoch")
        )
        mean_name = self._with_dataloader_suffix(name, options)
        shared = {
            key: options[key]
            for key in ("prog_bar", "logger", "rank_zero_only", "enable_graph")
            if key in options
        }
        if on_step:
            step_name = f"{mean_name}_step" if on_epoch else mean_name
            _, values = self._step.setdefault(step_name, (shared, {}))
            values[agent_id] = value._forward_cache if isinstance(value, Metric) else value
        if on_epoch:
            stage = self._stage()
            epoch_name = f"{mean_name}_epoch" if on_step else mean_name
            entry = self._epoch.setdefault(stage, {}).setdefault(
                epoch_name, _EpochValues({**shared, "reduce_fx": options.get("reduce_fx", "mean")})
            )
            if isinstance(value, Metric):
                entry.metrics[agent_id] = value
            else:
                tensor = torch.as_tensor(value).detach()
                entry.values.setdefault(agent_id, []).append((tensor, options.get("batch_size")))

    def _with_dataloader_suffix(self, name: str, options: dict[str, Any]) -> str:
        return with_dataloader_suffix(name, options, self._trainer())

    def _stage(self) -> str:
        """The running stage (``"train"``, ``"validate"``, ...), or ``"none"`` outside a trainer loop."""
        trainer = self._trainer()
        stage = trainer.state.stage if trainer is not None else None
        return str(stage.value if stage is not None else "none")

    def flush(self) -> None:
        """Logs the per-step means of everything logged since the last flush."""
        pending, self._step = self._step, {}
        for name, (options, values) in pending.items():
            present = [value for value in values.values() if value is not None]
            if present:
                self._log_mean(
                    name,
                    [torch.as_tensor(v) for v in present],
                    {**options, "on_step": True, "on_epoch": False},
                )

    def flush_epoch(self) -> None:
        """Logs the epoch means of the current stage (call at the end of its ``on_*_epoch_end`` hook).

        With several processes, every agent's epoch value is gathered to every process first: each process
        logs the same mean over *all* agents, and the other processes' agent keys too (for rank 0's
        loggers). (Step-level means stay over the local agents: no collective runs per step.)
        """
        local: dict[str, dict[int, tuple[dict[str, Any], torch.Tensor]]] = {}
        for name, entry in self._epoch.pop(self._stage(), {}).items():
            options = dict(entry.options)
            reduce_fx = options.pop("reduce_fx")
            values = {
                g: torch.as_tensor(metric.compute()).detach().cpu() for g, metric in entry.metrics.items()
            }
            values.update({g: _reduce(v, reduce_fx).detach().cpu() for g, v in entry.values.items()})
            local[name] = {g: (options, value) for g, value in values.items()}
        gathered = gather_fields_by_agent(self._all_gather_object, local)
        for name, per_agent in gathered.items():
            for agent_id, (options, value) in per_agent.items():
                if agent_id not in self._agent_ids:
                    logged = {**options, "prog_bar": False, "on_step": False, "on_epoch": True}
                    self._log(
                        agent_key(agent_id, name), value.to(self._device()), batch_size=1,
                        add_dataloader_idx=False, **logged,
                    )  # fmt: skip
        for name, per_agent in gathered.items():
            if per_agent:
                options = next(iter(per_agent.values()))[0]
                values = [value for _, value in per_agent.values()]
                self._log_mean(name, values, {**options, "on_step": False, "on_epoch": True})

    def _log_mean(self, name: str, values: list[torch.Tensor], options: dict[str, Any]) -> None:
        """Logs the float32 mean of ``values`` as ``name``."""
        device = self._device()
        mean = torch.stack([value.detach().to(device=device, dtype=torch.float32) for value in values]).mean()
        self._log(name, mean, batch_size=1, add_dataloader_idx=False, **options)


class ConsensusLog:
    """Stands in for the ``log`` of the consensus a swarm holds after ``fit``: collects its values over an
    evaluation epoch and logs each as ``consensus/<name>`` at the epoch's end (reduced as Lightning reduces
    it: batch-size weighted mean, sum, max, min, a callable, or a ``torchmetrics.Metric``'s ``compute()``).

    Examples:
        >>> logged = {}
        >>> consensus_log = ConsensusLog(
        ...     log=lambda name, value, **options: logged.update({name: float(value)}), trainer=lambda: None
        ... )
        >>> with consensus_log.batch(2):
        ...     consensus_log.log("test_acc", 1.0)
        >>> with consensus_log.batch(6):
        ...     consensus_log.log("test_acc", 0.5)
        >>> consensus_log.flush_epoch()
        >>> logged
        {'consensus/test_acc': 0.625}
    """

    def __init__(self, *, log: Callable[..., None], trainer: Callable[[], Trainer | None]) -> None:
        self._log = log
        self._trainer = trainer
        self._batch_size: int | None = None
        self._values: dict[str, _EpochValues] = {}

    @contextmanager
    def batch(self, batch_size: int | None) -> Iterator[None]:
        """``log`` calls in the block default to ``batch_size``."""
        previous, self._batch_size = self._batch_size, batch_size
        try:
            yield
        finally:
            self._batch_size = previous

    def log(self, name: str, value: Any, **options: Any) -> None:
        """Records ``value`` for this epoch's ``consensus/<name>``."""
        name = with_dataloader_suffix(name, options, self._trainer())
        entry = self._values.setdefault(name, _EpochValues({"reduce_fx": options.get("reduce_fx", "mean")}))
        if isinstance(value, Metric):
            entry.metrics[0] = value
        else:
            batch_size = options.get("batch_size") or self._batch_size
            entry.values.setdefault(0, []).append((torch.as_tensor(value).detach(), batch_size))

    def flush_epoch(self) -> None:
        """Logs every recorded value's epoch value as ``consensus/<name>`` (and resets its Metrics)."""
        pending, self._values = self._values, {}
        for name, entry in pending.items():
            if entry.metrics:
                value = torch.as_tensor(entry.metrics[0].compute()).detach()
                entry.metrics[0].reset()
            else:
                value = _reduce(entry.values[0], entry.options["reduce_fx"])
            self._log(
                f"{CONSENSUS_PREFIX}/{name}", value.float(), on_step=False, on_epoch=True, batch_size=1,
                add_dataloader_idx=False, sync_dist=False, prog_bar=False,
            )  # fmt: skip


def _reduce(values: list[tuple[torch.Tensor, int | None]], reduce_fx: Any) -> torch.Tensor:
    """One agent's epoch value, reduced as Lightning reduces logged values."""
    if isinstance(reduce_fx, str):  # as Lightning reads it: any case, "avg" for "mean"
        reduce_fx = "mean" if reduce_fx.lower() == "avg" else reduce_fx.lower()
    tensors = torch.stack([value.float().reshape(()) for value, _ in values])
    if reduce_fx in _MEAN:
        sizes = [size for _, size in values]
        if any(size is None for size in sizes):
            return tensors.mean()
        weights = torch.tensor(sizes, dtype=torch.float32, device=tensors.device)
        return (tensors * weights).sum() / weights.sum()
    if reduce_fx in _SUM:
        return tensors.sum()
    if reduce_fx in _MAX:
        return tensors.max()
    if reduce_fx in _MIN:
        return tensors.min()
    if callable(reduce_fx):
        return torch.as_tensor(reduce_fx(tensors))
    raise ValueError(f"Unknown reduce_fx {reduce_fx!r}: use 'mean', 'sum', 'max', 'min' or a callable.")
