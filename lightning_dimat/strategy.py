"""``DIMATStrategy``: N agents, each a copy of the user's LightningModule, trained on their own shards."""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import inspect
import warnings
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector
from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerStatus
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from lightning_dimat.agent_data import AgentLoader, batches_per_epoch, clone_for_shard
from lightning_dimat.agent_rng import LIBRARIES, AgentRandomStreams, agent_seed, seeded
from lightning_dimat.exchange import ExchangeError, ExchangePlan, exchange_states, plan_exchange
from lightning_dimat.merge import MERGE_METHODS, load_state_in_place, recompute_batchnorm, weighted_state
from lightning_dimat.partition import PARTITIONS, dataset_labels, partition
from lightning_dimat.placement import agents_on_rank
from lightning_dimat.swarm import AgentSwarm, swarm_class_for
from lightning_dimat.topology import Topology, build_topology

Export = int | Literal["consensus", "none"]


class DIMATStrategy(DDPStrategy):
    """Trains ``num_agents`` copies of your LightningModule, each on its own shard of the training data.

    Lightning keeps handling devices, precision, logging and checkpoints; add a
    :class:`~lightning_dimat.callback.MergeCallback` to merge agents with their neighbours on ``topology``.
    Each agent's ``self.log(name, ...)`` is logged as ``agent_<g>/<name>`` and ``<name>`` is the mean over
    agents. Validation and test run every agent on the full evaluation set.

    Args:
        num_agents: number of agents N (the paper's default setting is 5).
        topology: a name from :data:`~lightning_dimat.topology.GRAPHS` (``ring``, ``fully_connected``,
            ``star``, ``torus``, ``exponential``, ``erdos_renyi``), a
            :class:`~lightning_dimat.topology.Topology`,
            a networkx graph, or an adjacency/mixing matrix.
        mixing_rule: how edge weights are chosen: ``metropolis_hastings``, ``uniform`` or ``max_degree``.
        topology_options: options of a named topology, e.g. ``{"p": 0.3, "seed": 1}`` for ``erdos_renyi``.
        partition: how the training set is split: ``iid``, ``by_class`` (the paper's non-IID), ``dirichlet``
            or ``shards`` (see :data:`~lightning_dimat.partition.PARTITIONS`).
        partition_options: options of the scheme, e.g. ``{"alpha": 0.5}`` for ``dirichlet``.
        agent_init: ``"reinit"`` gives agent g fresh parameters from seed ``(seed, g)`` (each submodule's
            ``reset_parameters``); ``"copy"`` starts every agent from your module's weights.
        seed: seeds agent initialisation, the partition, shuffling and every agent's random stream.
        export: after ``fit``, what is loaded into your module: an agent id, ``"consensus"`` (all agents
            merged into agent 0's basis with equal weights by the merge callback's method, BatchNorm
            re-estimated on every agent's data) or ``"none"``.
        init_from: a checkpoint written by a DIMAT run with the same ``num_agents``: when fitting, agent g
            starts from that run's agent g weights (after ``agent_init``), while optimizers, epochs and random
            streams start fresh — how several methods start from the same pre-trained agents. (To *resume*
            a run, pass ``ckpt_path`` to ``fit`` instead.)
        random_streams: global generators each agent gets its own stream of, so its randomness does not
            depend on the other agents: ``"torch"`` (dropout, torchvision transforms; always), plus
            ``"numpy"`` and/or ``"python"`` if your module or main-process data pipeline draws from
            ``np.random``/``random`` (a warning says so when they are used untracked). Workers of a
            ``DataLoader`` are seeded per agent either way.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(strategy=DIMATStrategy(topology="ring"), max_epochs=1)  # doctest: +SKIP
    """

    strategy_name = "dimat"

    def __init__(
        self,
        num_agents: int = 5,
        topology: str | Topology | Sequence[Sequence[float]] | Any = "ring",
        mixing_rule: str = "metropolis_hastings",
        topology_options: dict[str, Any] | None = None,
        partition: str = "iid",
        partition_options: dict[str, Any] | None = None,
        agent_init: Literal["reinit", "copy"] = "reinit",
        seed: int = 0,
        export: Export = "consensus",
        random_streams: Sequence[str] = ("torch",),
        init_from: str | None = None,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 2:
            raise ValueError(f"num_agents must be an integer >= 2 (DIMAT merges agents), got {num_agents!r}.")
        self.num_agents = num_agents
        self.topology = build_topology(topology, num_agents, rule=mixing_rule, **(topology_options or {}))
        _check_options("partition", partition, PARTITIONS.get(partition), partition_options or {}, skip=3)
        self.partition = partition
        self.partition_options = dict(partition_options or {})
        if agent_init not in ("reinit", "copy"):
            raise ValueError(f"agent_init must be 'reinit' or 'copy', got {agent_init!r}.")
        self.agent_init = agent_init
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        self.seed = seed
        _check_export(export, num_agents)
        self.export = export
        self.random_streams = tuple(random_streams)
        unknown = sorted(set(self.random_streams) - set(LIBRARIES))
        if unknown or "torch" not in self.random_streams:
            raise ValueError(
                "random_streams must include 'torch' and may add 'numpy' and 'python', "
                f"got {random_streams!r}."
            )
        if init_from is not None and not Path(init_from).is_file():
            raise FileNotFoundError(
                f"init_from={init_from!r} is not a file; give the path of a checkpoint written by a DIMAT "
                "run (e.g. trainer.save_checkpoint(path) after pre-training)."
            )
        self.init_from = init_from
        self.swarm: AgentSwarm | None = None
        self._user_module: LightningModule | None = None
        self._clip_val: float | None = None
        self._clip_algorithm: str | None = None
        self._accumulate = 1
        self.shards: list[np.ndarray] | None = None
        self._exchange_plan: ExchangePlan | None = None
        self.last_exchange_bytes = 0
        self.agent_loaders: dict[int, DataLoader] = {}

    # --------------------------------------------------------------- placement
    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_processes if self.parallel_devices else 1

    @property
    def local_agent_ids(self) -> list[int]:
        """Global ids of the agents that live in this process."""
        return agents_on_rank(
            self.num_agents, self.world_size, self.global_rank if self.world_size > 1 else 0
        )

    # -------------------------------------------------------- DDP switched off
    @property
    def _layer_sync(self) -> Any:
        return None

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: Any) -> None:
        if layer_sync is not None:
            raise ValueError(
                "Trainer(sync_batchnorm=True) would average BatchNorm statistics across agents, which DIMAT "
                "keeps separate; remove sync_batchnorm (merges re-estimate BatchNorm statistics instead)."
            )

    def _configure_launcher(self) -> None:
        agents_on_rank(self.num_agents, self.world_size, 0)  # more processes than agents: refused now
        if self.world_size == 1:
            self._launcher = None  # one process: nothing to launch (and notebooks work)
        elif self._start_method == "popen":
            super()._configure_launcher()
        else:
            self._launcher = _ExportingMultiProcessingLauncher(self, start_method=self._start_method)

    def setup_environment(self) -> None:
        if self.world_size > 1:
            # Agent metrics are per process by design (each process holds other agents); epoch means over
            # all agents are gathered by the swarm, so Lightning's advice to sync_dist does not apply.
            warnings.filterwarnings("ignore", message=r".*sync_dist=True.*distributed setting.*")
            super().setup_environment()  # the device, then the process group (gloo on CPU, nccl on GPU)
            return
        assert self.accelerator is not None
        self.accelerator.setup_device(self.root_device)

    def setup_distributed(self) -> None:
        if self.world_size > 1:
            super().setup_distributed()
            # Lightning leaves the process group to the interpreter's exit, where gloo's threads can be torn
            # down mid-flight (std::terminate, "terminate called without an active exception") after many
            # point-to-point exchanges; closing it first makes the exit clean.
            atexit.register(_close_process_group)
        else:  # no process group for a single process
            self.set_world_ranks()

    # ------------------------------------------------------------ collectives
    @property
    def rank(self) -> int:
        return self.global_rank if self.world_size > 1 else 0

    @contextlib.contextmanager
    def peers(self, what: str) -> Iterator[None]:
        """Turns a failed collective (a process died, or hung past ``timeout``) into a clear error."""
        try:
            yield
        except ExchangeError:
            raise
        except RuntimeError as error:  # gloo/nccl errors, including DistBackendError and timeouts
            raise ExchangeError(
                f"Rank {self.rank}: {what} failed: another process died or did not answer within "
                f"{self._timeout}. Nothing since the last checkpoint is saved; resume from it with "
                f"ckpt_path=... ({type(error).__name__}: {error})"
            ) from error

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order (``[obj]`` in one process)."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        with self.peers("gathering agent data"):
            torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        with self.peers("a reduction across processes"):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)

    def exchange(
        self, states: dict[int, dict[str, torch.Tensor]]
    ) -> tuple[dict[int, dict[str, torch.Tensor]], int]:
        """The neighbour states the local agents need from other processes, and the bytes sent."""
        if self.world_size == 1:
            return {}, 0
        if self._exchange_plan is None:
            self._exchange_plan = plan_exchange(self.topology, self.world_size, self.rank)
        device = self.root_device if self.root_device.type == "cuda" else torch.device("cpu")
        return exchange_states(states, self._exchange_plan, device, self._timeout)

    def agent_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every agent's ``state_dict`` (on the CPU), gathered from all processes, keyed by global id."""
        assert self.swarm is not None
        local = {
            agent_id: {key: value.detach().cpu() for key, value in agent.state_dict().items()}
            for agent_id, agent in self.swarm.items()
        }
        return {agent_id: state for part in self.all_gather_object(local) for agent_id, state in part.items()}

    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            # Lightning's manual-optimization check has passed: give the flag back, so that
            # `estimated_stepping_batches` and the loggers' step count see the accumulation.
            trainer.accumulate_grad_batches = self._accumulate
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}

    # ------------------------------------------------------------------ swarm
    def connect(self, model: LightningModule) -> None:
        """Swaps the user's module for the swarm, before Lightning runs its checks and hooks."""
        trainer = model.trainer
        if self.world_size > 1:
            self.set_world_ranks()  # spawn/fork workers learn their rank only now (LOCAL_RANK)
        if isinstance(model, AgentSwarm):
            swarm = model
        elif self.swarm is not None and model is self._user_module:
            swarm = self.swarm
        else:
            swarm = self._build_swarm(model, trainer)
        self.swarm = swarm
        swarm.trainer = trainer
        for _, agent in swarm.items():
            agent.trainer = trainer
        self._take_over_trainer_flags(trainer, swarm)
        # Batch-transfer hooks go through the swarm, which applies the datamodule's or the agent's hook to
        # each agent's batch (Lightning would otherwise hand the datamodule the whole {agent: batch} dict).
        trainer._data_connector._datahook_selector = _DataHookSelector(swarm, None)
        super().connect(swarm)

    def _build_swarm(self, model: LightningModule, trainer: Trainer) -> AgentSwarm:
        if not model.automatic_optimization:
            raise MisconfigurationException(
                f"{type(model).__name__} uses manual optimization; DIMATStrategy steps each agent's "
                "optimizer itself and needs automatic optimization (return the loss from training_step)."
            )
        if trainer.state.fn == TrainerFn.FITTING and not is_overridden(
            "training_step", model, LightningModule
        ):
            raise MisconfigurationException(f"{type(model).__name__} does not define training_step.")
        agent_ids = self.local_agent_ids
        trainer_ref, model.trainer = model._trainer, None
        try:
            agents = {agent_id: copy.deepcopy(model) for agent_id in agent_ids}
        finally:
            model.trainer = trainer_ref
        streams = AgentRandomStreams(self.seed, agent_ids, self.root_device, self.random_streams)
        self._user_module = model
        swarm = swarm_class_for(model)(agents, streams, self.num_agents, self.world_size)
        if trainer.state.fn == TrainerFn.FITTING and (self.agent_init == "reinit" or self.init_from):
            # Runs after the agents' setup/configure_model hooks and before a checkpoint is restored.
            swarm.pending_initialisation = functools.partial(self._initialise_agents, swarm)
        return swarm

    def _take_over_trainer_flags(self, trainer: Trainer, swarm: AgentSwarm) -> None:
        """Lightning refuses these flags under manual optimization: apply them per agent instead."""
        if trainer.gradient_clip_val:
            self._clip_val, trainer.gradient_clip_val = float(trainer.gradient_clip_val), None
        algorithm = trainer.gradient_clip_algorithm
        self._clip_algorithm = str(getattr(algorithm, "value", algorithm) or "norm")
        if trainer.accumulate_grad_batches != 1:
            self._accumulate, trainer.accumulate_grad_batches = int(trainer.accumulate_grad_batches), 1
        swarm.gradient_clip_val = self._clip_val
        swarm.gradient_clip_algorithm = self._clip_algorithm
        swarm.accumulate_grad_batches = self._accumulate
        # Each agent draws its own shard; evaluation runs on the full sets. No DistributedSampler anywhere.
        trainer._accelerator_connector.use_distributed_sampler = False

    def _initialise_agents(self, swarm: AgentSwarm) -> None:
        """Fresh parameters from seed (seed, g) (``agent_init="reinit"``), then the ``init_from`` weights."""
        if self.agent_init == "reinit":
            self._reinitialise_agents(swarm)
        if self.init_from is None:
            return
        checkpoint = torch.load(self.init_from, map_location="cpu", weights_only=False)
        saved = checkpoint.get("dimat", {}).get("num_agents")
        if saved != self.num_agents:
            raise ValueError(
                f"init_from={self.init_from!r} holds {saved} DIMAT agents but this run has "
                f"num_agents={self.num_agents}; pre-train with the same number of agents."
            )
        prefixes = tuple(f"agents.{agent_id}." for agent_id in swarm.agent_ids)
        state = {key: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefixes)}
        swarm.load_state_dict(state, strict=True)

    def _reinitialise_agents(self, swarm: AgentSwarm) -> None:
        for agent_id, agent in swarm.items():
            with seeded(agent_seed(self.seed, agent_id, 0), self.root_device), torch.no_grad():
                for module in agent.modules():
                    reset = getattr(module, "reset_parameters", None)
                    if module is not agent and callable(reset):
                        reset()

    # ------------------------------------------------------------------- data
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise ValueError(
                f"DIMATStrategy shards a torch DataLoader across agents, got {type(dataloader).__name__}; "
                "return a single torch.utils.data.DataLoader from train_dataloader()."
            )
        labels = dataset_labels(dataloader.dataset)
        self.shards = partition(labels, self.num_agents, self.partition, self.seed, **self.partition_options)
        assert self.swarm is not None
        self.agent_loaders = {
            agent_id: clone_for_shard(dataloader, self.shards[agent_id], self.seed, agent_id)
            for agent_id in self.swarm.agent_ids
        }
        assert dataloader.batch_size is not None
        num_batches = max(
            batches_per_epoch(len(shard), dataloader.batch_size, dataloader.drop_last)
            for shard in self.shards
        )
        if num_batches == 0:
            raise ValueError(
                f"With batch_size={dataloader.batch_size} and drop_last=True no agent gets a full batch "
                f"(largest shard: {max(map(len, self.shards))} samples); lower the batch size."
            )
        return AgentLoader(self.agent_loaders, num_batches, self.swarm.streams)

    def example_batch(self, agent_id: int) -> Any:
        """One batch of agent ``agent_id``'s shard on the device, drawn without touching any random stream."""
        if agent_id not in self.agent_loaders:
            raise RuntimeError(
                f"Agent {agent_id} has no training data yet: local data exists only while fitting."
            )
        assert self.swarm is not None
        with seeded(0, self.root_device):
            batch = next(iter(self.agent_loaders[agent_id]))
        return self.precision_plugin.convert_input(self.swarm.to_device(agent_id, batch))

    def local_batches(self, agent_id: int, num_batches: int | None) -> Iterator[Any]:
        """Up to ``num_batches`` of agent ``agent_id``'s own batches, on the device, drawn in its stream."""
        if agent_id not in self.agent_loaders:
            raise RuntimeError(
                f"Agent {agent_id} has no training data yet: local data exists only while fitting."
            )
        assert self.swarm is not None
        streams = self.swarm.streams
        with streams.activate(agent_id):
            iterator = iter(self.agent_loaders[agent_id])
        count = 0
        while num_batches is None or count < num_batches:
            with streams.activate(agent_id):
                batch = next(iterator, None)
            if batch is None:
                return
            # (as Lightning's loops do: e.g. bf16-true models need bf16 inputs)
            yield self.precision_plugin.convert_input(self.swarm.to_device(agent_id, batch))
            count += 1

    # ------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Every agent's weights (gathered from all processes), keyed ``agents.<global id>.*``."""
        assert self.swarm is not None
        local = self.swarm.state_dict()
        if self.world_size == 1:
            return local
        local = {key: value.detach().cpu() for key, value in local.items()}
        return {key: value for part in self.all_gather_object(local) for key, value in part.items()}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Every agent's optimizer and schedulers (gathered from all processes), keyed by global id."""
        state = super().optimizer_state(optimizer)
        if self.world_size == 1 or "agents" not in state:
            return state
        local = _to_cpu(state)
        return {
            "agents": {
                agent_id: entry
                for part in self.all_gather_object(local)
                for agent_id, entry in part["agents"].items()
            }
        }

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Loads the local agents' weights from a checkpoint written with any number of processes."""
        assert self.swarm is not None
        prefixes = tuple(f"agents.{agent_id}." for agent_id in self.swarm.agent_ids)
        state = {key: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefixes)}
        self.swarm.load_state_dict(state, strict=strict)

    # ----------------------------------------------------------------- export
    def teardown(self) -> None:
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        if (
            trainer is not None
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.state.status == TrainerStatus.RUNNING
        ):
            self.export_to(self._user_module)
        super().teardown()

    def export_to(self, module: LightningModule | None) -> None:
        """Loads the agent chosen by ``export`` (or the consensus) into ``module``."""
        if module is None or self.export == "none" or self.swarm is None:
            return
        if is_overridden("configure_model", module, LightningModule):
            module.configure_model()  # layers built there exist in the agents, so they must here too
        if self.world_size > 1:
            states = self.agent_states()  # (collectives: every process takes part)
            if isinstance(self.export, int):
                state = states[self.export]
            else:
                # BatchNorm of the consensus is re-estimated on every agent's batches, as in one process.
                local = [
                    _to_cpu(batch)
                    for agent_id in self.swarm.agent_ids
                    for batch in self.local_batches(agent_id, 10)
                ]
                batches = [batch for part in self.all_gather_object(local) for batch in part]
                consensus = self.consensus_state(states=states, batches=batches) if self.rank == 0 else None
                state = self.all_gather_object(consensus)[0]
        elif isinstance(self.export, int):
            state = self.swarm.agent(self.export).state_dict()
        else:
            state = self.consensus_state()
        module.load_state_dict({key: value.to(module.device) for key, value in state.items()})

    def consensus_state(
        self,
        num_batches: int | None = 10,
        states: dict[int, dict[str, torch.Tensor]] | None = None,
        batches: list[Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """All agents merged with equal weights in the first local agent's basis, BatchNorm re-estimated on
        ``num_batches`` of every agent's own batches. ``states``/``batches`` supply agents held elsewhere."""
        assert self.swarm is not None
        callback = self._merge_callback()
        method = MERGE_METHODS.get(callback.method if callback is not None else "average")
        reference_id = self.swarm.agent_ids[0]
        reference = self.swarm.agent(reference_id)
        if states is None:
            states = {agent_id: agent.state_dict() for agent_id, agent in self.swarm.items()}
        others = [agent_id for agent_id in sorted(states) if agent_id != reference_id]
        data = list(self.local_batches(reference_id, num_batches)) if method.requires_data else None
        aligned = method(
            reference,
            [
                {key: value.to(self.root_device) for key, value in states[agent_id].items()}
                for agent_id in others
            ],
            data,
            spec=callback.spec if callback is not None else None,
            forward_context=self.precision_plugin.forward_context,
        )
        states = [reference.state_dict(), *aligned]
        consensus = copy.deepcopy(reference)
        load_state_in_place(consensus, weighted_state(states, [1.0 / len(states)] * len(states)))
        if batches is None and self.agent_loaders:
            batches = [
                batch
                for agent_id in self.swarm.agent_ids
                for batch in self.local_batches(agent_id, num_batches)
            ]
        if batches:
            recompute_batchnorm(consensus, batches, forward_context=self.precision_plugin.forward_context)
        return consensus.state_dict()

    def _merge_callback(self) -> Any:
        from lightning_dimat.callback import MergeCallback

        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        callbacks = trainer.callbacks if trainer is not None else []
        return next((callback for callback in callbacks if isinstance(callback, MergeCallback)), None)


def _close_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class _ExportingMultiProcessingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher, handing the *exported* module (not rank 0's agents) back to the main
    process, where your module object is."""

    def _collect_rank_zero_results(self, trainer: Trainer, results: Any) -> _WorkerOutput | None:
        strategy = trainer.strategy
        assert isinstance(strategy, DIMATStrategy)
        swarm, user_module = strategy._lightning_module, strategy._user_module
        if user_module is not None:
            strategy._lightning_module = user_module
        try:
            return super()._collect_rank_zero_results(trainer, results)
        finally:
            strategy._lightning_module = swarm


def _check_options(kind: str, name: str, function: Any, options: dict[str, Any], skip: int) -> None:
    """Refuses, before any work, options that the chosen ``function`` does not take."""
    parameters = list(inspect.signature(function).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    known = {p.name for p in parameters}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"{kind} {name!r} takes no option(s) {unknown}; its options are {sorted(known) or 'none'}."
        )


def _check_export(export: Any, num_agents: int) -> None:
    if export in ("consensus", "none"):
        return
    if isinstance(export, int) and not isinstance(export, bool) and 0 <= export < num_agents:
        return
    raise ValueError(
        f"export must be 'consensus', 'none' or an agent id in 0..{num_agents - 1}, got {export!r}."
    )


if "dimat" not in StrategyRegistry:
    StrategyRegistry.register(
        "dimat", DIMATStrategy, description="DIMAT: N agents on a graph, merged by MergeCallback"
    )
