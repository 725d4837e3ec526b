"""Checking a spec the only way that matters: a random permutation must leave the outputs unchanged.

Examples:
    >>> import torch, torch.nn as nn
    >>> from lightning_dimat.permutation.tracing import permutation_spec
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> x = torch.randn(5, 4)
    >>> check_spec(net, permutation_spec(net, x), x) < 1e-5
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_dimat.permutation.apply import permute_state, random_permutations
from lightning_dimat.permutation.spec import PermutationSpec


class SpecMismatchError(AssertionError):
    """Permuting a model by its spec changed the model's outputs: the spec is wrong for this model."""


def _outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    leaves = [leaf for leaf in tree_leaves(model(*inputs)) if isinstance(leaf, Tensor)]
    floating = [leaf.detach().double() for leaf in leaves if torch.is_floating_point(leaf)]
    if not floating:
        raise ValueError(f"{type(model).__name__} returned no floating-point tensor to compare.")
    return floating


def _randomise(state: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Random values for every floating entry (running variances positive), so that no symmetry of the
    initialisation (BatchNorm's all-ones weights, zero-initialised branches) can hide a wrong spec."""
    randomised = {}
    for key, value in state.items():
        if not torch.is_floating_point(value):
            randomised[key] = value
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value)
        if key.endswith("running_var"):
            noise = noise.abs() + 0.5
        randomised[key] = value + 0.1 * noise if value.abs().max() > 0 else 0.1 * noise
    return randomised


def check_spec(
    model: nn.Module,
    spec: PermutationSpec,
    example_input: Tensor | Sequence[Tensor],
    tolerance: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
    randomise: bool = True,
) -> float:
    """Applies random permutations of every group and returns max |Δ output| (eval mode, no grad).

    The comparison runs on copies in ``dtype`` (float64 by default, so that rounding differences between
    the two summation orders cannot hide or fake a mismatch; ``None`` keeps the model's own dtype), with
    every floating state entry perturbed at random first (``randomise``), so that symmetric values such as
    freshly initialised BatchNorm layers cannot hide a wrong spec.

    Raises:
        SpecMismatchError: if the difference exceeds ``tolerance`` × the output scale (max(1, max|y|)).
    """
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    original = copy.deepcopy(model)
    permuted = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    state = _randomise(model.state_dict(), generator) if randomise else model.state_dict()
    original.load_state_dict(state)
    permuted.load_state_dict(permute_state(state, spec, random_permutations(spec, generator)))
    if dtype is not None:
        original, permuted = original.to(dtype), permuted.to(dtype)
        inputs = tuple(x.to(dtype) if torch.is_floating_point(x) else x for x in inputs)
    original.eval()
    permuted.eval()
    with torch.no_grad():
        expected, actual = _outputs(original, inputs), _outputs(permuted, inputs)
    difference = max((float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True)), default=0.0)
    scale = max([1.0] + [float(e.abs().max()) for e in expected])
    if difference > tolerance * scale:
        raise SpecMismatchError(
            f"Permuting {type(model).__name__} by its spec changed the outputs by up to {difference:.3g} "
            f"(allowed {tolerance * scale:.3g}): the spec does not describe this model's symmetries. "
            "If the spec was derived automatically, please report the model; meanwhile pass a hand-written "
            "spec."
        )
    return difference
