"""One verified spec per architecture, found once per model instance.

A spec is derived by tracing (or taken from an explicit ``spec=``, or from the model's own
``permutation_spec`` method) and checked with :func:`~lightning_dimat.permutation.verify.check_spec`
before first use. Derived specs are shared between instances whose traced graphs and shapes are
identical — two instances of one class that compute different things (a config flag that changes
``forward``) get different specs.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from typing import Any

from torch import Tensor, nn

from lightning_dimat.permutation.context import DEFAULT_PROBES
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.permutation.tracing import permutation_spec
from lightning_dimat.permutation.verify import check_spec

_BY_ARCHITECTURE: dict[Hashable, PermutationSpec] = {}
_BY_MODEL: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, PermutationSpec]] = weakref.WeakKeyDictionary()


def _input_shape(example_input: Any) -> Hashable:
    return tuple(example_input.shape[1:]) if isinstance(example_input, Tensor) else None


def spec_for(
    model: nn.Module, example_input: Any, spec: PermutationSpec | None = None, probes: str = DEFAULT_PROBES
) -> PermutationSpec:
    """The verified spec of ``model`` (for inputs shaped like ``example_input``).

    Precedence: an explicit ``spec``; else the model's own ``permutation_spec(example_input)`` method if it
    defines one (the hand-written fallback for models the tracer cannot handle); else a spec derived by
    :func:`~lightning_dimat.permutation.tracing.permutation_spec` with the ``probes`` placement.
    """
    per_model = _BY_MODEL.setdefault(model, {})
    key = (_input_shape(example_input), id(spec) if spec is not None else None, probes)
    if key in per_model:
        return per_model[key]
    sample = example_input[:2] if isinstance(example_input, Tensor) else example_input
    own = getattr(model, "permutation_spec", None)
    if spec is not None or callable(own):
        resolved = spec if spec is not None else own(sample)
        check_spec(model, resolved, sample)
    else:
        derived = permutation_spec(model, sample, probes)
        shapes = tuple((name, tuple(value.shape)) for name, value in model.state_dict().items())
        architecture = (type(model), shapes, _input_shape(example_input), str(derived.graph), probes)
        if architecture not in _BY_ARCHITECTURE:
            check_spec(model, derived, sample)
            _BY_ARCHITECTURE[architecture] = derived
        resolved = _BY_ARCHITECTURE[architecture]
    per_model[key] = resolved
    return resolved


def clear_spec_cache() -> None:
    """Forgets every cached spec (they are rebuilt and re-verified on next use)."""
    _BY_ARCHITECTURE.clear()
    _BY_MODEL.clear()
