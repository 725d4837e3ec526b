"""``DIMATStrategy``: N agents, each a copy of the user's LightningModule, trained on their own shards."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector
from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_dimat.comm.deadline import Deadline, default_store, exchange_with_deadline
from lightning_dimat.comm.gather import gather_by_agent
from lightning_dimat.comm.ledger import CommunicationLedger
from lightning_dimat.comm.placement import agents_on_rank
from lightning_dimat.comm.transport import ExchangePlan, exchange_states, plan_exchange
from lightning_dimat.merge.matchers import AverageMatcher, Matcher
from lightning_dimat.merge.state import StateDict, detached_state
from lightning_dimat.partition import PARTITIONS
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.strategy.agents import (
    TrainerFlags,
    build_swarm,
    load_initial_weights,
    local_agent_entries,
    reinitialise_agents,
)
from lightning_dimat.strategy.export import export_to
from lightning_dimat.strategy.launcher import ExportingMultiProcessingLauncher
from lightning_dimat.strategy.local_data import AgentData
from lightning_dimat.strategy.processes import (
    all_gather_object,
    close_process_group_at_exit,
    failing_clearly,
    to_cpu,
)
from lightning_dimat.strategy.rounds import AgentHandle, MergeRound
from lightning_dimat.strategy.run_identity import (
    RESUME_CHANGES,
    differences,
    refuse_differences,
    run_identity,
)
from lightning_dimat.swarm import AgentSwarm
from lightning_dimat.swarm.heap import ReleaseMemory, check_release_memory, heap_release_mode
from lightning_dimat.swarm.random_streams import LIBRARIES, AgentRandomStreams
from lightning_dimat.topology import Topology, TopologySchedule, build_schedule, build_topology
from lightning_dimat.validation import check_choice, check_int, check_options

Export = int | Literal["consensus", "none"]


class DIMATStrategy(DDPStrategy):
    """Trains ``num_agents`` copies of your LightningModule, each on its own shard of the training data.

    Lightning keeps handling devices, precision, logging and checkpoints; add a
    :class:`~lightning_dimat.callbacks.MergeCallback` to merge agents with their neighbours on ``topology``.
    Each agent's ``self.log(name, ...)`` is logged as ``agent_<g>/<name>`` and ``<name>`` is the mean over
    agents. Validation and test run every agent on the full evaluation set. Merges and gossip exchanges run
    as rounds (:meth:`begin_round`).

    Args:
        num_agents: number of agents N (the paper's default setting is 5).
        topology: a name from :data:`~lightning_dimat.topology.GRAPHS` (``ring``, ``fully_connected``,
            ``star``, ``torus``, ``exponential``, ``erdos_renyi``), a
            :class:`~lightning_dimat.topology.Topology`,
            a networkx graph, or an adjacency/mixing matrix; or a time-varying schedule: a name from
            :data:`~lightning_dimat.topology.SCHEDULES` (``one_peer_exponential``, ``random_matching``), a
            list of topologies used in turn, a callable ``round -> Topology`` (with
            ``topology_options={"period": k}``) or a :class:`~lightning_dimat.topology.TopologySchedule`.
            With a schedule, :attr:`topology` is the union of one period's graphs (the shared basis's
            spanning tree is built on it) and round r merges on :meth:`topology_for_round`.
        mixing_rule: how edge weights are chosen: ``metropolis_hastings``, ``uniform`` or ``max_degree``.
        topology_options: options of a named topology, e.g. ``{"p": 0.3, "seed": 1}`` for ``erdos_renyi``.
        partition: how the training set is split: ``iid``, ``by_class`` (the paper's non-IID), ``dirichlet``
            or ``shards`` (see :data:`~lightning_dimat.partition.PARTITIONS`).
        partition_options: options of the scheme, e.g. ``{"alpha": 0.5}`` for ``dirichlet``.
        agent_init: ``"reinit"`` gives agent g fresh parameters from seed ``(seed, g)`` (each submodule's
            ``reset_parameters``) — frozen parameters (``requires_grad=False``, e.g. a pre-trained
            backbone) and the buffers of fully frozen submodules stay as you gave them; ``"copy"`` starts
            every agent from your module's weights.
        seed: seeds agent initialisation, the partition, shuffling and every agent's random stream.
        export: after ``fit``, what is loaded into your module: an agent id, ``"consensus"`` (all agents
            merged into agent 0's basis with equal weights by the merge callback's method, BatchNorm
            re-estimated on every agent's data) or ``"none"``.
        init_from: a checkpoint written by a DIMAT run with the same ``num_agents``: when fitting, agent g
            starts from that run's agent g weights (after ``agent_init``), while optimizers, epochs and random
            streams start fresh — how several methods start from the same pre-trained agents. (To *resume*
            a run, pass ``ckpt_path`` to ``fit`` instead.)
        resume_changes: what a run resumed from a checkpoint may change: ``"topology"``, ``"partition"``,
            ``"seed"`` (checked by the strategy), ``"method"``, ``"basis"`` (checked by ``MergeCallback``).
            Any other difference from the run that wrote the checkpoint is refused with a clear error.
        random_streams: global generators each agent gets its own stream of, so its randomness does not
            depend on the other agents: ``"torch"`` (dropout, torchvision transforms; always), plus
            ``"numpy"`` and/or ``"python"`` if your module or main-process data pipeline draws from
            ``np.random``/``random`` (a warning says so when they are used untracked). Workers of a
            ``DataLoader`` are seeded per agent either way.
        release_memory: hand the heap memory freed by each agent's backward back to the operating system
            before the next agent's forward (glibc's ``malloc_trim``), so that resident memory grows by about
            an agent's live tensors per agent, not by the allocator's leftovers (docs/scale.md: 8.4 instead of
            13.5 MiB per ResNet-20 ×1 agent), at 11–14 % of training time. ``"auto"``: when 32 or more agents
            train on CPU in this process under glibc (Linux); ``True`` refuses a platform without it.
            Training is unchanged bit for bit.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(strategy=DIMATStrategy(num_agents=4, topology="ring"), logger=False)
        >>> trainer.strategy.topology.neighbors(0)
        [1, 3]
    """

    strategy_name = "dimat"

    def __init__(
        self,
        num_agents: int = 5,
        topology: str | Topology | TopologySchedule | Sequence[Any] | Any = "ring",
        mixing_rule: str = "metropolis_hastings",
        topology_options: dict[str, Any] | None = None,
        partition: str = "iid",
        partition_options: dict[str, Any] | None = None,
        agent_init: Literal["reinit", "copy"] = "reinit",
        seed: int = 0,
        export: Export = "consensus",
        random_streams: Sequence[str] = ("torch",),
        release_memory: ReleaseMemory = "auto",
        init_from: str | None = None,
        resume_changes: Sequence[str] = (),
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
        self.num_agents = check_int("num_agents", num_agents, minimum=2, hint="DIMAT merges agents")
        self.schedule = build_schedule(topology, num_agents, rule=mixing_rule, **(topology_options or {}))
        self.topology = (
            self.schedule.union
            if self.schedule is not None
            else build_topology(topology, num_agents, rule=mixing_rule, **(topology_options or {}))
        )
        check_options("partition", partition, PARTITIONS.get(partition), partition_options or {}, skip=3)
        self.partition = partition
        self.partition_options = dict(partition_options or {})
        self.agent_init = check_choice("agent_init", agent_init, ("reinit", "copy"))
        self.seed = check_int("seed", seed, minimum=0)
        self.export = _checked_export(export, num_agents)
        self.random_streams = tuple(random_streams)
        unknown = sorted(set(self.random_streams) - set(LIBRARIES))
        if unknown or "torch" not in self.random_streams:
            raise ValueError(
                "random_streams must include 'torch' and may add 'numpy' and 'python', "
                f"got {random_streams!r}."
            )
        self.release_memory = check_release_memory(release_memory)
        if init_from is not None and not Path(init_from).is_file():
            raise FileNotFoundError(
                f"init_from={init_from!r} is not a file; give the path of a checkpoint written by a DIMAT "
                "run (e.g. trainer.save_checkpoint(path) after pre-training)."
            )
        self.init_from = init_from
        self.resume_changes = tuple(
            check_choice("resume_changes", name, RESUME_CHANGES) for name in resume_changes
        )
        self.swarm: AgentSwarm | None = None
        self._resume_batches = 0
        self.user_module: LightningModule | None = None
        self.consensus_matcher: Matcher = AverageMatcher()
        """How :attr:`export` ``="consensus"`` aligns agents (the merge callback sets its own matcher)."""
        self.consensus_spec: PermutationSpec | None = None
        self.data = AgentData(num_agents, partition, self.partition_options, seed)
        self._flags = TrainerFlags()
        self._exchange_plans: dict[bytes, ExchangePlan] = {}

    # --------------------------------------------------------------- placement
    @property
    @override
    def world_size(self) -> int:
        """Processes the agents are spread over (1 without a process group)."""
        return self.num_nodes * self.num_processes if self.parallel_devices else 1

    @property
    def rank(self) -> int:
        """This process's rank (0 in one process)."""
        return self.global_rank if self.world_size > 1 else 0

    @property
    def local_agent_ids(self) -> list[int]:
        """Global ids of the agents that live in this process."""
        return agents_on_rank(self.num_agents, self.world_size, self.rank)

    @property
    def shards(self) -> list[np.ndarray] | None:
        """Every agent's training-set indices (``None`` before ``fit`` reads the training data)."""
        return self.data.shards

    # -------------------------------------------------------- DDP switched off
    @property
    @override
    def _layer_sync(self) -> Any:
        """No SyncBatchNorm: agents keep their own BatchNorm statistics."""
        return None

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: Any) -> None:
        if layer_sync is not None:
            raise ValueError(
                "Trainer(sync_batchnorm=True) would average BatchNorm statistics across agents, which DIMAT "
                "keeps separate; remove sync_batchnorm (merges re-estimate BatchNorm statistics instead)."
            )

    @override
    def _configure_launcher(self) -> None:
        """No launcher in one process; Lightning's, or one that hands back the exported module."""
        agents_on_rank(self.num_agents, self.world_size, 0)  # more processes than agents: refused now
        if self.world_size == 1:
            self._launcher = None  # one process: nothing to launch (and notebooks work)
        elif self._start_method == "popen":
            super()._configure_launcher()
        else:
            self._launcher = ExportingMultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        """The device, and with several processes the process group (gloo on CPU, nccl on GPU)."""
        if self.world_size > 1:
            # Agent metrics are per process by design (each process holds other agents); epoch means over
            # all agents are gathered by the swarm, so Lightning's advice to sync_dist does not apply.
            warnings.filterwarnings("ignore", message=r".*sync_dist=True.*distributed setting.*")
            super().setup_environment()
            return
        assert self.accelerator is not None
        self.accelerator.setup_device(self.root_device)

    @override
    def setup_distributed(self) -> None:
        """A process group only for several processes, closed before the interpreter exits."""
        if self.world_size > 1:
            super().setup_distributed()
            close_process_group_at_exit()
        else:
            self.set_world_ranks()

    @override
    def setup(self, trainer: Trainer) -> None:
        """Device, precision and optimizers for the swarm, without DDP's wrapper."""
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            # Lightning's manual-optimization check has passed: give the flag back, so that
            # `estimated_stepping_batches` and the loggers' step count see the accumulation.
            trainer.accumulate_grad_batches = self._flags.accumulate
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
            assert self.swarm is not None
            self.swarm.release_heap_after_backward = heap_release_mode(
                self.release_memory, self.root_device, len(self.swarm.agent_ids)
            )

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """No DistributedSampler: every process evaluates its agents on the full sets."""
        return {"num_replicas": 1, "rank": 0}

    # ------------------------------------------------------------ collectives
    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order (``[obj]`` in one process)."""
        return all_gather_object(obj, self.world_size, self.rank, self._timeout)

    def nonfinite_everywhere(self, found: list[int]) -> list[int]:
        """The union of every process's ``found`` agent ids, sorted (a collective with several processes).

        Examples:
            >>> DIMATStrategy(num_agents=2).nonfinite_everywhere([1])
            [1]
        """
        if self.world_size <= 1:
            return sorted(found)
        return sorted({agent_id for part in self.all_gather_object(list(found)) for agent_id in part})

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """Lightning's reduction, failing with a clear error when a process is gone."""
        with failing_clearly(self.rank, "a reduction across processes", self._timeout):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)

    def agent_states(self) -> dict[int, StateDict]:
        """Every agent's ``state_dict`` (on the CPU), gathered from all processes, keyed by global id."""
        assert self.swarm is not None
        local = {agent_id: to_cpu(agent.state_dict()) for agent_id, agent in self.swarm.items()}
        return gather_by_agent(self.all_gather_object, local)

    # ------------------------------------------------------------------ rounds
    def topology_for_round(self, index: int) -> Topology:
        """The graph of round ``index``: the schedule's, or the one fixed topology."""
        return self.topology if self.schedule is None else self.schedule(index)

    def begin_round(
        self,
        num_batches: int | None = None,
        index: int = 0,
        ledger: CommunicationLedger | None = None,
        snapshot: bool = True,
        topology: Topology | None = None,
    ) -> MergeRound:
        """Starts a round: snapshots the local agents and draws ``num_batches`` of each one's own data.

        Args:
            num_batches: batches of each agent's shard to draw (in its random stream) for matching and
                BatchNorm re-estimation; ``None`` draws none.
            index: the round's number, for per-round topologies.
            ledger: where the round counts bytes and forward passes.
            snapshot: keep a copy of every local agent's state (what :meth:`MergeRound.gather` sends by
                default); rounds that send something else (push-sum) skip it.
            topology: the graph of this round instead of :meth:`topology_for_round` (e.g. a spanning tree).
        """
        assert self.swarm is not None
        swarm = self.swarm
        topology = self.topology_for_round(index) if topology is None else topology
        optimizers = self._agent_optimizers()
        handles = {
            agent_id: AgentHandle(
                agent_id=agent_id,
                module=agent,
                optimizer=optimizers.get(agent_id),
                batches=[] if num_batches is None else list(self.local_batches(agent_id, num_batches)),
                weights=topology.weights(agent_id),
                activate=functools.partial(swarm.streams.activate, agent_id),
            )
            for agent_id, agent in swarm.items()
        }
        return MergeRound(
            index=index,
            topology=topology,
            handles=handles,
            snapshot={g: detached_state(agent.state_dict()) for g, agent in swarm.items()}
            if snapshot
            else {},
            forward_context=self.precision_plugin.forward_context,
            transport=self._transport,
            ledger=ledger,
        )

    def _agent_optimizers(self) -> dict[int, Any]:
        optimizers = self.optimizers
        return dict(getattr(optimizers[0], "optimizers", {})) if optimizers else {}

    def _transport(
        self,
        states: Mapping[int, Mapping[str, Tensor]],
        topology: Topology,
        round_index: int = 0,
        deadline: Deadline | None = None,
    ) -> tuple[dict[int, StateDict], int]:
        """The neighbour states the local agents need from other processes (those that came before the
        ``deadline``, when one is given), and the bytes sent."""
        if self.world_size == 1:
            return {}, 0
        key = topology.mixing.tobytes()
        if key not in self._exchange_plans:
            self._exchange_plans[key] = plan_exchange(topology, self.world_size, self.rank)
        plan = self._exchange_plans[key]
        if deadline is not None:
            remote, sent = exchange_with_deadline(
                states, plan, default_store(), deadline.namespace, round_index, deadline.seconds
            )
        else:
            device = self.root_device if self.root_device.type == "cuda" else torch.device("cpu")
            remote, sent = exchange_states(states, plan, device, self._timeout)
        return {j: {k: v.to(self.root_device) for k, v in state.items()} for j, state in remote.items()}, sent

    # ------------------------------------------------------------------ swarm
    @override
    def connect(self, model: LightningModule) -> None:
        """Swaps the user's module for the swarm, before Lightning runs its checks and hooks."""
        trainer = model.trainer
        if self.world_size > 1:
            self.set_world_ranks()  # spawn/fork workers learn their rank only now (LOCAL_RANK)
        if isinstance(model, AgentSwarm):
            swarm = model
        elif self.swarm is not None and model is self.user_module:
            swarm = self.swarm
        else:
            swarm = self._build_swarm(model, trainer)
        self.swarm = swarm
        swarm.trainer = trainer
        for _, agent in swarm.items():
            agent.trainer = trainer
        self._flags.take_over(trainer, swarm)
        # Batch-transfer hooks go through the swarm, which applies the datamodule's or the agent's hook to
        # each agent's batch (Lightning would otherwise hand the datamodule the whole {agent: batch} dict).
        trainer._data_connector._datahook_selector = _DataHookSelector(swarm, None)
        super().connect(swarm)

    def _build_swarm(self, model: LightningModule, trainer: Trainer) -> AgentSwarm:
        agent_ids = self.local_agent_ids
        streams = AgentRandomStreams(self.seed, agent_ids, self.root_device, self.random_streams)
        swarm = build_swarm(model, trainer, agent_ids, self.num_agents, self.world_size, streams)
        self.user_module = model
        if trainer.state.fn == TrainerFn.FITTING and (self.agent_init == "reinit" or self.init_from):
            # Runs after the agents' setup/configure_model hooks and before a checkpoint is restored.
            swarm.pending_initialisation = functools.partial(self._initialise_agents, swarm)
        return swarm

    def _initialise_agents(self, swarm: AgentSwarm) -> None:
        """Fresh parameters from seed (seed, g) (``agent_init="reinit"``), then the ``init_from`` weights."""
        if self.agent_init == "reinit":
            reinitialise_agents(swarm, self.seed, self.root_device)
        if self.init_from is not None:
            load_initial_weights(swarm, self.init_from, self.num_agents)

    # ------------------------------------------------------------------- data
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """The training loader becomes one loader per local agent, each on its own shard."""
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise ValueError(
                f"DIMATStrategy shards a torch DataLoader across agents, got {type(dataloader).__name__}; "
                "return a single torch.utils.data.DataLoader from train_dataloader()."
            )
        assert self.swarm is not None
        # BatchNorm1d normalises each feature over the batch alone: a batch of one sample fails in training.
        batchnorm = any(
            isinstance(module, nn.BatchNorm1d)
            for _, agent in self.swarm.items()
            for module in agent.modules()
        )
        loader = self.data.shard(dataloader, self.swarm.agent_ids, self.swarm.streams, batchnorm)
        if self._resume_batches:  # resuming from a mid-epoch checkpoint: the rest of that epoch
            rank_zero_warn(
                f"Resuming mid-epoch, after batch {self._resume_batches} of epoch {trainer.current_epoch}: "
                "the rest of the epoch gets the same batches, and the run is bit-exact if drawing a batch "
                "uses no random numbers; random augmentation of the rest of this epoch differs from the "
                "uninterrupted run (the checkpoint's random streams are one prefetched batch ahead, and "
                "DataLoader workers are re-seeded). "
                "End-of-epoch checkpoints (ModelCheckpoint(every_n_epochs=1)) always resume exactly."
            )
            loader.resume_after(self._resume_batches)
            self._resume_batches = 0
        return loader

    def _prepare_batch(self, agent_id: int, batch: Any) -> Any:
        assert self.swarm is not None
        # (as Lightning's loops do: e.g. bf16-true models need bf16 inputs)
        return self.precision_plugin.convert_input(self.swarm.to_device(agent_id, batch))

    def example_batch(self, agent_id: int) -> Any:
        """One batch of agent ``agent_id``'s shard on the device, drawn without touching any random stream."""
        assert self.swarm is not None
        return self.data.example_batch(agent_id, self._prepare_batch, self.root_device, self.swarm.streams)

    def local_batches(self, agent_id: int, num_batches: int | None) -> Any:
        """Up to ``num_batches`` of agent ``agent_id``'s own batches, on the device, drawn in its stream."""
        assert self.swarm is not None
        return self.data.batches(agent_id, num_batches, self.swarm.streams, self._prepare_batch)

    # ------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Records the run's identity (Π, partition, seed) next to the agents, then saves."""
        checkpoint.setdefault("dimat", {})["run"] = run_identity(self)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads a checkpoint to resume from — weights only unless you pass ``weights_only=False`` — refusing
        one written with another Π, partition or seed (unless named in ``resume_changes``)."""
        weights_only = True if weights_only is None else weights_only
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._resume_batches = batches_done_mid_epoch(checkpoint)
        dimat = checkpoint.get("dimat", {})
        saved = dimat.get("run")
        if saved is not None and dimat.get("num_agents") == self.num_agents:  # (else the swarm refuses it)
            found = differences(saved, run_identity(self), self.resume_changes)
            refuse_differences(found, f"The checkpoint {str(checkpoint_path)!r}")
        return checkpoint

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Every agent's weights (gathered from all processes), keyed ``agents.<global id>.*``."""
        assert self.swarm is not None
        local = self.swarm.state_dict()
        if self.world_size == 1:
            return local
        parts = self.all_gather_object(to_cpu(local))
        return {key: value for part in parts for key, value in part.items()}

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Every agent's optimizer and schedulers (gathered from all processes), keyed by global id."""
        state = super().optimizer_state(optimizer)
        if self.world_size == 1 or "agents" not in state:
            return state
        return {"agents": gather_by_agent(self.all_gather_object, to_cpu(state["agents"]))}

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Loads the local agents' weights from a checkpoint written with any number of processes."""
        assert self.swarm is not None
        state = local_agent_entries(checkpoint["state_dict"], self.swarm.agent_ids)
        self.swarm.load_state_dict(state, strict=strict)

    # ----------------------------------------------------------------- export
    @override
    def teardown(self) -> None:
        """Exports the chosen agent (or the consensus) into your module at the end of ``fit``."""
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        if (
            trainer is not None
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.state.status == TrainerStatus.RUNNING
            and self.user_module is not None
            and self.swarm is not None
            and self.export != "none"
        ):
            export_to(self, self.user_module)
            if self.export == "consensus":  # validate/test after fit report it as consensus/<name>
                self.swarm.hold_consensus(self.user_module.state_dict())
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Registers ``"dimat"``, so that ``Trainer(strategy="dimat")`` works."""
        strategy_registry.register(
            cls.strategy_name, cls, description="DIMAT: N agents on a graph, merged by MergeCallback"
        )


def batches_done_mid_epoch(checkpoint: Mapping[str, Any]) -> int:
    """Batches of its epoch that a checkpoint saved mid-epoch had trained on (0 at an epoch's end)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not progress or progress.get("is_last_batch", True):
        return 0
    return int(progress["current"]["processed"])


def _checked_export(export: Any, num_agents: int) -> Export:
    if export in ("consensus", "none"):
        return export
    if isinstance(export, int) and not isinstance(export, bool) and 0 <= export < num_agents:
        return export
    raise ValueError(
        f"export must be 'consensus', 'none' or an agent id in 0..{num_agents - 1}, got {export!r}."
    )


if DIMATStrategy.strategy_name not in StrategyRegistry:
    DIMATStrategy.register_strategies(StrategyRegistry)
