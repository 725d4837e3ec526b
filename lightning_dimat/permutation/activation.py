"""Activation matching (the DIMAT paper's Eq. 1): one linear assignment per group on the cross-correlation
of the reference's and the other model's hidden activations, collected on the *reference's* data.

Statistics are streamed batch by batch: per group only the means, variances and the C×C cross term are
kept (pixels count as samples for convolutions), never whole activations. The reference runs once per
batch; each other model runs on the same batch with its own weights swapped in
(``torch.func.functional_call``), so a merge costs (number of models) forward passes per batch.

Examples:
    >>> import torch, torch.nn as nn
    >>> from lightning_dimat.permutation.tracing import permutation_spec
    >>> from lightning_dimat.permutation.apply import permute_state
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> x = torch.randn(64, 4)
    >>> spec = permutation_spec(net, x)
    >>> shuffled = permute_state(net.state_dict(), spec, {"0": torch.randperm(16)})
    >>> (found,) = match_activations(spec, net, [shuffled], [x])
    >>> torch.equal(permute_state(shuffled, spec, found)["0.weight"], net[0].weight)
    True
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call

from lightning_dimat.permutation.assignment import solve_assignments
from lightning_dimat.permutation.spec import PermutationSpec

_SINK: ContextVar[Callable[[str, Tensor], None] | None] = ContextVar(
    "lightning_dimat_probe_sink", default=None
)


def record_probe(value: Tensor, name: str) -> None:
    """Called from instrumented graphs: hands a probe's activation to the active sink."""
    sink = _SINK.get()
    if sink is not None:
        sink(name, value)


@contextmanager
def _sink(function: Callable[[str, Tensor], None]) -> Iterator[None]:
    token = _SINK.set(function)
    try:
        yield
    finally:
        _SINK.reset(token)


class Moments:
    """Streaming count, sum and sum of squares of C units (samples along dim 0), in float64.

    Samples are shifted by the first batch's per-unit mean (:meth:`centre`) before they are summed, so
    that activations with large means lose no precision in float32 products.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.count = 0
        self.shift: Tensor | None = None
        self.sum = torch.zeros(size, dtype=torch.float64, device=device)
        self.square = torch.zeros(size, dtype=torch.float64, device=device)

    def centre(self, x: Tensor) -> Tensor:
        """``x`` minus this stream's shift (set from the first batch it sees)."""
        if self.shift is None:
            self.shift = x.mean(0)
        return x - self.shift

    def update(self, x: Tensor) -> None:
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.square += x.square().sum(0, dtype=torch.float64)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        n = max(self.count, 1)
        mean = self.sum / n
        return mean, (self.square / n - mean.square()).clamp_min(0).sqrt()


class CrossStatistics:
    """Another model's moments on the same samples and the C×C cross term with the reference's units."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.moments = Moments(size, device)
        self.cross = torch.zeros(size, size, dtype=torch.float64, device=device)

    def update(self, reference: Tensor, other: Tensor) -> None:
        """Adds samples: ``reference`` (already centred) and ``other`` are (samples, C) float32."""
        other = self.moments.centre(other)
        self.moments.update(other)
        self.cross += (reference.T @ other).double()

    def correlation(self, reference: Moments) -> Tensor:
        """Pearson correlation of every reference unit with every unit of the other model (0 if constant)."""
        n = max(reference.count, 1)
        mean_a, std_a = reference.mean_std()
        mean_b, std_b = self.moments.mean_std()
        covariance = self.cross / n - torch.outer(mean_a, mean_b)
        return covariance / (torch.outer(std_a, std_b) + 1e-12)


TIE_BREAK = 1e-4
"""The most that how alike two units' weights are adds to their score (a correlation is of order 1, its
float32 rounding about 1e-7): it decides between units the data cannot tell apart — zero on every input
after a ReLU, or active on the same few inputs — and moves no unit the data tells apart by more."""


def _unit_signatures(spec: PermutationSpec, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per group, (units, features) that no other group's permutation changes: each unit's entry in every
    1-D state entry the group permutes (biases, normalisation parameters and statistics), and the norm of
    its slice of every larger one (its weight rows and columns)."""
    columns: dict[str, list[Tensor]] = {group: [] for group in spec.group_sizes}
    for key, layouts in spec.axes.items():
        value = state.get(key)
        if value is None or not value.is_floating_point():
            continue
        for axis, layout in enumerate(layouts):
            if layout is None or len(layout) != 1 or layout[0].block != 1 or layout[0].group not in columns:
                continue
            others = [dim for dim in range(value.dim()) if dim != axis]
            column = value.detach()
            if others:
                column = torch.linalg.vector_norm(column.float(), dim=others)
            columns[layout[0].group].append(column.double().cpu().unsqueeze(1))
    return {
        group: torch.cat(found, 1) if found else torch.zeros(spec.group_sizes[group], 0, dtype=torch.float64)
        for group, found in columns.items()
    }


