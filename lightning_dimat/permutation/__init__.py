"""Re-basin machinery, free of Lightning: permutation specs, activation/weight matching, permuting."""

from lightning_dimat.permutation.activation import match_activations
from lightning_dimat.permutation.apply import (
    compose,
    identity_permutations,
    invert,
    invert_permutations,
    permute_optimizer_state,
    permute_state,
    random_permutations,
)
from lightning_dimat.permutation.assignment import solve_assignment
from lightning_dimat.permutation.rules import register_op_rule
from lightning_dimat.permutation.spec import PermutationSpec, Segment
from lightning_dimat.permutation.tracing import UnsupportedModelError, permutation_spec
from lightning_dimat.permutation.weight import match_weights

__all__ = [
    "PermutationSpec",
    "Segment",
    "UnsupportedModelError",
    "compose",
    "identity_permutations",
    "invert",
    "invert_permutations",
    "match_activations",
    "match_weights",
    "permutation_spec",
    "permute_optimizer_state",
    "permute_state",
    "random_permutations",
    "register_op_rule",
    "solve_assignment",
]
