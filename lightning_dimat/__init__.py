"""lightning_dimat: DIMAT (Decentralized Iterative Merging-And-Training) for PyTorch Lightning.

Examples:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_dimat import DIMATStrategy, MergeCallback
    >>> strategy = DIMATStrategy(topology="ring")
    >>> trainer = Trainer(strategy=strategy, callbacks=[MergeCallback()])  # doctest: +SKIP
"""

from lightning_dimat.callback import MergeCallback
from lightning_dimat.communication import CommunicationLedger
from lightning_dimat.gossip import CDSGDCallback, SGPCallback
from lightning_dimat.merge import MERGE_METHODS, align, merge, recompute_batchnorm, register_merge_method
from lightning_dimat.partition import PARTITIONS, partition, register_partition
from lightning_dimat.permutation import PermutationSpec, permutation_spec
from lightning_dimat.permutation.verify import check_spec
from lightning_dimat.report import AgentReport
from lightning_dimat.strategy import DIMATStrategy
from lightning_dimat.swarm import AgentSwarm
from lightning_dimat.topology import GRAPHS, MIXING_RULES, Topology, build_topology, register_topology

__version__ = "0.1.0"

__all__ = [
    "GRAPHS",
    "MERGE_METHODS",
    "MIXING_RULES",
    "PARTITIONS",
    "AgentReport",
    "AgentSwarm",
    "CDSGDCallback",
    "CommunicationLedger",
    "DIMATStrategy",
    "MergeCallback",
    "PermutationSpec",
    "SGPCallback",
    "Topology",
    "align",
    "build_topology",
    "check_spec",
    "merge",
    "partition",
    "permutation_spec",
    "recompute_batchnorm",
    "register_merge_method",
    "register_partition",
    "register_topology",
]
