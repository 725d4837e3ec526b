"""One spec per architecture, derived (or taken from the model's own ``permutation_spec`` method) and verified
once: the first time a spec is built for a model class with given shapes, random permutations must leave
the outputs unchanged (:func:`~lightning_dimat.permutation.verify.check_spec`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from torch import Tensor, nn

from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.permutation.tracing import permutation_spec
from lightning_dimat.permutation.verify import check_spec

_SPECS: dict[Hashable, PermutationSpec] = {}


def _architecture_key(model: nn.Module, example_input: Any) -> Hashable:
    shapes = tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())
    input_shape = tuple(example_input.shape[1:]) if isinstance(example_input, Tensor) else None
    return type(model), shapes, input_shape


def spec_for(model: nn.Module, example_input: Any, spec: PermutationSpec | None = None) -> PermutationSpec:
    """The verified spec of ``model``'s architecture.

    Precedence: an explicit ``spec``; else the model's own ``permutation_spec(example_input)`` method if it
    defines one (the hand-written fallback for models the tracer cannot handle); else a spec derived by
    :func:`~lightning_dimat.permutation.tracing.permutation_spec`. Each is checked once per architecture.
    """
    key = (*_architecture_key(model, example_input), id(spec) if spec is not None else None)
    if key not in _SPECS:
        sample = example_input[:2] if isinstance(example_input, Tensor) else example_input
        if spec is None:
            own = getattr(model, "permutation_spec", None)
            spec = own(sample) if callable(own) else permutation_spec(model, sample)
        check_spec(model, spec, sample)
        _SPECS[key] = spec
    return _SPECS[key]


def clear_spec_cache() -> None:
    """Forgets every cached spec (specs are rebuilt and re-verified on next use)."""
    _SPECS.clear()