def _with_tie_break(score: Tensor, reference: Tensor, other: Tensor) -> Tensor:
    """``score`` plus :data:`TIE_BREAK` × the likeness of the units' signatures, 1 / (1 + distance / the
    mean distance): 1 for a unit's exact copy, about 1/2 for a typical pair."""
    distance = torch.cdist(reference, other)
    scale = distance.mean().clamp_min(1e-12)
    likeness = 1.0 / (1.0 + distance / scale)
    return score + TIE_BREAK * likeness.to(score.device, score.dtype)


MAX_SAMPLES = 16384
"""Samples per probe and batch kept for the statistics (a strided subset of positions beyond that)."""


def _units_last(activation: Tensor, axis: int, max_samples: int | None = MAX_SAMPLES) -> Tensor:
    """(…, C, …) → (samples, C), keeping every s-th position along the spatial axes when there are too many.

    Positions are chosen by the tensor's shape alone, so two models' activations of the same probe are
    subsampled at the same positions.
    """
    spatial = [dim for dim in range(2, activation.dim()) if dim != axis] if axis == 1 else []
    if max_samples is not None and spatial:
        samples = activation.numel() // activation.shape[axis]
        if samples > max_samples:
            stride = math.ceil((samples / max_samples) ** (1 / len(spatial)))
            index = [slice(None)] * activation.dim()
            for dim in spatial:
                index[dim] = slice(None, None, stride)
            activation = activation[tuple(index)]
    return activation.movedim(axis, -1).reshape(-1, activation.shape[axis])


