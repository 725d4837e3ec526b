"""The linear assignment behind both matchings: one permutation of units maximising a total score.

Independent assignments (one per channel group and neighbour in activation matching) are solved side by side
by :func:`solve_assignments`: SciPy's solver releases the GIL, so they take the machine's cores instead of
one after another.

Examples:
    >>> import torch
    >>> score = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    >>> solve_assignment(score)
    tensor([1, 0])
    >>> solve_assignment(score, identity_bias=1.0)  # λ on the diagonal favours leaving units in place
    tensor([0, 1])
    >>> solve_assignments([score, score.T.contiguous()])
    [tensor([1, 0]), tensor([1, 0])]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def _as_matrix(value: Tensor) -> np.ndarray:
    """A float64 NumPy copy of ``value`` (never a view of it)."""
    return value.detach().to("cpu", torch.float64).numpy().copy()


def _check(score: Tensor, prior: Tensor | None, identity_bias: float) -> None:
    if score.dim() != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(
            f"The assignment score must be a square (n, n) matrix; got shape {tuple(score.shape)}."
        )
    if prior is not None and prior.shape != score.shape:
        raise ValueError(
            f"The assignment prior has shape {tuple(prior.shape)}; it must match the score's "
            f"{tuple(score.shape)}."
        )
    if not math.isfinite(identity_bias):
        raise ValueError(f"identity_bias must be a finite number; got {identity_bias}.")


def solve_assignment(score: Tensor, prior: Tensor | None = None, identity_bias: float = 0.0) -> Tensor:
    """The permutation ``p`` maximising Σ_i (score + prior + identity_bias·I)[i, p[i]].

    Solved exactly in float64 by ``scipy.optimize.linear_sum_assignment``.

    Args:
        score: (n, n) scores, e.g. correlations of reference unit i with other unit j.
        prior: an optional (n, n) matrix added to ``score`` (e.g. a preference carried over from an
            earlier matching).
        identity_bias: λ added to the diagonal: 0 is the plain matching, a large λ keeps every unit in
            place (the identity).

    Returns:
        A ``LongTensor`` of n indices on the CPU: unit i of the result is unit ``p[i]`` of the other model.

    Raises:
        ValueError: if ``score`` is not square, ``prior`` does not match it, or either holds NaN or inf.
    """
    _check(score, prior, identity_bias)
    matrix = _as_matrix(score)
    if not np.isfinite(matrix).all():
        raise ValueError(
            "The assignment score contains NaN or inf: the activations/weights it was computed from "
            "contain NaN or inf (has a model diverged?)."
        )
    if prior is not None:
        extra = _as_matrix(prior)
        if not np.isfinite(extra).all():
            raise ValueError("The assignment prior contains NaN or inf.")
        matrix += extra
    if identity_bias:
        matrix[np.diag_indices_from(matrix)] += identity_bias
    rows, columns = linear_sum_assignment(matrix, maximize=True)
    permutation = torch.empty(len(rows), dtype=torch.long)
    permutation[torch.as_tensor(rows)] = torch.as_tensor(columns)
    return permutation


def solve_assignments(scores: Sequence[Tensor], identity_bias: float = 0.0) -> list[Tensor]:
    """:func:`solve_assignment` of each of ``scores``, solved concurrently on up to one thread per core.

    The results are exactly those of solving them one by one, in the same order.

    Args:
        scores: independent (n, n) score matrices (sizes may differ).
        identity_bias: λ added to every matrix's diagonal.

    Returns:
        One permutation per score, in order.
    """
    workers = min(len(scores), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if workers <= 1:
        return [solve_assignment(score, identity_bias=identity_bias) for score in scores]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lightning_dimat_assignment") as pool:
        return list(pool.map(lambda score: solve_assignment(score, identity_bias=identity_bias), scores))
