"""One agent, or the consensus of all agents, out of a DIMAT checkpoint into a plain Lightning checkpoint.

A DIMAT checkpoint holds every agent (``agents.<g>.*``), so ``MyModel.load_from_checkpoint`` cannot read it.
:func:`export_checkpoint` writes one that it can: the chosen weights under your module's own names, with
its hyper-parameters. One agent is a rename of tensors; the consensus needs the merge method and each
agent's data (for matching and BatchNorm), so it restores the run with the trainer and data of the run and
merges without training a step. The same from the console::

    lightning-dimat export run.ckpt --agent 2 --output agent2.ckpt
    lightning-dimat export run.ckpt --agent consensus --config run.yaml --output model.ckpt
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from lightning_dimat.strategy.agents import read_checkpoint

__all__ = ["agent_state", "export_checkpoint", "plain_checkpoint"]

KEPT_ENTRIES = (
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "datamodule_hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hparams_type",
    "epoch",
    "global_step",
)
"""Entries of the DIMAT checkpoint carried over (your module's and datamodule's hyper-parameters)."""


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    agent: int | Literal["consensus"] = "consensus",
    *,
    trainer: Trainer | None = None,
    model: LightningModule | None = None,
    datamodule: LightningDataModule | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a plain Lightning checkpoint of agent ``agent`` (or the consensus) of a DIMAT ``checkpoint``.

    Args:
        checkpoint: a ``.ckpt`` written by a :class:`~lightning_dimat.DIMATStrategy` run.
        output: where to write the plain checkpoint.
        agent: an agent id, or ``"consensus"``: all agents merged with equal weights into agent 0's basis by
            the run's merge method, BatchNorm re-estimated on every agent's data.
        trainer: for ``"consensus"`` only: a trainer configured as the run was (its ``DIMATStrategy`` and
            ``MergeCallback``; a run with another topology, partition or seed is refused). It restores the
            checkpoint and trains no step; it writes no checkpoint of its own.
        model: for ``"consensus"`` only: a fresh instance of your module (it receives the consensus).
        datamodule: for ``"consensus"`` only, if ``model`` does not define its own dataloaders.
        overwrite: replace an existing ``output``.

    Returns:
        ``output``, which ``MyModel.load_from_checkpoint(output)`` loads.

    Example (needs a run's checkpoint, so not run as a doctest)::

        export_checkpoint("run.ckpt", "agent0.ckpt", agent=0)
        export_checkpoint(
            "run.ckpt", "model.ckpt", trainer=Trainer(strategy=DIMATStrategy(...), callbacks=[merge]),
            model=MyModel(), datamodule=MyData())
        MyModel.load_from_checkpoint("model.ckpt")
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"output={str(output)!r} exists; choose another path or pass overwrite=True.")
    saved = read_checkpoint(checkpoint, "checkpoint")
    num_agents = _num_agents(saved, checkpoint)
    if agent == "consensus":
        state = _consensus_state(checkpoint, saved, trainer, model, datamodule)
    elif isinstance(agent, int) and not isinstance(agent, bool) and 0 <= agent < num_agents:
        state = agent_state(saved["state_dict"], agent)
    else:
        raise ValueError(
            f"agent={agent!r}: pass 'consensus' or an agent id in 0..{num_agents - 1} "
            f"(the checkpoint {str(checkpoint)!r} holds {num_agents} agents)."
        )
    if state is None:  # (another process of a multi-process consensus export: rank 0 writes)
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    torch.save(plain_checkpoint(state, saved), partial)
    partial.replace(output)
    return output


def agent_state(state_dict: Mapping[str, Any], agent: int) -> dict[str, Any]:
    """Agent ``agent``'s entries of a DIMAT ``state_dict``, under the names of your module.

    Examples:
        >>> agent_state({"agents.0.w": 1, "agents.1.w": 2, "agents.10.w": 3}, 1)
        {'w': 2}
    """
    prefix = f"agents.{agent}."
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def plain_checkpoint(state: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint of one module's ``state`` that ``load_from_checkpoint`` reads, with the hyper-parameters
    (and the epoch and step) of the DIMAT checkpoint ``saved``."""
    plain = {key: saved[key] for key in KEPT_ENTRIES if key in saved}
    plain["state_dict"] = dict(state)
    plain["pytorch-lightning_version"] = saved.get("pytorch-lightning_version", lightning.__version__)
    return plain


def _num_agents(saved: Mapping[str, Any], path: str | Path) -> int:
    dimat = saved.get("dimat")
    if not isinstance(dimat, Mapping) or "state_dict" not in saved:
        raise ValueError(
            f"{str(path)!r} is not a DIMAT checkpoint (no 'dimat' entry; keys: {sorted(saved)}): it already "
            "is a plain checkpoint, or was not written by a DIMATStrategy run."
        )
    return int(dimat["num_agents"])


def _consensus_state(
    path: str | Path,
    saved: Mapping[str, Any],
    trainer: Trainer | None,
    model: LightningModule | None,
    datamodule: LightningDataModule | None,
) -> dict[str, Any] | None:
    """The consensus of the checkpoint's agents, by ``trainer``'s strategy, without a training step."""
    from lightning_dimat.strategy.strategy import DIMATStrategy

    if trainer is None or model is None:
        raise ValueError(
            "agent='consensus' needs the run's trainer (its DIMATStrategy and MergeCallback) and a fresh "
            "instance of your module: export_checkpoint(..., trainer=Trainer(strategy=DIMATStrategy(...), "
            "callbacks=[MergeCallback(...)]), model=MyModel(), datamodule=MyData()). From the console: "
            "--config <the run's config>. (One agent, --agent <id>, needs neither.)"
        )
    strategy = trainer.strategy
    if not isinstance(strategy, DIMATStrategy):
        raise ValueError(
            f"The trainer's strategy is {type(strategy).__name__}, not DIMATStrategy: configure the trainer "
            "as the run that wrote the checkpoint was."
        )
    strategy.export = "consensus"
    # Restore, then stop before the first step: the loop is done at the checkpoint's own step count.
    trainer.fit_loop.epoch_loop.max_steps = int(saved.get("global_step", 0))
    trainer.num_sanity_val_steps = 0
    trainer.callbacks = [callback for callback in trainer.callbacks if not isinstance(callback, Checkpoint)]
    with warnings.catch_warnings():  # (the run's ModelCheckpoint is left out on purpose: nothing is saved)
        warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be")
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(path))
    return dict(model.state_dict()) if trainer.is_global_zero else None