class ProbedModel:
    """Runs a model (or any weights of its architecture) and reports the spec's probe activations."""

    def __init__(self, spec: PermutationSpec, model: nn.Module) -> None:
        self.spec = spec
        self.model = model
        self.names = {name for names in spec.probes.values() for name in names}
        if spec.probe_kind == "node":
            graph = copy.deepcopy(spec.graph)
            for node in list(graph.nodes):
                if node.name in self.names:
                    with graph.inserting_after(node):
                        graph.call_function(record_probe, (node, node.name))
            self.runner: nn.Module = fx.GraphModule(model, graph)
        else:
            self.runner = model
        self.keys = set(self.runner.state_dict())

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        if self.spec.probe_kind == "node":
            yield
            return
        modules = dict(self.model.named_modules())
        missing = sorted(self.names - set(modules))
        if missing:
            raise ValueError(f"The spec's probes name modules the model does not have: {missing}.")
        handles = [
            modules[name].register_forward_hook(lambda _m, _i, output, name=name: record_probe(output, name))
            for name in self.names
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def run(
        self, inputs: Any, sink: Callable[[str, Tensor], None], state: Mapping[str, Tensor] | None = None
    ) -> None:
        """Forward ``inputs`` (with ``state``'s weights if given), calling ``sink(probe, activation)``."""
        seen: set[str] = set()

        def once(name: str, value: Tensor) -> None:
            if name in seen:
                raise ValueError(
                    f"Probe {name!r} produced two activations in one forward pass (a module used twice), so "
                    "they cannot be paired; probe a module that runs once per forward."
                )
            seen.add(name)
            sink(name, value)

        with _sink(once), self._hooks():
            if state is None:
                self.runner(inputs)
            else:
                weights = {key: value for key, value in state.items() if key in self.keys}
                functional_call(self.runner, weights, (inputs,), strict=False)


def _accumulate(
    own: Mapping[str, Tensor],
    statistics: Mapping[str, CrossStatistics],
    group_of: Mapping[str, str],
    axes: Mapping[str, int],
    name: str,
    value: Tensor,
) -> None:
    with torch.autocast(value.device.type, enabled=False):  # statistics in float32, even under autocast
        statistics[group_of[name]].update(own[name], _units_last(value, axes.get(name, 1)).float())


def match_activations(
    spec: PermutationSpec,
    reference: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    inputs: Iterable[Any],
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    *,
    identity_bias: float = 0.0,
) -> list[dict[str, Tensor]]:
    """For each of ``states``, the permutations that express it in ``reference``'s basis.

    Args:
        spec: the architecture's spec (with probes).
        reference: the model whose basis the results are in; it runs on ``inputs`` once.
        states: other models' ``state_dict``s (same architecture).
        inputs: model inputs (already on the reference's device), e.g. ``merge.model_inputs(loader, 10)``.
        forward_context: wraps the forward passes (e.g. Lightning's autocast context).
        identity_bias: λ added to every unit's correlation with its own index (see
            :func:`~lightning_dimat.permutation.assignment.solve_assignment`): 0 is DIMAT's matching, a
            large λ keeps units in place.
    """
    if not spec.probes:
        raise ValueError(
            f"The spec has no probes ({len(spec.group_sizes)} permutable groups): activation matching needs "
            "them. A channel space that forward returns (e.g. `return logits, hidden`) is pinned and cannot "
            "be permuted: return only the outputs from forward, pass spec=... with probes, or use "
            "method='weight' or 'average'."
        )
    unprobed = sorted(set(spec.group_sizes) - set(spec.probes))
    if unprobed:
        raise ValueError(f"Groups {unprobed} have no probe: add probes for them to the spec.")
    probed = ProbedModel(spec, reference)
    group_of = {name: group for group, names in spec.probes.items() for name in names}
    device = next(iter(reference.parameters())).device
    own_moments = {group: Moments(size, device) for group, size in spec.group_sizes.items()}
    statistics = [
        {group: CrossStatistics(size, device) for group, size in spec.group_sizes.items()} for _ in states
    ]
    was_training = reference.training
    reference.eval()
    try:
        with torch.no_grad(), forward_context():
            for batch in inputs:
                raw: dict[str, Tensor] = {}
                probed.run(batch, raw.__setitem__)
                # Each reference activation is reshaped, and its moments taken, once for all neighbours.
                own: dict[str, Tensor] = {}
                with torch.autocast(device.type, enabled=False):
                    for name, value in raw.items():
                        moments = own_moments[group_of[name]]
                        own[name] = moments.centre(_units_last(value, spec.probe_axes.get(name, 1)).float())
                        moments.update(own[name])
                del raw
                for index, state in enumerate(states):
                    accumulate = functools.partial(
                        _accumulate, own, statistics[index], group_of, spec.probe_axes
                    )
                    probed.run(batch, accumulate, state)
    finally:
        reference.train(was_training)
    if all(moments.count == 0 for moments in own_moments.values()):
        raise ValueError("Activation matching got no data: `inputs` is empty.")
    # Every (model, group) assignment is independent: solved side by side (see solve_assignments).
    keys = [(index, group) for index, per_model in enumerate(statistics) for group in per_model]
    own_signatures = _unit_signatures(spec, reference.state_dict())
    signatures = [_unit_signatures(spec, state) for state in states]
    scores = [
        _with_tie_break(
            statistics[index][group].correlation(own_moments[group]),
            own_signatures[group],
            signatures[index][group],
        )
        for index, group in keys
    ]
    found: list[dict[str, Tensor]] = [{} for _ in states]
    for (index, group), permutation in zip(
        keys, solve_assignments(scores, identity_bias=identity_bias), strict=True
    ):
        found[index][group] = permutation
    return found
