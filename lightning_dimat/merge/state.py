"""Arithmetic on ``state_dict``s: weighted sums, in-place writes, copies, sizes, consensus distance.

Examples:
    >>> weighted_state([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [0.25, 0.75])["w"]
    tensor([0.2500, 0.2500])
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def weighted_state(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """Σ_j w_j · states[j], accumulated in float32 (float64 stays float64).

    Integer and boolean entries (e.g. BatchNorm's ``num_batches_tracked``) are taken from ``states[0]``.

    Examples:
        >>> weighted_state([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [0.5, 0.5])["w"]
        tensor([0.5000, 0.5000])
    """
    if len(states) != len(weights):
        raise ValueError(f"Got {len(states)} states but {len(weights)} weights; give one weight per state.")
    if not states:
        raise ValueError("Nothing to merge: the list of states is empty.")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            differing = sorted(set(keys) ^ set(state))
            raise ValueError(f"State {index} does not match state 0: keys {differing[:5]} differ.")
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
    rather than by rebinding (keys are checked strictly and nothing is reallocated).

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> weight = net.weight
        >>> load_state_in_place(net, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)})
        >>> net.weight is weight and bool(net.weight.eq(0).all())
        True
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


def copy_holding(module: ModuleT, state: Mapping[str, Tensor]) -> ModuleT:
    """A deep copy of ``module`` holding ``state`` (on ``module``'s devices and dtypes).

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> held = copy_holding(net, {"weight": torch.zeros(2, 2), "bias": torch.ones(2)})
        >>> bool(held.bias.eq(1).all()) and held is not net and not bool(net.bias.eq(1).all())
        True
    """
    copied = copy.deepcopy(module)
    load_state_in_place(copied, state)
    return copied


def detached_state(state: Mapping[str, Tensor]) -> StateDict:
    """A copy of ``state`` detached from autograd (safe to keep while training goes on).

    Examples:
        >>> sorted(detached_state(nn.Linear(2, 1).state_dict()))
        ['bias', 'weight']
    """
    return {key: value.detach().clone() for key, value in state.items()}


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes needed to send ``state`` (every tensor at its own dtype).

    Examples:
        >>> state_bytes({"w": torch.zeros(4), "n": torch.zeros(2, dtype=torch.int64)})
        32
    """
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def parameter_sum(states: Iterable[Mapping[str, Tensor]], names: Sequence[str]) -> Tensor:
    """Σ over ``states`` of the entries ``names`` flattened into one float64 vector (streamed, no stack).

    Examples:
        >>> parameter_sum([{"w": torch.ones(2)}, {"w": torch.ones(2)}], ["w"])
        tensor([2., 2.], dtype=torch.float64)
    """
    total: Tensor | None = None
    for state in states:
        vector = torch.cat([state[name].detach().reshape(-1).double() for name in names])
        total = vector if total is None else total.add_(vector)
    if total is None:
        raise ValueError("parameter_sum got no states.")
    return total


def distance_sum(states: Iterable[Mapping[str, Tensor]], names: Sequence[str], mean: Tensor) -> float:
    """Σ over ``states`` of ‖x − mean‖ over the entries ``names`` (the consensus distance's numerator).

    Examples:
        >>> distance_sum([{"w": torch.zeros(2)}], ["w"], torch.tensor([3.0, 4.0], dtype=torch.float64))
        5.0
    """
    total = 0.0
    for state in states:
        offset, squared = 0, torch.zeros((), dtype=torch.float64, device=mean.device)
        for name in names:
            value = state[name].detach().reshape(-1).double()
            squared += (value - mean[offset : offset + value.numel()]).square().sum()
            offset += value.numel()
        total += float(squared.sqrt())
    return total
