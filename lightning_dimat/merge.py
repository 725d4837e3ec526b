"""Merging models: x_i ← Σ_j π_ij P_ij x_j, as pure functions over ``state_dict``s (no Lightning here).

A *merge method* expresses neighbour states in a reference model's basis (it finds the P_ij);
:func:`weighted_state` takes the weighted sum; :func:`recompute_batchnorm` refreshes BatchNorm statistics
on local data afterwards. Methods live in :data:`MERGE_METHODS`: ``"activation"`` (DIMAT's activation
matching), ``"weight"`` (weight matching, the paper's WM) and ``"average"`` (P = I, the paper's WA);
add your own with :func:`register_merge_method`.

Examples:
    >>> import torch.nn as nn
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> merged = merge([a, b], [0.5, 0.5], method="average")
    >>> torch.allclose(merged.weight, (a.weight + b.weight) / 2)
    True
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from lightning_dimat.permutation.activation import match_activations
from lightning_dimat.permutation.apply import permute_state
from lightning_dimat.permutation.cache import spec_for
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.permutation.weight import match_weights
from lightning_dimat.registry import Registry

StateDict = dict[str, Tensor]
ModelT = TypeVar("ModelT", bound=nn.Module)


class MergeMethod(Protocol):
    """Expresses neighbour states in ``reference``'s basis (finds the P_ij of x_i ← Σ_j π_ij P_ij x_j).

    Args:
        reference: the model whose basis the results are in (agent i itself; P_ii = I).
        states: the neighbours' ``state_dict``s (same architecture as ``reference``; not agent i's own).
        data: batches of agent i's own data (``None`` for methods with ``requires_data = False``); for
            activation matching the statistics' samples, for weight matching only the shapes to trace.
        spec: a :class:`~lightning_dimat.permutation.PermutationSpec` to use instead of deriving one.
        forward_context: wraps forward passes (e.g. Lightning's autocast context).

    Returns:
        one ``state_dict`` per entry of ``states``, each functionally identical to its input.
    """

    requires_data: bool

    def __call__(
        self,
        reference: nn.Module,
        states: Sequence[Mapping[str, Tensor]],
        data: Iterable[Any] | None,
        *,
        spec: PermutationSpec | None = None,
        forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> list[StateDict]: ...


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register_merge_method(
    name: str,
    *aliases: str,
    requires_data: bool,
    uses_spec: bool = False,
    runs_neighbours: bool = False,
) -> Callable[[Any], Any]:
    """Registers a merge method (see :class:`MergeMethod`) under ``name`` for configs to refer to.

    ``uses_spec`` marks methods that need the model's permutation spec (derived and checked before
    training starts, so that an unsupported model fails at once rather than at the first merge).
    ``runs_neighbours`` marks methods that run the agent's data through its own and every neighbour's model
    (counted as extra forward passes in the communication ledger).
    """

    def decorator(function: Any) -> Any:
        function.requires_data = requires_data
        function.uses_spec = uses_spec
        function.runs_neighbours = runs_neighbours
        MERGE_METHODS.add(name, function, *aliases)
        return function

    return decorator


@register_merge_method("average", "wa", requires_data=False)
def average_alignment(
    reference: nn.Module, states: Sequence[Mapping[str, Tensor]], data: Iterable[Any] | None = None, **_: Any
) -> list[StateDict]:
    """Plain weight averaging (the paper's WA): every P_ij is the identity."""
    return [dict(state) for state in states]


@register_merge_method("activation", "am", "dimat", requires_data=True, uses_spec=True, runs_neighbours=True)
def activation_alignment(
    reference: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    data: Iterable[Any] | None,
    *,
    spec: PermutationSpec | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> list[StateDict]:
    """Activation matching (DIMAT): permutations from the correlation of hidden activations on ``data``."""
    first, inputs = _peek_inputs(reference, data)
    spec = spec_for(reference, first, spec)
    permutations = match_activations(spec, reference, states, inputs, forward_context)
    return [permute_state(state, spec, found) for state, found in zip(states, permutations, strict=True)]


@register_merge_method("weight", "wm", requires_data=True, uses_spec=True)
def weight_alignment(
    reference: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    data: Iterable[Any] | None,
    *,
    spec: PermutationSpec | None = None,
    **_: Any,
) -> list[StateDict]:
    """Weight matching (the paper's WM, Git Re-Basin): permutations from the weights alone.

    ``data`` is only used to trace the model's shapes (its first batch).
    """
    first, _ = _peek_inputs(reference, data)
    spec = spec_for(reference, first, spec)
    own = reference.state_dict()
    return [permute_state(state, spec, match_weights(spec, own, state)) for state in states]


def first_input(model: nn.Module, data: Iterable[Any] | Tensor) -> Any:
    """The first model input in ``data``, on ``model``'s device."""
    return _peek_inputs(model, data)[0]


def _peek_inputs(model: nn.Module, data: Iterable[Any] | Tensor | None) -> tuple[Any, Iterator[Any]]:
    """The first model input (on the model's device) and an iterator over all of them, first included."""
    if data is None:
        raise ValueError("This merge method needs `data`: batches (or a tensor) of model inputs.")
    device = _model_device(model)
    inputs = (_to_device(batch, device) for batch in model_inputs(data))
    first = next(inputs, None)
    if first is None:
        raise ValueError("This merge method got empty `data`.")
    return first, itertools.chain([first], inputs)


def weighted_state(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """Σ_j w_j · states[j], accumulated in float32 (float64 stays float64).

    Integer and boolean entries (e.g. BatchNorm's ``num_batches_tracked``) are taken from ``states[0]``.

    Examples:
        >>> weighted_state([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [0.25, 0.75])["w"]
        tensor([0.2500, 0.2500])
    """
    if len(states) != len(weights):
        raise ValueError(f"Got {len(states)} states but {len(weights)} weights; give one weight per state.")
    if not states:
        raise ValueError("Nothing to merge: the list of states is empty.")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            missing = sorted(set(keys) ^ set(state))
            raise ValueError(f"State {index} does not match state 0: keys {missing[:5]} differ.")
    merged: StateDict = {}
    for key in keys:
        reference = states[0][key]
        if not torch.is_floating_point(reference):
            merged[key] = reference.clone()
            continue
        dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
        total = torch.zeros(reference.shape, dtype=dtype, device=reference.device)
        for state, weight in zip(states, weights, strict=True):
            total.add_(state[key].to(device=reference.device, dtype=dtype), alpha=float(weight))
        merged[key] = total.to(reference.dtype)
    return merged


def load_state_in_place(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copies ``state`` into ``model``'s existing tensors, keeping their identity.

    Optimizers hold references to the parameters, so merged weights must be written with ``copy_``
    rather than by rebinding (``load_state_dict`` would also copy, but this checks keys strictly and
    never reallocates).
    """
    own = model.state_dict(keep_vars=True)
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise KeyError(
            f"State does not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}."
        )
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.data.copy_(state[key])


def model_inputs(data: Any, num_batches: int | None = None) -> Iterator[Any]:
    """Model inputs from ``data``: a tensor or a tuple ``(x, y, ...)`` of tensors (one batch), or an iterable
    of batches whose first element is the input (Lightning's ``(x, y)`` convention; a bare tensor batch is
    its own input).
    """
    for batch in _batches(data, num_batches):
        if isinstance(batch, Tensor):
            yield batch
        elif isinstance(batch, (tuple, list)) and batch:
            yield batch[0]
        else:
            raise TypeError(
                f"Cannot find the model input in a batch of type {type(batch).__name__}: expected a tensor "
                "or a tuple/list whose first element is the input."
            )


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(item, device) for item in inputs)
    if isinstance(inputs, Mapping):
        return {key: _to_device(value, device) for key, value in inputs.items()}
    return inputs


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that track running statistics."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]


def recompute_batchnorm(
    model: nn.Module,
    data: Iterable[Any] | Tensor,
    num_batches: int | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> int:
    """Resets BatchNorm running statistics and re-estimates them with cumulative averages over ``data``.

    Runs forward passes in train mode without gradients (``momentum=None`` gives the exact mean over
    the batches), then restores each layer's momentum and the model's mode. Returns the number of
    batches used (0 when the model has no BatchNorm: no data is read then).

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> recompute_batchnorm(net, torch.randn(16, 3))
        1
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    device = _model_device(model)
    used = 0
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
        model.train()
        with torch.no_grad(), forward_context():
            for inputs in model_inputs(data, num_batches):
                model(_to_device(inputs, device))
                used += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise ValueError("recompute_batchnorm got no batches: `data` is empty.")
    return used


def align(
    reference: nn.Module,
    other: ModelT,
    method: str = "activation",
    data: Iterable[Any] | Tensor | None = None,
    spec: PermutationSpec | None = None,
) -> ModelT:
    """A copy of ``other`` expressed in ``reference``'s basis (functionally identical to ``other``).

    Args:
        reference: the model whose basis the result is in.
        other: the model to permute (same architecture).
        method: ``"activation"`` (correlation of activations on ``data``), ``"weight"`` (weights only;
            ``data`` just traces shapes) or ``"average"`` (no permutation).
        data: a DataLoader, an iterable of batches whose first element is the input, or a tensor.
        spec: a hand-written :class:`~lightning_dimat.permutation.PermutationSpec` (default: derived).

    Examples:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> aligned = align(a, b, method="average")
        >>> torch.equal(aligned.weight, b.weight)
        True
    """
    aligner = MERGE_METHODS.get(method)
    _check_data(method, aligner, data)
    (state,) = aligner(reference, [other.state_dict()], data, spec=spec)
    aligned = copy.deepcopy(other)
    load_state_in_place(aligned, state)
    return aligned


def merge(
    models: Sequence[ModelT],
    weights: Sequence[float] | None = None,
    method: str = "activation",
    data: Iterable[Any] | Tensor | None = None,
    num_batches: int | None = None,
    spec: PermutationSpec | None = None,
) -> ModelT:
    """Σ_j w_j P_j x_j in ``models[0]``'s basis, as a new model of ``models[0]``'s class.

    Args:
        models: models of one architecture; the first one fixes the basis (P_0 = I).
        weights: one weight per model (default: uniform); they should sum to 1.
        method: a name in :data:`MERGE_METHODS` (``"activation"``, ``"weight"``, ``"average"``).
        data: batches for matching and for BatchNorm re-estimation (skipped when ``None``); must be
            re-iterable (a DataLoader, a list, a tensor).
        num_batches: how many batches of ``data`` to use (default: all).
        spec: a hand-written :class:`~lightning_dimat.permutation.PermutationSpec` (default: derived).
    """
    if not models:
        raise ValueError("merge() needs at least one model.")
    weights = [1.0 / len(models)] * len(models) if weights is None else list(weights)
    aligner = MERGE_METHODS.get(method)
    _check_data(method, aligner, data)
    limited = None if data is None else _Limited(data, num_batches)
    reference = models[0]
    aligned = [
        reference.state_dict(),
        *aligner(reference, [m.state_dict() for m in models[1:]], limited, spec=spec),
    ]
    merged = copy.deepcopy(reference)
    load_state_in_place(merged, weighted_state(aligned, weights))
    if limited is not None:
        recompute_batchnorm(merged, limited)
    return merged


def _check_data(method: str, aligner: MergeMethod, data: Any) -> None:
    if aligner.requires_data and data is None:
        raise ValueError(
            f"Merge method {method!r} matches activations and needs `data=` (batches of inputs)."
        )


def _batches(data: Any, num_batches: int | None) -> Iterator[Any]:
    """The batches of ``data`` (a tensor or a tuple of tensors is one batch), at most ``num_batches``."""
    if isinstance(data, Tensor) or (
        isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data)
    ):
        yield data
        return
    if num_batches is not None and num_batches <= 0:
        return
    for index, batch in enumerate(data):
        yield batch
        if num_batches is not None and index + 1 >= num_batches:
            return  # stop before fetching (and e.g. decoding) one batch too many


class _Limited:
    """Re-iterable view of the first ``num_batches`` batches of ``data`` (a one-shot iterator is read once
    and kept, since merging reads the data twice: for matching and for BatchNorm)."""

    def __init__(self, data: Iterable[Any] | Tensor, num_batches: int | None) -> None:
        self.data = list(_batches(data, num_batches)) if isinstance(data, Iterator) else data
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[Any]:
        return _batches(self.data, self.num_batches)
