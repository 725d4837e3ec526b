"""lightning_dimat: DIMAT (Decentralized Iterative Merging-And-Training) for PyTorch Lightning.

Examples:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_dimat import DIMATStrategy, MergeCallback
    >>> strategy = DIMATStrategy(topology="ring")
    >>> trainer = Trainer(strategy=strategy, callbacks=[MergeCallback()], logger=False)
    >>> trainer.strategy.num_agents
    5
"""

from lightning_dimat.callbacks import AgentReport, CDSGDCallback, MergeCallback, SGPCallback
from lightning_dimat.comm import COMPRESSIONS, CommunicationLedger
from lightning_dimat.merge import (
    MATCHERS,
    ActivationMatcher,
    AverageMatcher,
    Matcher,
    WeightMatcher,
    align,
    merge,
    recompute_batchnorm,
    register_matcher,
)
from lightning_dimat.partition import PARTITIONS, partition, register_partition
from lightning_dimat.permutation import PermutationSpec, permutation_spec
from lightning_dimat.permutation.verify import check_spec
from lightning_dimat.strategy import DIMATStrategy, export_checkpoint
from lightning_dimat.swarm import AgentSwarm
from lightning_dimat.topology import GRAPHS, MIXING_RULES, Topology, build_topology, register_topology

__version__ = "0.1.0"

__all__ = [
    "COMPRESSIONS",
    "GRAPHS",
    "MATCHERS",
    "MIXING_RULES",
    "PARTITIONS",
    "ActivationMatcher",
    "AgentReport",
    "AgentSwarm",
    "AverageMatcher",
    "CDSGDCallback",
    "CommunicationLedger",
    "DIMATStrategy",
    "Matcher",
    "MergeCallback",
    "PermutationSpec",
    "SGPCallback",
    "Topology",
    "WeightMatcher",
    "align",
    "build_topology",
    "check_spec",
    "export_checkpoint",
    "merge",
    "partition",
    "permutation_spec",
    "recompute_batchnorm",
    "register_matcher",
    "register_partition",
    "register_topology",
]
