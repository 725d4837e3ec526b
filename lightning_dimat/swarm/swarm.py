"""``AgentSwarm``: the LightningModule that Lightning drives when ``DIMATStrategy`` is in use.

It holds this process's agents (deep copies of the user's module, keyed by global agent id), fans
every hook out to them, runs each agent's ``training_step`` on that agent's own batch inside the
agent's own random stream, and steps each agent's own optimizer (manual optimization; Lightning sees
one :class:`~lightning_dimat.swarm.optimizer.SwarmOptimizer`, so ``global_step`` counts batches).
Each agent's ``self.log(name, ...)`` appears as ``agent_<g>/<name>`` and ``<name>`` is the mean over
agents (see :mod:`lightning_dimat.swarm.log_routing`). Batch transfer and checkpoint hooks live in
:mod:`lightning_dimat.swarm.transfer` and :mod:`lightning_dimat.swarm.checkpoints`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import Metric
from typing_extensions import override

import lightning_dimat.swarm.heap as heap
from lightning_dimat.merge.state import copy_holding
from lightning_dimat.swarm.checkpoints import AgentCheckpointHooks
from lightning_dimat.swarm.loaders import AgentBatch
from lightning_dimat.swarm.log_routing import AgentLogRouter, ConsensusLog
from lightning_dimat.swarm.optimizer import SwarmOptimizer
from lightning_dimat.swarm.random_streams import LIBRARIES, AgentRandomStreams, untracked_fingerprint
from lightning_dimat.swarm.transfer import AgentBatchTransferHooks


class AgentSwarm(AgentBatchTransferHooks, AgentCheckpointHooks):
    """Holds the local agents and makes Lightning train them side by side.

    Built by :class:`~lightning_dimat.strategy.DIMATStrategy`; users do not create it themselves. Use
    :func:`swarm_class_for` to get the class that exposes exactly the step methods the user's module has.

    Args:
        agents: ``{global agent id: LightningModule}`` living in this process.
        streams: the agents' random streams.
        num_agents: number of agents over all processes (default: ``len(agents)``).
        world_size: number of processes the agents are spread over.

    Examples:
        >>> import torch
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> swarm = AgentSwarm({0: BoringModel(), 1: BoringModel()}, AgentRandomStreams(0, [0, 1]))
        >>> sorted(swarm(torch.zeros(2, 32)))
        [0, 1]
    """

    def __init__(
        self,
        agents: Mapping[int, LightningModule],
        streams: AgentRandomStreams,
        num_agents: int | None = None,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.agents = nn.ModuleDict({str(agent_id): agent for agent_id, agent in agents.items()})
        self.agent_ids = sorted(agents)
        self.num_agents = len(agents) if num_agents is None else num_agents
        self.streams = streams
        self.world_size = world_size
        self.gradient_clip_val: float | None = None
        self.gradient_clip_algorithm: str | None = None
        self.accumulate_grad_batches = 1
        self.release_heap_after_backward = False
        """Hand freed heap memory back after each agent's backward (see :mod:`lightning_dimat.swarm.heap`)."""
        # Bound methods and partials rather than closures: a copy of the swarm gets a router of its own.
        self.router = AgentLogRouter(
            log=self.log,
            current_hook=functools.partial(getattr, self, "_current_fx_name"),
            trainer=functools.partial(getattr, self, "_trainer"),
            device=functools.partial(getattr, self, "device"),
            all_gather_object=self._all_gather_object,
            agent_ids=self.agent_ids,
        )
        self.consensus_log = ConsensusLog(log=self.log, trainer=functools.partial(getattr, self, "_trainer"))
        object.__setattr__(self, "_held_consensus", None)  # (not a submodule: never in the checkpoint)
        self._agent_losses: dict[int, Tensor] = {}
        self._backward_agent: int | None = None
        self._agent_outputs: dict[int, Any] = {}
        self.pending_initialisation: Callable[[], None] | None = None
        self._untracked_random_state: tuple[int, ...] | None = None
        self._warned_untracked = False
        template = self.agent(self.agent_ids[0])
        self._hparams_name = getattr(template, "_hparams_name", None)
        if hasattr(template, "_hparams"):
            self._set_hparams(dict(template.hparams))
            self._hparams_initial = template.hparams_initial
        self._log_hyperparams = getattr(template, "_log_hyperparams", True)
        for agent_id in self.agent_ids:
            self._wire_agent(agent_id)

    # ------------------------------------------------------------------ agents
    def agent(self, agent_id: int) -> LightningModule:
        """The local agent with global id ``agent_id``."""
        key = str(agent_id)
        if key not in self.agents:
            raise KeyError(
                f"Agent {agent_id} does not live in this process (local agents: {self.agent_ids})."
            )
        return self.agents[key]

    def items(self) -> list[tuple[int, LightningModule]]:
        """``(global id, agent)`` pairs of the local agents, in id order."""
        return [(agent_id, self.agent(agent_id)) for agent_id in self.agent_ids]

    @override
    def forward(self, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Every local agent's output, ``{agent id: agent(*args, **kwargs)}``."""
        return {agent_id: agent(*args, **kwargs) for agent_id, agent in self.items()}

    @property
    def swarm_optimizer(self) -> SwarmOptimizer:
        """The local agents' optimizers as Lightning holds them (only while fitting)."""
        optimizers = self.trainer.strategy.optimizers
        if not optimizers or not isinstance(optimizers[0], SwarmOptimizer):
            raise RuntimeError("The agents' optimizers exist only while fitting.")
        return optimizers[0]

    def _wire_agent(self, agent_id: int) -> None:
        """Routes the agent's ``log``, ``optimizers`` and ``lr_schedulers`` to the swarm."""
        agent = self.agent(agent_id)
        # Weak references: a deep copy of an agent (merging, exporting) must not drag the whole swarm along.
        router, swarm = weakref.ref(self.router), weakref.ref(self)
        agent.log = functools.partial(_call_weakly, router, "log", agent_id)  # type: ignore[method-assign]
        agent.optimizers = functools.partial(_call_weakly, swarm, "_agent_optimizer", agent_id)  # type: ignore[method-assign]
        agent.lr_schedulers = functools.partial(_call_weakly, swarm, "_agent_schedulers", agent_id)  # type: ignore[method-assign]
        for module in agent.modules():
            if isinstance(module, Metric):
                # Agent metrics are per agent: never average them with other processes' agents.
                module.sync_on_compute = False
                module.dist_sync_on_step = False

    def _agent_optimizer(self, agent_id: int, use_pl_optimizer: bool = True) -> Optimizer:
        """What agent ``agent_id``'s ``self.optimizers()`` returns: its own optimizer."""
        return self.swarm_optimizer.optimizers[agent_id]

    def _agent_schedulers(self, agent_id: int) -> Any:
        """What agent ``agent_id``'s ``self.lr_schedulers()`` returns (``None``, one, or a list)."""
        schedulers = [config.scheduler for config in self.swarm_optimizer.schedulers[agent_id]]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def _all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` from every process in rank order (``[obj]`` in one process, without a collective)."""
        return [obj] if self.world_size == 1 else self.trainer.strategy.all_gather_object(obj)

    def _fan_out(self, hook: str, *args: Any) -> None:
        """Calls ``hook`` on every agent that overrides it, in its stream, with logging routed."""
        for agent_id, agent in self.items():
            if is_overridden(hook, agent, LightningModule):
                with self.streams.activate(agent_id), self.router.speaking_for(agent_id):
                    getattr(agent, hook)(*args)
        self.router.flush()

    def _fan_out_batch(self, hook: str, agent_id: int, *args: Any) -> Any:
        """Calls ``hook`` on agent ``agent_id`` if it overrides it, in its stream, with logging routed."""
        agent = self.agent(agent_id)
        if not is_overridden(hook, agent, LightningModule):
            return None
        with self.streams.activate(agent_id), self.router.speaking_for(agent_id):
            result = getattr(agent, hook)(*args)
        self.router.flush()
        return result

    # ----------------------------------------------------------- optimization
    @override
    def configure_optimizers(self) -> SwarmOptimizer:
        """Every agent's own optimizer and schedulers, as one :class:`SwarmOptimizer`."""
        optimizers: dict[int, Optimizer] = {}
        schedulers: dict[int, list[LRSchedulerConfig]] = {}
        for agent_id, agent in self.items():
            try:
                agent_optimizers, agent_schedulers = _init_optimizers_and_lr_schedulers(agent)
            except (MisconfigurationException, RuntimeError) as error:
                if "multiple optimizers" not in str(error).lower():
                    raise
                raise MisconfigurationException(
                    f"{type(agent).__name__}.configure_optimizers returns several optimizers; each DIMAT "
                    "agent trains with exactly one (automatic optimization). Return a single optimizer."
                ) from error
            if len(agent_optimizers) != 1:
                raise MisconfigurationException(
                    f"Each agent needs exactly one optimizer, but configure_optimizers of "
                    f"{type(agent).__name__} returned {len(agent_optimizers)}."
                )
            optimizers[agent_id] = agent_optimizers[0]
            schedulers[agent_id] = agent_schedulers
        return SwarmOptimizer(optimizers, schedulers, before_agent_step=self._before_agent_step)

    def _before_agent_step(self, agent_id: int, optimizer: Optimizer) -> None:
        """The agent's ``on_before_optimizer_step``, then gradient clipping (the Trainer's settings)."""
        agent = self.agent(agent_id)
        if is_overridden("on_before_optimizer_step", agent, LightningModule):
            with self.router.speaking_for(agent_id):
                agent.on_before_optimizer_step(optimizer)
            self.router.flush()
        if self.gradient_clip_val:
            agent.configure_gradient_clipping(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Each agent's ``training_step`` on its own batch and its backward — one agent at a time, so only
        one agent's activations are alive at once — then the agents' optimizer steps."""
        batch = _agent_batch(batch)
        lightning_optimizer = self.optimizers()
        swarm_optimizer = self.swarm_optimizer
        self._agent_losses, self._agent_outputs = {}, {}
        for agent_id, agent_batch in batch.items():
            if agent_batch is None:
                continue
            agent = self.agent(agent_id)
            with (
                self.streams.activate(agent_id),
                self.router.speaking_for(agent_id, _batch_size(agent_batch)),
            ):
                output = agent.training_step(agent_batch, batch_idx)
            self._agent_outputs[agent_id] = output
            loss = _loss_of(agent_id, output)
            if loss is not None:
                self._agent_losses[agent_id] = loss
                swarm_optimizer.mark_active(agent_id)
                self._backward_agent = agent_id
                try:  # (an agent's loss depends on its own weights only: the same gradients as one sum)
                    self.manual_backward(loss.float() / self.accumulate_grad_batches)
                finally:
                    self._backward_agent = None
                if self.release_heap_after_backward:  # (its activations are freed: keep the peak at one's)
                    heap.release_freed_heap()
        self.router.flush()
        if (batch_idx + 1) % self.accumulate_grad_batches == 0 or self.trainer.is_last_batch:
            # (A mixed-precision scaler may skip the step on inf gradients; schedulers step regardless,
            # as Lightning's do.)
            stepping = sorted(swarm_optimizer.active)
            lightning_optimizer.step()
            swarm_optimizer.active.clear()
            self._step_schedulers("step", stepping)
            for agent_id, agent_optimizer in swarm_optimizer.optimizers.items():
                self._fan_out_batch("on_before_zero_grad", agent_id, agent_optimizer)
            lightning_optimizer.zero_grad()

    def _step_schedulers(self, interval: str, agent_ids: list[int]) -> None:
        """Steps the ``interval`` (``"step"`` or ``"epoch"``) schedulers of ``agent_ids`` that are due."""
        swarm_optimizer = self.swarm_optimizer
        for agent_id in agent_ids:
            count = swarm_optimizer.steps[agent_id] if interval == "step" else self.current_epoch + 1
            for config in swarm_optimizer.schedulers[agent_id]:
                if config.interval != interval or count % config.frequency != 0:
                    continue
                self._step_scheduler(agent_id, config)

    def _step_scheduler(self, agent_id: int, config: LRSchedulerConfig) -> None:
        """Steps one scheduler through the agent's ``lr_scheduler_step`` (with its own monitored metric)."""
        metric = None
        if config.reduce_on_plateau:
            key = f"agent_{agent_id}/{config.monitor}"
            metric = self.trainer.callback_metrics.get(key)
            if metric is None:
                if not config.strict:
                    return
                available = ", ".join(sorted(self.trainer.callback_metrics)) or "none"
                raise MisconfigurationException(
                    f"Agent {agent_id}'s ReduceLROnPlateau monitors {config.monitor!r}, looked up as "
                    f"{key!r}, "
                    f"which was not logged. Available metrics: {available}. Log {config.monitor!r} from the "
                    "module, or set 'strict': False in the scheduler config."
                )
        self.agent(agent_id).lr_scheduler_step(config.scheduler, metric)

    @override
    def on_before_backward(self, loss: Tensor) -> None:
        """The ``on_before_backward`` of the agent whose backward runs, with its own loss."""
        agent_id = self._backward_agent
        if agent_id is not None:
            self._fan_out_batch("on_before_backward", agent_id, self._agent_losses[agent_id])

    @override
    def on_after_backward(self) -> None:
        """The ``on_after_backward`` of the agent whose backward ran."""
        if self._backward_agent is not None:
            self._fan_out_batch("on_after_backward", self._backward_agent)

    def _warn_about_untracked_randomness(self) -> None:
        """Warns once if a global generator that no agent stream covers was drawn from this epoch."""
        if self._warned_untracked or self._untracked_random_state is None:
            return
        if untracked_fingerprint(self.streams.libraries) != self._untracked_random_state:
            self._warned_untracked = True
            untracked = [name for name in LIBRARIES if name not in self.streams.libraries]
            rank_zero_warn(
                f"Something drew from the global {' or '.join(untracked)} random generator during the "
                "training epoch. If it was agent code (e.g. augmentation in the main process), agents share "
                "that stream and results depend on how agents are placed; give each agent its own with "
                f"DIMATStrategy(random_streams={(*self.streams.libraries, *untracked)!r})."
            )

    # ------------------------------------------------------------- consensus
    def hold_consensus(self, state: Mapping[str, Tensor]) -> None:
        """Keeps a copy of the first local agent holding ``state`` (the consensus exported after ``fit``):
        ``validate`` and ``test`` then evaluate it next to the agents and log ``consensus/<name>``. A new
        ``fit`` drops it."""
        held = copy_holding(self.agent(self.agent_ids[0]), state).eval()
        held.log = self.consensus_log.log  # type: ignore[method-assign]
        object.__setattr__(self, "_held_consensus", held)

    @property
    def held_consensus(self) -> LightningModule | None:
        """The consensus evaluated by ``validate`` and ``test`` after ``fit`` (``None`` before)."""
        return self.__dict__["_held_consensus"]

    def _prepare_consensus(self) -> None:
        """Puts the held consensus on the swarm's device, in eval mode, with the trainer."""
        if self.held_consensus is not None:
            self.held_consensus.to(self.device).eval()
            self.held_consensus.trainer = self._trainer

    def _consensus_epoch_end(self, hook: str) -> None:
        """The held consensus's own ``hook`` (an ``on_*_epoch_end``), then its ``consensus/*`` values."""
        held = self.held_consensus
        if held is None:
            return
        if is_overridden(hook, held, LightningModule):
            getattr(held, hook)()
        self.consensus_log.flush_epoch()

    # ------------------------------------------------------------ evaluation
    def _evaluation_step(self, hook: str, batch: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Every agent's ``hook`` (a step method) on the shared ``batch``, ``{agent id: output}`` (and the
        held consensus's, logged as ``consensus/<name>``, in validation and test)."""
        outputs, batch_size = {}, _batch_size(batch)
        for agent_id, agent in self.items():
            with self.streams.activate(agent_id), self.router.speaking_for(agent_id, batch_size):
                outputs[agent_id] = getattr(agent, hook)(batch, *args, **kwargs)
        self.router.flush()
        if self.held_consensus is not None and hook != "predict_step":
            with self.consensus_log.batch(batch_size):
                getattr(self.held_consensus, hook)(batch, *args, **kwargs)
        return outputs

    @override
    def predict_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Every agent's prediction, ``{agent id: prediction}``."""
        return self._evaluation_step("predict_step", batch, *args, **kwargs)

    def _evaluation_batch_end(
        self, hook: str, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> None:
        """Each agent's ``hook`` (an ``on_*_batch_end``) with its own step output."""
        for agent_id, agent in self.items():
            if is_overridden(hook, agent, LightningModule):
                with self.streams.activate(agent_id), self.router.speaking_for(agent_id):
                    getattr(agent, hook)(outputs[agent_id], batch, batch_idx, dataloader_idx)
        self.router.flush()

    # ------------------------------------------------------------- lifecycle
    @override
    def prepare_data(self) -> None:
        """The user's ``prepare_data`` (downloads etc.), run once: on the first local agent."""
        self.agent(self.agent_ids[0]).prepare_data()

    @override
    def setup(self, stage: str) -> None:
        """Runs ``setup`` on every local agent."""
        self._fan_out("setup", stage)

    @override
    def teardown(self, stage: str) -> None:
        """Runs ``teardown`` on every local agent."""
        self._fan_out("teardown", stage)

    @override
    def configure_model(self) -> None:
        """Runs ``configure_model`` on every local agent, then the strategy's pending initialisation."""
        self._fan_out("configure_model")
        if self.pending_initialisation is not None:
            self.pending_initialisation()
            self.pending_initialisation = None

    @override
    def configure_callbacks(self) -> Any:
        """The first agent's callbacks (all agents are copies of one module, so one set is enough)."""
        return self.agent(self.agent_ids[0]).configure_callbacks()

    @override
    def on_fit_start(self) -> None:
        """Runs ``on_fit_start`` on every local agent (and drops the consensus of an earlier ``fit``)."""
        object.__setattr__(self, "_held_consensus", None)
        self._fan_out("on_fit_start")

    @override
    def on_fit_end(self) -> None:
        """Runs ``on_fit_end`` on every local agent."""
        self._fan_out("on_fit_end")

    @override
    def on_train_start(self) -> None:
        """Runs ``on_train_start`` on every local agent."""
        self._fan_out("on_train_start")

    @override
    def on_train_end(self) -> None:
        """Runs ``on_train_end`` on every local agent."""
        self._fan_out("on_train_end")

    @override
    def on_validation_start(self) -> None:
        """Runs ``on_validation_start`` on every local agent."""
        self._prepare_consensus()
        self._fan_out("on_validation_start")

    @override
    def on_validation_end(self) -> None:
        """Runs ``on_validation_end`` on every local agent."""
        self._fan_out("on_validation_end")

    @override
    def on_test_start(self) -> None:
        """Runs ``on_test_start`` on every local agent."""
        self._prepare_consensus()
        self._fan_out("on_test_start")

    @override
    def on_test_end(self) -> None:
        """Runs ``on_test_end`` on every local agent."""
        self._fan_out("on_test_end")

    @override
    def on_predict_start(self) -> None:
        """Runs ``on_predict_start`` on every local agent."""
        self._fan_out("on_predict_start")

    @override
    def on_predict_end(self) -> None:
        """Runs ``on_predict_end`` on every local agent."""
        self._fan_out("on_predict_end")

    # ------------------------------------------------------------------ epochs
    @override
    def on_train_epoch_start(self) -> None:
        """Runs ``on_train_epoch_start`` on every local agent (and notes the untracked generators)."""
        self._untracked_random_state = untracked_fingerprint(self.streams.libraries)
        self._fan_out("on_train_epoch_start")

    @override
    def on_train_epoch_end(self) -> None:
        """Runs ``on_train_epoch_end`` on every local agent, logs epoch means, steps epoch schedulers."""
        self._warn_about_untracked_randomness()
        self._fan_out("on_train_epoch_end")
        self.router.flush_epoch()
        self._step_schedulers("epoch", self.agent_ids)

    @override
    def on_validation_epoch_start(self) -> None:
        """Runs ``on_validation_epoch_start`` on every local agent."""
        self._fan_out("on_validation_epoch_start")

    @override
    def on_validation_epoch_end(self) -> None:
        """Runs ``on_validation_epoch_end`` on every local agent, then logs the epoch means."""
        self._fan_out("on_validation_epoch_end")
        self.router.flush_epoch()
        self._consensus_epoch_end("on_validation_epoch_end")

    @override
    def on_test_epoch_start(self) -> None:
        """Runs ``on_test_epoch_start`` on every local agent."""
        self._fan_out("on_test_epoch_start")

    @override
    def on_test_epoch_end(self) -> None:
        """Runs ``on_test_epoch_end`` on every local agent, then logs the epoch means."""
        self._fan_out("on_test_epoch_end")
        self.router.flush_epoch()
        self._consensus_epoch_end("on_test_epoch_end")

    @override
    def on_predict_epoch_start(self) -> None:
        """Runs ``on_predict_epoch_start`` on every local agent."""
        self._fan_out("on_predict_epoch_start")

    @override
    def on_predict_epoch_end(self) -> None:
        """Runs ``on_predict_epoch_end`` on every local agent."""
        self._fan_out("on_predict_epoch_end")

    # ----------------------------------------------------------------- batches
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Each agent's hook with its own batch; ``-1`` (skip the rest of the epoch) if all agents say so."""
        skips = [
            self._fan_out_batch("on_train_batch_start", agent_id, agent_batch, batch_idx)
            for agent_id, agent_batch in _agent_batch(batch).items()
            if agent_batch is not None
        ]
        return -1 if skips and all(skip == -1 for skip in skips) else None

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Each agent's hook with its own ``training_step`` output and its own batch."""
        for agent_id, agent_batch in _agent_batch(batch).items():
            if agent_batch is not None:
                output = self._agent_outputs.get(agent_id)
                self._fan_out_batch("on_train_batch_end", agent_id, output, agent_batch, batch_idx)

    @override
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs ``on_validation_batch_start`` on every local agent."""
        self._fan_out("on_validation_batch_start", batch, batch_idx, dataloader_idx)

    @override
    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Each agent's ``on_validation_batch_end`` with its own step output."""
        self._evaluation_batch_end("on_validation_batch_end", outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs ``on_test_batch_start`` on every local agent."""
        self._fan_out("on_test_batch_start", batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Each agent's ``on_test_batch_end`` with its own step output."""
        self._evaluation_batch_end("on_test_batch_end", outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs ``on_predict_batch_start`` on every local agent."""
        self._fan_out("on_predict_batch_start", batch, batch_idx, dataloader_idx)

    @override
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Each agent's ``on_predict_batch_end`` with its own prediction."""
        self._evaluation_batch_end("on_predict_batch_end", outputs, batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------ model modes
    @override
    def on_validation_model_eval(self) -> None:
        """Lightning's switch to eval mode, then each agent's override of this hook."""
        super().on_validation_model_eval()
        self._fan_out("on_validation_model_eval")

    @override
    def on_validation_model_train(self) -> None:
        """Lightning's switch back to train mode, then each agent's override of this hook."""
        super().on_validation_model_train()
        self._fan_out("on_validation_model_train")

    @override
    def on_test_model_eval(self) -> None:
        """Lightning's switch to eval mode, then each agent's override of this hook."""
        super().on_test_model_eval()
        self._fan_out("on_test_model_eval")

    @override
    def on_test_model_train(self) -> None:
        """Lightning's switch back to train mode, then each agent's override of this hook."""
        super().on_test_model_train()
        self._fan_out("on_test_model_train")

    @override
    def on_predict_model_eval(self) -> None:
        """Lightning's switch to eval mode, then each agent's override of this hook."""
        super().on_predict_model_eval()
        self._fan_out("on_predict_model_eval")


class _ValidationStep(AgentSwarm):
    """An ``AgentSwarm`` with ``validation_step``, for user modules that have one."""

    @override
    def validation_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Every agent's ``validation_step`` on the shared batch, ``{agent id: output}``."""
        return self._evaluation_step("validation_step", batch, *args, **kwargs)


class _TestStep(AgentSwarm):
    """An ``AgentSwarm`` with ``test_step``, for user modules that have one."""

    @override
    def test_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Every agent's ``test_step`` on the shared batch, ``{agent id: output}``."""
        return self._evaluation_step("test_step", batch, *args, **kwargs)


class _ValidationAndTestSteps(_ValidationStep, _TestStep):
    """An ``AgentSwarm`` with ``validation_step`` and ``test_step``."""


_SWARM_CLASSES: dict[frozenset[str], type[AgentSwarm]] = {
    frozenset(): AgentSwarm,
    frozenset({"validation_step"}): _ValidationStep,
    frozenset({"test_step"}): _TestStep,
    frozenset({"validation_step", "test_step"}): _ValidationAndTestSteps,
}


def swarm_class_for(template: LightningModule) -> type[AgentSwarm]:
    """The ``AgentSwarm`` class exposing ``validation_step``/``test_step`` iff ``template`` has them.

    Lightning decides whether to run a validation or test loop by checking whether these methods are
    overridden, so the swarm must mirror the user's module.

    Examples:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> class NoTest(BoringModel):
        ...     test_step = LightningModule.test_step
        >>> cls = swarm_class_for(NoTest())
        >>> [is_overridden(step, cls, LightningModule) for step in ("validation_step", "test_step")]
        [True, False]
    """
    steps = frozenset(
        hook for hook in ("validation_step", "test_step") if is_overridden(hook, template, LightningModule)
    )
    return _SWARM_CLASSES[steps]


def _call_weakly(target: weakref.ref, method: str, agent_id: int, *args: Any, **kwargs: Any) -> Any:
    """``target().<method>(agent_id, ...)``, or a clear error once the swarm is gone."""
    owner = target()
    if owner is None:
        raise RuntimeError(
            f"Agent {agent_id}'s swarm no longer exists; log and optimizers() work only inside it."
        )
    return getattr(owner, method)(agent_id, *args, **kwargs)


def _agent_batch(batch: Any) -> AgentBatch:
    """``batch`` if it is an ``AgentBatch``, else a clear error (one training dataloader only)."""
    if not isinstance(batch, AgentBatch):
        raise TypeError(
            f"AgentSwarm expects one batch per agent (an AgentBatch) but got {type(batch).__name__}. "
            "DIMATStrategy supports exactly one training dataloader (return a single DataLoader)."
        )
    return batch


def _loss_of(agent_id: int, output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output (``None``: the agent skips this batch)."""
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise MisconfigurationException(
                f"Agent {agent_id}'s training_step returned a dict without 'loss' (keys: {sorted(output)})."
            )
        output = output["loss"]
    if output is None:
        return None
    if not isinstance(output, Tensor) or not output.requires_grad:
        raise MisconfigurationException(
            f"Agent {agent_id}'s training_step must return a loss tensor that requires grad (or None to skip "
            f"the batch); got {type(output).__name__}."
        )
    return output


def _batch_size(batch: Any) -> int | None:
    """Lightning's inferred batch size of ``batch``, or ``None`` if it cannot tell."""
    try:
        return extract_batch_size(batch)
    except (MisconfigurationException, RecursionError, TypeError):
        return None
