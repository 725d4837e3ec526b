"""``PermutationSpec``: which axes of which state entries share one hidden permutation (data, not code).

A hidden unit permutation P_g of a *group* g acts on every axis listed for g: the output axis of the layer
that creates the units, the matching input axis of every consumer, and BatchNorm's per-channel vectors.
An axis is a concatenation of :class:`Segment` s (one for a plain layer, several after a ``cat``); a segment
with ``block > 1`` is the input of a linear layer after a ``flatten`` of C×H×W features, where each unit
owns ``block`` consecutive entries.

Examples:
    >>> import torch.nn as nn
    >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> spec = PermutationSpec.from_groups(mlp, {"hidden": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]})
    >>> spec.group_sizes
    {'hidden': 8}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class Segment:
    """A stretch of an axis: ``size`` units of ``group`` (``None``: not permuted), ``block`` entries each."""

    group: str | None
    size: int
    block: int = 1

    @property
    def length(self) -> int:
        return self.size * self.block


Layout = tuple[Segment, ...]


@dataclass
class PermutationSpec:
    """The permutation symmetries of one architecture.

    Args:
        group_sizes: ``{group: number of units}``.
        axes: ``{state key: per-axis layout}``; ``None`` for an axis that no permutation touches. Keys
            missing from ``axes`` are never permuted.
        probes: ``{group: names}`` where the group's activations are observed for activation matching:
            node names of the model's ``torch.fx`` graph when ``probe_kind="node"``, module names (their
            forward outputs) when ``probe_kind="module"``.
        probe_kind: ``"node"`` or ``"module"``.
        probe_axes: ``{probe name: channel axis}`` for probes whose units are not on axis 1 (e.g. the last
            axis of a sequence model's linear layers).
    """

    group_sizes: dict[str, int]
    axes: dict[str, tuple[Layout | None, ...]]
    probes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    probe_kind: str = "node"
    probe_axes: dict[str, int] = field(default_factory=dict)
    graph: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, layouts in self.axes.items():
            for layout in layouts:
                for segment in layout or ():
                    if segment.group is not None and segment.group not in self.group_sizes:
                        raise ValueError(f"{key!r} refers to unknown group {segment.group!r}.")
                    if segment.group is not None and segment.size != self.group_sizes[segment.group]:
                        raise ValueError(
                            f"{key!r} gives group {segment.group!r} {segment.size} units, "
                            f"but the group has {self.group_sizes[segment.group]}."
                        )
        if self.probe_kind not in ("node", "module"):
            raise ValueError(f"probe_kind must be 'node' or 'module', got {self.probe_kind!r}.")

    @property
    def groups(self) -> list[str]:
        return list(self.group_sizes)

    def members(self, group: str) -> Iterator[tuple[str, int, int, Segment]]:
        """``(key, axis, offset, segment)`` for every segment of ``group`` (offset: where it starts)."""
        for key, layouts in self.axes.items():
            for axis, layout in enumerate(layouts):
                offset = 0
                for segment in layout or ():
                    if segment.group == group:
                        yield key, axis, offset, segment
                    offset += segment.length

    def check_shapes(self, state: Mapping[str, Tensor]) -> None:
        """Raises a ``ValueError`` if ``state`` does not have the shapes this spec describes."""
        for key, layouts in self.axes.items():
            if key not in state:
                raise ValueError(f"The spec permutes {key!r}, which the state does not have.")
            shape = tuple(state[key].shape)
            if len(layouts) != len(shape):
                raise ValueError(f"The spec gives {key!r} {len(layouts)} axes; it has shape {shape}.")
            for axis, layout in enumerate(layouts):
                if layout is not None and sum(s.length for s in layout) != shape[axis]:
                    raise ValueError(
                        f"The spec's layout of {key!r} axis {axis} does not cover its {shape[axis]} entries."
                    )

    @classmethod
    def from_groups(
        cls,
        model: nn.Module,
        groups: Mapping[str, Sequence[tuple[str, int] | tuple[str, int, int]]],
        probes: Mapping[str, Sequence[str]] | None = None,
    ) -> PermutationSpec:
        """A hand-written spec: ``{group: [(state key, axis) or (state key, axis, block), ...]}``.

        ``probes`` names, per group, modules whose outputs carry the group's units (for activation
        matching); without it only weight matching can use the spec.
        """
        state = model.state_dict()
        sizes: dict[str, int] = {}
        axes: dict[str, list[Layout | None]] = {}
        for group, members in groups.items():
            for member in members:
                key, axis, block = (*member, 1) if len(member) == 2 else member  # type: ignore[misc]
                if key not in state:
                    raise ValueError(
                        f"Group {group!r} names {key!r}, which is not in the model's state_dict."
                    )
                length = state[key].shape[axis]
                if length % block:
                    raise ValueError(
                        f"{key!r} axis {axis} has {length} entries, not a multiple of block {block}."
                    )
                size = length // block
                if sizes.setdefault(group, size) != size:
                    raise ValueError(
                        f"Group {group!r} has {sizes[group]} units but {key!r} axis {axis} has {size}."
                    )
                layouts = axes.setdefault(key, [None] * state[key].dim())
                if layouts[axis] is not None:
                    raise ValueError(f"{key!r} axis {axis} is listed in two groups.")
                layouts[axis] = (Segment(group, size, block),)
        return cls(
            sizes,
            {key: tuple(layouts) for key, layouts in axes.items()},
            {group: tuple(names) for group, names in (probes or {}).items()},
            probe_kind="module",
        )
