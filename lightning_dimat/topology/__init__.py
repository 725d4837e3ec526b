"""Communication graphs and mixing matrices for DIMAT.

Each of the N agents merges its model with its neighbours' using the weights of a symmetric, doubly
stochastic mixing matrix Π (row ``i`` holds agent ``i``'s weights). A :class:`Topology` holds a validated Π.
Graphs come from the ``GRAPHS`` registry (``ring``, ``fully_connected``/``fc``, ``star``, ``torus``,
``exponential``, ``erdos_renyi``); weights come from a rule in the ``MIXING_RULES`` registry
(``metropolis_hastings``, ``uniform``, ``max_degree``). Add your own with the ``register_topology`` and
``register_mixing_rule`` decorators.

The package is split by job: :mod:`~lightning_dimat.topology.graphs` (graph builders and ``GRAPHS``),
:mod:`~lightning_dimat.topology.mixing` (mixing rules, ``validate_mixing`` and the push-sum validator
``column_stochastic``) and :mod:`~lightning_dimat.topology.topology` (``Topology``, ``InducedMixing`` and
``build_topology``). Every name is re-exported here.

Examples:
    >>> topology = build_topology("ring", num_agents=5)
    >>> topology.neighbors(0), round(topology.weights(0)[1], 4)
    ([1, 4], 0.3333)
"""

from __future__ import annotations

from lightning_dimat.topology.graphs import GRAPHS, register_topology
from lightning_dimat.topology.graphs import GraphBuilder as GraphBuilder
from lightning_dimat.topology.graphs import erdos_renyi as erdos_renyi
from lightning_dimat.topology.graphs import exponential as exponential
from lightning_dimat.topology.graphs import fully_connected as fully_connected
from lightning_dimat.topology.graphs import ring as ring
from lightning_dimat.topology.graphs import star as star
from lightning_dimat.topology.graphs import torus as torus
from lightning_dimat.topology.mixing import (
    MIXING_RULES,
    column_stochastic,
    register_mixing_rule,
    validate_mixing,
)
from lightning_dimat.topology.mixing import MixingRule as MixingRule
from lightning_dimat.topology.mixing import max_degree as max_degree
from lightning_dimat.topology.mixing import metropolis_hastings as metropolis_hastings
from lightning_dimat.topology.mixing import uniform as uniform
from lightning_dimat.topology.schedule import (
    SCHEDULES,
    TopologySchedule,
    build_schedule,
    register_schedule,
)
from lightning_dimat.topology.topology import InducedMixing, Topology, build_topology

# ``__all__`` keeps the names a star import gave before the split (plus the new API); the builders, rules
# and type aliases above stay importable from here under their old names.
__all__ = [
    "GRAPHS",
    "MIXING_RULES",
    "SCHEDULES",
    "InducedMixing",
    "Topology",
    "TopologySchedule",
    "build_schedule",
    "build_topology",
    "column_stochastic",
    "register_mixing_rule",
    "register_schedule",
    "register_topology",
    "validate_mixing",
]
