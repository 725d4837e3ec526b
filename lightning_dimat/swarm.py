"""``AgentSwarm``: the LightningModule that Lightning drives when ``DIMATStrategy`` is in use.

It holds this process's agents (deep copies of the user's module, keyed by global agent id), fans
every hook out to them, runs each agent's ``training_step`` on that agent's own batch inside the
agent's own random stream, and steps each agent's own optimizer (manual optimization; Lightning sees
one :class:`~lightning_dimat.swarm_optimizer.SwarmOptimizer`, so ``global_step`` counts batches).
Each agent's ``self.log(name, ...)`` appears as ``agent_<g>/<name>`` and ``<name>`` is the mean over
agents (see :mod:`lightning_dimat.agent_logging`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import Metric

from lightning_dimat.agent_data import AgentBatch
from lightning_dimat.agent_logging import AgentLogRouter
from lightning_dimat.agent_rng import LIBRARIES, AgentRandomStreams, untracked_fingerprint
from lightning_dimat.swarm_optimizer import SwarmOptimizer

# Hooks that run on every agent when the user's module overrides them (batch hooks get the agent's batch).
_PLAIN_HOOKS = (
    "on_fit_start",
    "on_fit_end",
    "on_train_start",
    "on_train_end",
    "on_validation_start",
    "on_validation_end",
    "on_test_start",
    "on_test_end",
    "on_predict_start",
    "on_predict_end",
    "on_validation_epoch_start",
    "on_test_epoch_start",
    "on_predict_epoch_start",
    "on_predict_epoch_end",
)
_EVALUATION_STEPS = ("validation_step", "test_step")


class AgentSwarm(LightningModule):
    """Holds the local agents and makes Lightning train them side by side.

    Built by :class:`~lightning_dimat.strategy.DIMATStrategy`; users do not create it themselves. Use
    :func:`swarm_class_for` to get the subclass that exposes exactly the step methods the user's module has.

    Args:
        agents: ``{global agent id: LightningModule}`` living in this process.
        streams: the agents' random streams.
        num_agents: number of agents over all processes (default: ``len(agents)``).
        world_size: number of processes the agents are spread over.
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
        self.router = AgentLogRouter(self)
        self._agent_losses: dict[int, Tensor] = {}
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

    def _wire_agent(self, agent_id: int) -> None:
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
        return self.swarm_optimizer.optimizers[agent_id]

    def _agent_schedulers(self, agent_id: int) -> Any:
        schedulers = [config.scheduler for config in self.swarm_optimizer.schedulers[agent_id]]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    @property
    def swarm_optimizer(self) -> SwarmOptimizer:
        optimizers = self.trainer.strategy.optimizers
        if not optimizers or not isinstance(optimizers[0], SwarmOptimizer):
            raise RuntimeError("The agents' optimizers exist only while fitting.")
        return optimizers[0]

    def forward(self, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Every local agent's output, ``{agent id: agent(*args, **kwargs)}``."""
        return {agent_id: agent(*args, **kwargs) for agent_id, agent in self.items()}

    def _fan_out(self, hook: str, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Calls ``hook`` on every agent that overrides it, in its stream, with logging routed."""
        outputs: dict[int, Any] = {}
        for agent_id, agent in self.items():
            if not is_overridden(hook, agent, LightningModule):
                continue
            with self.streams.activate(agent_id), self.router.speaking_for(agent_id):
                outputs[agent_id] = getattr(agent, hook)(*args, **kwargs)
        self.router.flush()
        return outputs

    # ----------------------------------------------------------- optimization
    def configure_optimizers(self) -> SwarmOptimizer:
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

    def training_step(self, batch: Any, batch_idx: int) -> None:
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
        self.router.flush()
        if self._agent_losses:
            total = torch.stack([loss.float() for loss in self._agent_losses.values()]).sum()
            self.manual_backward(total / self.accumulate_grad_batches)
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

    def _warn_about_untracked_randomness(self) -> None:
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

    def _step_schedulers(self, interval: str, agent_ids: list[int]) -> None:
        swarm_optimizer = self.swarm_optimizer
        for agent_id in agent_ids:
            count = swarm_optimizer.steps[agent_id] if interval == "step" else self.current_epoch + 1
            for config in swarm_optimizer.schedulers[agent_id]:
                if config.interval != interval or count % config.frequency != 0:
                    continue
                self._step_scheduler(agent_id, config)

    def _step_scheduler(self, agent_id: int, config: LRSchedulerConfig) -> None:
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

    def on_before_backward(self, loss: Tensor) -> None:
        for agent_id, own_loss in self._agent_losses.items():
            agent = self.agent(agent_id)
            if is_overridden("on_before_backward", agent, LightningModule):
                with self.router.speaking_for(agent_id):
                    agent.on_before_backward(own_loss)
        self.router.flush()

    def on_after_backward(self) -> None:
        for agent_id in self._agent_losses:
            agent = self.agent(agent_id)
            if is_overridden("on_after_backward", agent, LightningModule):
                with self.router.speaking_for(agent_id):
                    agent.on_after_backward()
        self.router.flush()

    # ------------------------------------------------------------ evaluation
    def _evaluation_step(self, hook: str, batch: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        outputs, batch_size = {}, _batch_size(batch)
        for agent_id, agent in self.items():
            with self.streams.activate(agent_id), self.router.speaking_for(agent_id, batch_size):
                outputs[agent_id] = getattr(agent, hook)(batch, *args, **kwargs)
        self.router.flush()
        return outputs

    def _validation_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        return self._evaluation_step("validation_step", batch, *args, **kwargs)

    def _test_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        return self._evaluation_step("test_step", batch, *args, **kwargs)

    def predict_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Every agent's prediction, ``{agent id: prediction}``."""
        return self._evaluation_step("predict_step", batch, *args, **kwargs)

    # ------------------------------------------------------------------ hooks
    def prepare_data(self) -> None:
        """The user's ``prepare_data`` (downloads etc.), run once: on the first local agent."""
        self.agent(self.agent_ids[0]).prepare_data()

    def on_validation_model_eval(self) -> None:
        self._model_mode_hook("on_validation_model_eval")

    def on_validation_model_train(self) -> None:
        self._model_mode_hook("on_validation_model_train")

    def on_test_model_eval(self) -> None:
        self._model_mode_hook("on_test_model_eval")

    def on_test_model_train(self) -> None:
        self._model_mode_hook("on_test_model_train")

    def on_predict_model_eval(self) -> None:
        self._model_mode_hook("on_predict_model_eval")

    def _model_mode_hook(self, hook: str) -> None:
        """Lightning's own mode switch on the swarm, then each agent's override of the hook (if any)."""
        getattr(LightningModule, hook)(self)
        self._fan_out(hook)

    def setup(self, stage: str) -> None:
        self._fan_out("setup", stage)

    def teardown(self, stage: str) -> None:
        self._fan_out("teardown", stage)

    def configure_model(self) -> None:
        self._fan_out("configure_model")
        if self.pending_initialisation is not None:
            self.pending_initialisation()
            self.pending_initialisation = None

    def configure_callbacks(self) -> Any:
        """The first agent's callbacks (all agents are copies of one module, so one set is enough)."""
        return self.agent(self.agent_ids[0]).configure_callbacks()

    def on_train_epoch_start(self) -> None:
        self._untracked_random_state = untracked_fingerprint(self.streams.libraries)
        self._fan_out("on_train_epoch_start")

    def on_train_epoch_end(self) -> None:
        self._warn_about_untracked_randomness()
        self._fan_out("on_train_epoch_end")
        self.router.flush_epoch()
        self._step_schedulers("epoch", self.agent_ids)

    def on_validation_epoch_end(self) -> None:
        self._fan_out("on_validation_epoch_end")
        self.router.flush_epoch()

    def on_test_epoch_end(self) -> None:
        self._fan_out("on_test_epoch_end")
        self.router.flush_epoch()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        skips = [
            self._fan_out_batch("on_train_batch_start", agent_id, agent_batch, batch_idx)
            for agent_id, agent_batch in _agent_batch(batch).items()
            if agent_batch is not None
        ]
        return -1 if skips and all(skip == -1 for skip in skips) else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for agent_id, agent_batch in _agent_batch(batch).items():
            if agent_batch is not None:
                output = self._agent_outputs.get(agent_id)
                self._fan_out_batch("on_train_batch_end", agent_id, output, agent_batch, batch_idx)

    def _fan_out_batch(self, hook: str, agent_id: int, *args: Any) -> Any:
        agent = self.agent(agent_id)
        if not is_overridden(hook, agent, LightningModule):
            return None
        with self.streams.activate(agent_id), self.router.speaking_for(agent_id):
            result = getattr(agent, hook)(*args)
        self.router.flush()
        return result

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_batch_start("on_validation_batch_start", batch, batch_idx, dataloader_idx)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_batch_start("on_test_batch_start", batch, batch_idx, dataloader_idx)

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_batch_start("on_predict_batch_start", batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_batch_end("on_predict_batch_end", outputs, batch, batch_idx, dataloader_idx)

    def _evaluation_batch_start(self, hook: str, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        for agent_id, agent in self.items():
            if is_overridden(hook, agent, LightningModule):
                with self.streams.activate(agent_id), self.router.speaking_for(agent_id):
                    getattr(agent, hook)(batch, batch_idx, dataloader_idx)
        self.router.flush()

    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluation_batch_end("on_validation_batch_end", outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_batch_end("on_test_batch_end", outputs, batch, batch_idx, dataloader_idx)

    def _evaluation_batch_end(
        self, hook: str, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> None:
        for agent_id, agent in self.items():
            if is_overridden(hook, agent, LightningModule):
                with self.streams.activate(agent_id), self.router.speaking_for(agent_id):
                    getattr(agent, hook)(outputs[agent_id], batch, batch_idx, dataloader_idx)
        self.router.flush()

    # -------------------------------------------------------- batch transfer
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._transfer("on_before_batch_transfer", batch, dataloader_idx)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self._transfer("transfer_batch_to_device", batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._transfer("on_after_batch_transfer", batch, dataloader_idx)

    def _transfer(self, hook: str, batch: Any, *args: Any) -> Any:
        if not self._transfer_hook_is_custom(hook):
            return getattr(LightningModule, hook)(self, batch, *args)
        if isinstance(batch, AgentBatch):
            return AgentBatch(
                {
                    agent_id: None
                    if agent_batch is None
                    else self.transfer_agent_batch(hook, agent_id, agent_batch, *args)
                    for agent_id, agent_batch in batch.items()
                }
            )
        return getattr(self._hook_owner(hook, self.agent_ids[0]), hook)(batch, *args)

    def _transfer_hook_is_custom(self, hook: str) -> bool:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and is_overridden(hook, datamodule, LightningDataModule):
            return True
        return is_overridden(hook, self.agent(self.agent_ids[0]), LightningModule)

    def _hook_owner(self, hook: str, agent_id: int) -> Any:
        """The datamodule if it overrides the batch-transfer ``hook`` (as in Lightning), else the agent."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and is_overridden(hook, datamodule, LightningDataModule):
            return datamodule
        return self.agent(agent_id)

    def transfer_agent_batch(self, hook: str, agent_id: int, batch: Any, *args: Any) -> Any:
        """Runs ``hook`` (a batch-transfer hook) on one of agent ``agent_id``'s batches, in its stream."""
        with self.streams.activate(agent_id):
            return getattr(self._hook_owner(hook, agent_id), hook)(batch, *args)

    def to_device(self, agent_id: int, batch: Any) -> Any:
        """One of agent ``agent_id``'s raw batches, through its three transfer hooks onto the device."""
        batch = self.transfer_agent_batch("on_before_batch_transfer", agent_id, batch, 0)
        batch = self.transfer_agent_batch("transfer_batch_to_device", agent_id, batch, self.device, 0)
        return self.transfer_agent_batch("on_after_batch_transfer", agent_id, batch, 0)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra: dict[int, dict[str, Any]] = {}
        for agent_id, agent in self.items():
            own: dict[str, Any] = {}
            if is_overridden("on_save_checkpoint", agent, LightningModule):
                agent.on_save_checkpoint(own)
            extra[agent_id] = own
        local = {"random_streams": self.streams.state_dict(), "agent_checkpoint_extras": extra}
        parts = self.trainer.strategy.all_gather_object(local)  # every process's agents, keyed by global id
        checkpoint["dimat"] = {
            "num_agents": self.num_agents,
            **{key: {g: value for part in parts for g, value in part[key].items()} for key in local},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("dimat")
        if saved is None:
            raise KeyError(
                "This checkpoint was not written by DIMATStrategy (it has no 'dimat' entry). To start agents "
                "from a plain checkpoint, load it into your module and pass that module to fit()."
            )
        if saved["num_agents"] != self.num_agents:
            raise ValueError(
                f"The checkpoint holds agents {list(range(saved['num_agents']))} but this run has "
                f"num_agents={self.num_agents}; resume with the same number of agents."
            )
        self.streams.load_state_dict(saved["random_streams"])
        for agent_id, agent in self.items():
            if is_overridden("on_load_checkpoint", agent, LightningModule):
                agent.on_load_checkpoint(saved["agent_checkpoint_extras"].get(agent_id, {}))


for _hook in _PLAIN_HOOKS:

    def _make(hook: str) -> Any:
        def fan_out(self: AgentSwarm, *args: Any, **kwargs: Any) -> None:
            self._fan_out(hook, *args, **kwargs)

        fan_out.__name__ = hook
        fan_out.__doc__ = f"Runs ``{hook}`` on every local agent."
        return fan_out

    setattr(AgentSwarm, _hook, _make(_hook))


def _call_weakly(target: weakref.ref, method: str, agent_id: int, *args: Any, **kwargs: Any) -> Any:
    owner = target()
    if owner is None:
        raise RuntimeError(
            f"Agent {agent_id}'s swarm no longer exists; log and optimizers() work only inside it."
        )
    return getattr(owner, method)(agent_id, *args, **kwargs)


def _agent_batch(batch: Any) -> AgentBatch:
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
    try:
        return extract_batch_size(batch)
    except (MisconfigurationException, RecursionError, TypeError):
        return None


_SWARM_CLASSES: dict[frozenset[str], type[AgentSwarm]] = {}


def swarm_class_for(template: LightningModule) -> type[AgentSwarm]:
    """The ``AgentSwarm`` subclass exposing ``validation_step``/``test_step`` iff ``template`` has them.

    Lightning decides whether to run a validation or test loop by checking whether these methods are
    overridden, so the swarm must mirror the user's module.
    """
    steps = frozenset(hook for hook in _EVALUATION_STEPS if is_overridden(hook, template, LightningModule))
    if steps not in _SWARM_CLASSES:
        namespace = {hook: getattr(AgentSwarm, f"_{hook}") for hook in steps}
        _SWARM_CLASSES[steps] = type("AgentSwarm", (AgentSwarm,), namespace)
    return _SWARM_CLASSES[steps]
