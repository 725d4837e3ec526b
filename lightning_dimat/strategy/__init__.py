"""The Lightning strategy: agents, their data, merge rounds, checkpoints, export, launching."""

from lightning_dimat.strategy.plain_checkpoint import export_checkpoint
from lightning_dimat.strategy.rounds import AgentHandle, MergeRound
from lightning_dimat.strategy.strategy import DIMATStrategy

__all__ = ["AgentHandle", "DIMATStrategy", "MergeRound", "export_checkpoint"]
