"""The state of one spec trace, and the helpers that op rules use to read and extend it.

A rule (see :mod:`lightning_dimat.permutation.rules`) receives the :class:`TraceContext` and the
``torch.fx`` node it handles. It reads its inputs' channel layouts (:meth:`TraceContext.tracked`,
:meth:`TraceContext.input_layout`), records which state entries the node's parameters permute
(:meth:`TraceContext.record`) and returns the output's :class:`Tracked` layout (``None``: nothing
permuted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from lightning_dimat.permutation.groups import Groups, UnsupportedModelError, unify_layouts
from lightning_dimat.permutation.spec import Layout, Segment

FALLBACK = (
    "Write the spec by hand instead: PermutationSpec.from_groups(model, {group: [(state key, axis), ...]}, "
    "probes={group: [module name, ...]}) and pass it as spec=..."
)

# Where a group's activations are observed for activation matching, in order of preference: residual sums
# (the stream itself), then normalisation outputs, then layer outputs, then nonlinearity outputs.
# Pre-activations come first: copies of one model trained apart stay aligned unit for unit there, while after
# a ReLU sparse units re-match spuriously (docs/permutation.md, "Where activations are observed").
JOIN, NORM, LAYER, NONLINEAR = "join", "norm", "layer", "nonlinear"
PROBE_PREFERENCE = (JOIN, NORM, LAYER, NONLINEAR)

# Named probe placements: (order of preference of the observation kinds, which of the chosen kind's nodes).
# "pre_activation": every residual sum of a stream, else the normalisation output (the default);
# "post_activation": every nonlinearity output (a residual stream at each block's output);
# "stage_output": the last nonlinearity output of each group only (one probe per ResNet stage).
PROBE_PLACEMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "pre_activation": (PROBE_PREFERENCE, "all"),
    "post_activation": ((NONLINEAR, JOIN, NORM, LAYER), "all"),
    "stage_output": ((NONLINEAR, JOIN, NORM, LAYER), "last"),
}
DEFAULT_PROBES = "pre_activation"
"""The placement used unless a matcher names another (``ActivationMatcher(probes=...)``)."""


@dataclass
class Tracked:
    """A tensor's channel axis (index into its shape) and that axis' layout (raw group ids)."""

    axis: int
    layout: Layout


def target_name(target: Any) -> str:
    """A graph node target's readable name (a method name, or a function's ``__name__``)."""
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


class TraceContext:
    """What the trace of ``model`` knows so far: layouts per node, state entry layouts and groups."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule) -> None:
        self.model = model
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.groups = Groups()
        self.values: dict[fx.Node, Tracked | None] = {}
        self.records: dict[str, list[Layout | None]] = {}
        self.module_groups: dict[str, str] = {}
        self.observations: list[tuple[str, str, str]] = []  # (node name, raw group, kind)
        self.observed_axes: dict[str, int] = {}
        self.state = dict(model.state_dict())

    def fail(self, node: fx.Node, problem: str) -> UnsupportedModelError:
        """The error to raise for ``node`` (names the node and its module or function)."""
        owner = ""
        if node.op == "call_module":
            owner = f" (module {node.target!r}, {type(self.modules[node.target]).__name__})"
        elif hasattr(node.target, "autograd_function"):
            owner = f" (custom autograd function {node.target.autograd_function.__qualname__}.apply)"
            problem = "a custom torch.autograd.Function can do anything to the channels"
        elif node.op in ("call_function", "call_method"):
            owner = f" ({node.op} {target_name(node.target)})"
        return UnsupportedModelError(
            f"Cannot derive a permutation spec at node {node.name!r}{owner}: {problem}. {FALLBACK}"
        )

    def module(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.modules[node.target]

    def shape(self, node: Any) -> tuple[int, ...] | None:
        """The shape ``node`` had on the example input (``None``: not a tensor)."""
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tracked(self, value: Any) -> Tracked | None:
        """The layout of a node argument (``None``: a constant, or nothing permuted)."""
        return self.values.get(value) if isinstance(value, fx.Node) else None

    def untracked_layout(self, size: int) -> Layout:
        """The layout of ``size`` channels that are never permuted."""
        return (Segment(None, size),)

    def input_layout(self, node: fx.Node, source: Any, axis: int) -> Layout:
        """The layout of ``source``'s ``axis`` (untracked input → not permuted)."""
        shape = self.shape(source) if isinstance(source, fx.Node) else None
        info = self.tracked(source)
        if info is None:
            if shape is None:
                raise self.fail(node, "its input has no known shape")
            return self.untracked_layout(shape[axis])
        ndim = len(shape) if shape is not None else None
        wanted = axis % ndim if ndim else axis
        if info.axis != wanted:
            if all(segment.group is None for segment in info.layout):
                return self.untracked_layout(shape[wanted])
            raise self.fail(
                node, f"it consumes axis {wanted} but the permuted channels are on axis {info.axis}"
            )
        return info.layout

    def unify(self, node: fx.Node, a: Layout, b: Layout) -> Layout:
        """The layout of an element-wise combination at ``node`` (ties the groups of ``a`` and ``b``)."""
        return unify_layouts(self.groups, a, b, f"node {node.name!r}")

    def record(self, node: fx.Node, key: str, axis: int, layout: Layout | None) -> None:
        """Notes that state entry ``key``'s ``axis`` is laid out as ``layout`` (ignored if not in state)."""
        if key not in self.state:
            return
        layouts = self.records.setdefault(key, [None] * self.state[key].dim())
        if layout is None:
            return
        if layouts[axis] is None:
            layouts[axis] = layout
        else:
            layouts[axis] = self.unify(node, layouts[axis], layout)

    def layer_group(self, node: fx.Node, name: str, size: int) -> str:
        """The group of a layer's output units (a layer called twice keeps one group)."""
        if name not in self.module_groups:
            self.module_groups[name] = self.groups.new(name, size)
        return self.module_groups[name]

    def observe(self, node: fx.Node, info: Tracked | None, kind: str) -> None:
        """Offers ``node`` as a probe of its group (``kind``: one of :data:`PROBE_PREFERENCE`)."""
        if info is not None and len(info.layout) == 1 and info.layout[0].block == 1 and info.layout[0].group:
            self.observations.append((node.name, info.layout[0].group, kind))
            if info.axis != 1:
                self.observed_axes[node.name] = info.axis
