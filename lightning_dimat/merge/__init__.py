"""Merging models, free of Lightning: matchers that find permutations, state arithmetic, BatchNorm refresh.

x_i ← Σ_j π_ij P_ij x_j: a :class:`Matcher` finds the P_ij (``"activation"``: DIMAT, ``"weight"``: WM,
``"average"``: WA — :data:`MATCHERS`, extended with :func:`register_matcher`), :func:`combine` applies them
and takes the weighted sum, :func:`recompute_batchnorm` refreshes BatchNorm statistics on local data.
:func:`align` and :func:`merge` do the same for plain models.
"""

from lightning_dimat.merge.batchnorm import batchnorm_layers, recompute_batchnorm
from lightning_dimat.merge.combine import combine, merge_into_basis
from lightning_dimat.merge.finite import NonFiniteAgentError, nonfinite_agents
from lightning_dimat.merge.functional import align, merge
from lightning_dimat.merge.inputs import first_input, model_inputs, num_samples
from lightning_dimat.merge.matchers import (
    MATCHERS,
    ActivationMatcher,
    AverageMatcher,
    Matcher,
    WeightMatcher,
    matcher_spec,
    register_matcher,
    resolve_matcher,
)
from lightning_dimat.merge.state import (
    detached_state,
    load_state_in_place,
    state_bytes,
    weighted_state,
)

__all__ = [
    "MATCHERS",
    "ActivationMatcher",
    "AverageMatcher",
    "Matcher",
    "NonFiniteAgentError",
    "WeightMatcher",
    "align",
    "batchnorm_layers",
    "combine",
    "detached_state",
    "first_input",
    "load_state_in_place",
    "matcher_spec",
    "merge",
    "merge_into_basis",
    "model_inputs",
    "nonfinite_agents",
    "num_samples",
    "recompute_batchnorm",
    "register_matcher",
    "resolve_matcher",
    "state_bytes",
    "weighted_state",
]
