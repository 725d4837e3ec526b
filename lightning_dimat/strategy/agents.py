"""Building the agents: copies of the user's module, their trainer flags, their starting weights."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_dimat.swarm import AgentSwarm, swarm_class_for
from lightning_dimat.swarm.random_streams import AgentRandomStreams, agent_seed, seeded


def build_swarm(
    model: LightningModule,
    trainer: Trainer,
    agent_ids: Sequence[int],
    num_agents: int,
    world_size: int,
    streams: AgentRandomStreams,
) -> AgentSwarm:
    """A swarm of deep copies of ``model``, one per local agent id; refuses modules DIMAT cannot train."""
    if not model.automatic_optimization:
        raise MisconfigurationException(
            f"{type(model).__name__} uses manual optimization; DIMATStrategy steps each agent's "
            "optimizer itself and needs automatic optimization (return the loss from training_step)."
        )
    if trainer.state.fn == TrainerFn.FITTING and not is_overridden("training_step", model, LightningModule):
        raise MisconfigurationException(f"{type(model).__name__} does not define training_step.")
    trainer_ref, model.trainer = model._trainer, None
    try:
        agents = {agent_id: copy.deepcopy(model) for agent_id in agent_ids}
    finally:
        model.trainer = trainer_ref
    return swarm_class_for(model)(agents, streams, num_agents, world_size)


class TrainerFlags:
    """Gradient clipping and accumulation, which Lightning refuses under manual optimization: taken over
    from the trainer in ``connect`` (before Lightning's check) and applied per agent by the swarm."""

    def __init__(self) -> None:
        self.clip_val: float | None = None
        self.clip_algorithm: str | None = None
        self.accumulate = 1

    def take_over(self, trainer: Trainer, swarm: AgentSwarm) -> None:
        """Moves the flags from ``trainer`` onto ``swarm``."""
        if trainer.gradient_clip_val:
            self.clip_val, trainer.gradient_clip_val = float(trainer.gradient_clip_val), None
        algorithm = trainer.gradient_clip_algorithm
        self.clip_algorithm = str(getattr(algorithm, "value", algorithm) or "norm")
        if trainer.accumulate_grad_batches != 1:
            self.accumulate, trainer.accumulate_grad_batches = int(trainer.accumulate_grad_batches), 1
        swarm.gradient_clip_val = self.clip_val
        swarm.gradient_clip_algorithm = self.clip_algorithm
        swarm.accumulate_grad_batches = self.accumulate
        # Each agent draws its own shard; evaluation runs on the full sets. No DistributedSampler anywhere.
        trainer._accelerator_connector.use_distributed_sampler = False


def reinitialise_agents(swarm: AgentSwarm, seed: int, device: torch.device) -> None:
    """Fresh parameters for agent g from seed ``(seed, g)``: every submodule's ``reset_parameters``.

    Frozen parameters (``requires_grad=False``, e.g. a pre-trained backbone) stay as given: a submodule
    whose own parameters are all frozen is not reset at all (its buffers, such as BatchNorm statistics,
    are kept too), and in a partly frozen one the frozen tensors are put back after the reset.
    """
    for agent_id, agent in swarm.items():
        with seeded(agent_seed(seed, agent_id, 0), device), torch.no_grad():
            for module in agent.modules():
                reset = getattr(module, "reset_parameters", None)
                if module is agent or not callable(reset):
                    continue
                own = dict(module.named_parameters(recurse=False))
                frozen = {name: p.detach().clone() for name, p in own.items() if not p.requires_grad}
                if own and len(frozen) == len(own):
                    continue
                reset()
                for name, value in frozen.items():
                    own[name].copy_(value)


def load_initial_weights(swarm: AgentSwarm, path: str | Path, num_agents: int) -> None:
    """Agent g's weights from agent g of the DIMAT checkpoint at ``path`` (written with ``num_agents``).

    The file is read with ``weights_only=True``: tensors and plain containers only, so a crafted file
    cannot run code.
    """
    checkpoint = read_checkpoint(path, "init_from")
    if "dimat" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"init_from={str(path)!r} is not a DIMAT checkpoint (no 'dimat' entry; keys: "
            f"{sorted(checkpoint)}); "
            "pass a checkpoint written by a DIMATStrategy run (trainer.save_checkpoint or ModelCheckpoint)."
        )
    saved = checkpoint["dimat"].get("num_agents")
    if saved != num_agents:
        raise ValueError(
            f"init_from={str(path)!r} holds {saved} DIMAT agents but this run has "
            f"num_agents={num_agents}; pre-train with the same number of agents."
        )
    swarm.load_state_dict(local_agent_entries(checkpoint["state_dict"], swarm.agent_ids), strict=True)


def read_checkpoint(path: str | Path, option: str) -> dict[str, Any]:
    """The checkpoint dict at ``path``, loaded with ``weights_only=True``; a clear error naming ``option``
    and the file when it is missing, unreadable, or not a checkpoint."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option}={str(path)!r}: no such file; pass the path of a .ckpt file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by file kind
        raise ValueError(
            f"{option}={str(path)!r} could not be read as a checkpoint of weights "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "expected a .ckpt written by Lightning (only tensors and plain containers are loaded, "
            "never code)."
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{option}={str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
            "expected a .ckpt written by Lightning."
        )
    return checkpoint


def local_agent_entries(state: dict[str, Any], agent_ids: Sequence[int]) -> dict[str, Any]:
    """The entries ``agents.<g>.*`` of a checkpoint's ``state_dict`` for the agents ``agent_ids``."""
    prefixes = tuple(f"agents.{agent_id}." for agent_id in agent_ids)
    return {key: value for key, value in state.items() if key.startswith(prefixes)}
