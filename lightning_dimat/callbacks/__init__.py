"""Lightning callbacks: when and how agents merge, the gossip baselines, per-agent reports."""

from lightning_dimat.callbacks.gossip import CDSGDCallback, SGPCallback
from lightning_dimat.callbacks.merge import MergeCallback
from lightning_dimat.callbacks.report import AgentReport

__all__ = ["AgentReport", "CDSGDCallback", "MergeCallback", "SGPCallback"]
