"""Re-basin machinery, free of Lightning: permutation specs, activation/weight matching, permuting."""

from lightning_dimat.permutation.apply import (
    invert,
    permute_optimizer_state,
    permute_state,
    random_permutations,
)
from lightning_dimat.permutation.spec import PermutationSpec, Segment
from lightning_dimat.permutation.tracing import UnsupportedModelError, permutation_spec

__all__ = [
    "PermutationSpec",
    "Segment",
    "UnsupportedModelError",
    "invert",
    "permutation_spec",
    "permute_optimizer_state",
    "permute_state",
    "random_permutations",
]
