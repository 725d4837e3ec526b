"""Deriving a :class:`PermutationSpec` automatically from a model's ``torch.fx`` graph.

Every tensor in the graph carries a *channel axis* with a layout (segments of permutation groups). Linear
and convolution layers create a group for their output units; element-wise operations, pooling, dropout
and normalisation pass layouts through; a residual ``add`` (or any element-wise op of two tracked
tensors) ties the groups of its operands into one (one permutation per residual stream); ``flatten``
turns a channel layout into blocks; ``cat`` concatenates layouts. The network's input is never permuted,
and groups reaching the output are pinned to the identity. Anything else stops with an error naming the
node, so that a wrong spec can never be produced silently.

Examples:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 2))
    >>> spec = permutation_spec(net, torch.randn(2, 3, 6, 6))
    >>> spec.group_sizes, spec.axes["4.weight"][1]
    ({'0': 8}, (Segment(group='0', size=8, block=16),))
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_dimat.permutation.spec import Layout, PermutationSpec, Segment

FALLBACK = (
    "Write the spec by hand instead: PermutationSpec.from_groups(model, {group: [(state key, axis), ...]}, "
    "probes={group: [module name, ...]}) and pass it as spec=..."
)


class UnsupportedModelError(ValueError):
    """The automatic spec cannot see through part of the model; the message names the node and module."""


@dataclass
class _Tracked:
    """A tensor's channel axis (index into its shape) and that axis' layout (raw group ids)."""

    axis: int
    layout: Layout


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
_BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCENORM_MODULES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.logsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.sigmoid, torch.nn.functional.tanh, torch.exp,
    torch.abs, torch.neg, torch.square, torch.sqrt, torch.clamp, torch.clip, operator.neg,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "abs", "neg", "square", "sqrt", "clamp", "clip", "contiguous", "float",
    "half", "bfloat16", "to", "type_as", "clone", "detach", "relu_", "sigmoid_", "clamp_", "clamp_min",
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.interpolate,
}  # fmt: skip
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
# Where a group's activations are observed for activation matching, in order of preference: residual sums
# (the stream itself), then normalisation outputs, then layer outputs, then nonlinearity outputs.
# Pre-activations come first because a ReLU unit that is dead on the data correlates with nothing.
_JOIN, _NORM, _LAYER, _NONLINEAR = "join", "norm", "layer", "nonlinear"
_PROBE_PREFERENCE = (_JOIN, _NORM, _LAYER, _NONLINEAR)


class _Groups:
    """Union-find over raw group ids, with sizes and a pinned (never permuted) flag."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.order: list[str] = []
        self.aliases: dict[str, Layout] = {}  # a group that turned out to be a concatenation of others

    def new(self, name: str, size: int) -> str:
        gid = name if name not in self.parent else f"{name}#{len(self.parent)}"
        self.parent[gid], self.size[gid] = gid, size
        self.order.append(gid)
        return gid

    def find(self, gid: str) -> str:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: str, b: str, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra in self.aliases or rb in self.aliases:
            raise UnsupportedModelError(f"{where}: ties a concatenation of channel groups to another group.")
        if self.size[ra] != self.size[rb]:
            raise UnsupportedModelError(f"{where}: ties {self.size[ra]} units to {self.size[rb]} units.")
        first, second = sorted((ra, rb), key=self.order.index)
        self.parent[second] = first
        if second in self.pinned:
            self.pinned.add(first)

    def pin(self, gid: str) -> None:
        root = self.find(gid)
        self.pinned.add(root)
        for segment in self.aliases.get(root, ()):
            if segment.group is not None:
                self.pin(segment.group)

    def make_alias(self, gid: str, layout: Layout) -> None:
        """Declares that group ``gid``'s units are the concatenation ``layout`` (a gate over a ``cat``)."""
        root = self.find(gid)
        if root in self.pinned:
            for segment in layout:
                if segment.group is not None:
                    self.pin(segment.group)
        self.aliases[root] = layout

    def expand(self, segment: Segment) -> list[Segment]:
        """``segment`` with aliases replaced by the segments they stand for (groups as roots)."""
        if segment.group is None:
            return [segment]
        root = self.find(segment.group)
        if root not in self.aliases:
            return [Segment(root, segment.size, segment.block)]
        return [
            part
            for inner in self.aliases[root]
            for part in self.expand(Segment(inner.group, inner.size, inner.block * segment.block))
        ]


def _unify_layouts(groups: _Groups, a: Layout, b: Layout, where: str) -> Layout:
    if [(s.size, s.block) for s in a] != [(s.size, s.block) for s in b]:
        for single, several in ((a, b), (b, a)):
            if (
                len(single) == 1
                and single[0].group is not None
                and single[0].block == 1
                and all(s.block == 1 for s in several)
                and sum(s.size for s in several) == single[0].size
            ):
                groups.make_alias(single[0].group, several)
                return several
        raise UnsupportedModelError(f"{where}: combines tensors whose channels are laid out differently.")
    merged = []
    for left, right in zip(a, b, strict=True):
        if left.group is None or right.group is None:
            if left.group is not None:
                groups.pin(left.group)
            if right.group is not None:
                groups.pin(right.group)
            merged.append(Segment(None, left.size, left.block))
            continue
        groups.union(left.group, right.group, where)
        merged.append(left)
    return tuple(merged)


class _SpecBuilder:
    def __init__(self, model: nn.Module, graph_module: fx.GraphModule) -> None:
        self.model = model
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.groups = _Groups()
        self.values: dict[fx.Node, _Tracked | None] = {}
        self.records: dict[str, list[Layout | None]] = {}
        self.module_groups: dict[str, str] = {}
        self.observations: list[tuple[str, str, str]] = []  # (node name, raw group, kind)
        self.observed_axes: dict[str, int] = {}
        self.state = dict(model.state_dict())

    # ------------------------------------------------------------------ helpers
    def fail(self, node: fx.Node, problem: str) -> UnsupportedModelError:
        owner = ""
        if node.op == "call_module":
            owner = f" (module {node.target!r}, {type(self.modules[node.target]).__name__})"
        elif hasattr(node.target, "autograd_function"):
            owner = f" (custom autograd function {node.target.autograd_function.__qualname__}.apply)"
            problem = "a custom torch.autograd.Function can do anything to the channels"
        elif node.op in ("call_function", "call_method"):
            owner = f" ({node.op} {_name(node.target)})"
        return UnsupportedModelError(
            f"Cannot derive a permutation spec at node {node.name!r}{owner}: {problem}. {FALLBACK}"
        )

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tracked(self, value: Any) -> _Tracked | None:
        return self.values.get(value) if isinstance(value, fx.Node) else None

    def untracked_layout(self, size: int) -> Layout:
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

    def record(self, node: fx.Node, key: str, axis: int, layout: Layout | None) -> None:
        if key not in self.state:
            return
        layouts = self.records.setdefault(key, [None] * self.state[key].dim())
        if layout is None:
            return
        if layouts[axis] is None:
            layouts[axis] = layout
        else:
            layouts[axis] = _unify_layouts(self.groups, layouts[axis], layout, f"node {node.name!r}")

    def layer_group(self, node: fx.Node, name: str, size: int) -> str:
        """The group of a layer's output units (a layer called twice keeps one group)."""
        if name not in self.module_groups:
            self.module_groups[name] = self.groups.new(name, size)
        return self.module_groups[name]

    def observe(self, node: fx.Node, info: _Tracked | None, kind: str) -> None:
        if info is not None and len(info.layout) == 1 and info.layout[0].block == 1 and info.layout[0].group:
            self.observations.append((node.name, info.layout[0].group, kind))
            if info.axis != 1:
                self.observed_axes[node.name] = info.axis

    # -------------------------------------------------------------------- nodes
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            handler = getattr(self, f"_{node.op}")
            self.values[node] = handler(node)

    def _placeholder(self, node: fx.Node) -> _Tracked | None:
        shape = self.shape(node)
        return None if shape is None or len(shape) < 2 else _Tracked(1, self.untracked_layout(shape[1]))

    def _get_attr(self, node: fx.Node) -> None:
        return None

    def _output(self, node: fx.Node) -> None:
        def pin(value: Any) -> None:
            info = self.tracked(value)
            for segment in info.layout if info is not None else ():
                if segment.group is not None:
                    self.groups.pin(segment.group)

        fx.node.map_arg(node.args, pin)
        return None

    def _call_module(self, node: fx.Node) -> _Tracked | None:
        module = self.modules[node.target]
        source = node.args[0] if node.args else None
        info = self.tracked(source)
        prefix = str(node.target)
        if isinstance(module, nn.Linear):
            layout_in = self.input_layout(node, source, -1)
            group = self.layer_group(node, prefix, module.out_features)
            self.record(node, f"{prefix}.weight", 0, (Segment(group, module.out_features),))
            self.record(node, f"{prefix}.weight", 1, layout_in)
            self.record(node, f"{prefix}.bias", 0, (Segment(group, module.out_features),))
            ndim = len(self.shape(node) or (0, 0))
            result = _Tracked(ndim - 1, (Segment(group, module.out_features),))
            self.observe(node, result, _LAYER)
            return result
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            result = self._conv(node, module, prefix, source)
            self.observe(node, result, _LAYER)
            return result
        if isinstance(module, _BATCHNORM_MODULES + _INSTANCENORM_MODULES):
            layout = self.input_layout(node, source, 1)
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.record(node, f"{prefix}.{name}", 0, layout)
            result = _Tracked(1, layout)
            self.observe(node, result, _NORM)
            return result
        if isinstance(module, nn.GroupNorm):
            layout = self.input_layout(node, source, 1)
            if module.num_groups not in (1, module.num_channels) and any(s.group for s in layout):
                raise self.fail(
                    node, f"GroupNorm with {module.num_groups} groups of channels is not permutable"
                )
            for name in ("weight", "bias"):
                self.record(node, f"{prefix}.{name}", 0, layout)
            result = _Tracked(1, layout)
            self.observe(node, result, _NORM)
            return result
        if isinstance(module, nn.LayerNorm):
            return self._layer_norm(node, module, prefix, info)
        if isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                self.record(node, f"{prefix}.weight", 0, self.input_layout(node, source, 1))
            self.observe(node, info, _NONLINEAR)
            return info
        if isinstance(module, _ELEMENTWISE_MODULES):
            if not isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
                self.observe(node, info, _NONLINEAR)
            return info
        if isinstance(module, _POOL_MODULES):
            if getattr(module, "return_indices", False):
                raise self.fail(node, "pooling with return_indices is not supported")
            return info
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return info
        if isinstance(module, nn.Flatten):
            return self._flatten(node, source, module.start_dim, module.end_dim)
        if info is None or all(segment.group is None for segment in info.layout):
            return None  # e.g. input preprocessing: nothing permuted goes in, nothing permuted comes out
        raise self.fail(node, f"no permutation rule for {type(module).__name__}")

    def _conv(self, node: fx.Node, module: nn.Module, prefix: str, source: Any) -> _Tracked:
        layout_in = self.input_layout(node, source, 1)
        if module.groups == 1:
            group = self.layer_group(node, prefix, module.out_channels)
            out_layout: Layout = (Segment(group, module.out_channels),)
            self.record(node, f"{prefix}.weight", 0, out_layout)
            self.record(node, f"{prefix}.weight", 1, layout_in)
        elif module.groups == module.in_channels == module.out_channels:
            out_layout = layout_in  # depthwise: output channel c is input channel c
            self.record(node, f"{prefix}.weight", 0, out_layout)
        else:
            raise self.fail(
                node, f"grouped convolution (groups={module.groups}) is not permutable by channel"
            )
        self.record(node, f"{prefix}.bias", 0, out_layout)
        return _Tracked(1, out_layout)

    def _layer_norm(
        self, node: fx.Node, module: nn.LayerNorm, prefix: str, info: _Tracked | None
    ) -> _Tracked | None:
        shape = self.shape(node)
        if info is None or shape is None:
            return info
        normalized = len(module.normalized_shape)
        first = len(shape) - normalized
        if info.axis >= first:
            for name in ("weight", "bias"):
                if f"{prefix}.{name}" in self.state:
                    layouts: list[Layout | None] = [None] * normalized
                    layouts[info.axis - first] = info.layout
                    for axis, layout in enumerate(layouts):
                        self.record(node, f"{prefix}.{name}", axis, layout)
        return info

    def _flatten(self, node: fx.Node, source: Any, start: int, end: int) -> _Tracked | None:
        info, shape = self.tracked(source), self.shape(source) if isinstance(source, fx.Node) else None
        if info is None or shape is None:
            return None
        start, end = start % len(shape), end % len(shape)
        if not start <= info.axis <= end:
            axis = info.axis if info.axis < start else info.axis - (end - start)
            return _Tracked(axis, info.layout)
        outer = math.prod(shape[start : info.axis])
        inner = math.prod(shape[info.axis + 1 : end + 1])
        layout = tuple(Segment(s.group, s.size, s.block * inner) for s in info.layout) * outer
        return _Tracked(start, layout)

    def _call_function(self, node: fx.Node) -> _Tracked | None:
        return self._call(node, node.target, node.args, node.kwargs, method=False)

    def _call_method(self, node: fx.Node) -> _Tracked | None:
        return self._call(node, node.target, node.args, node.kwargs, method=True)

    def _call(
        self, node: fx.Node, target: Any, args: Sequence[Any], kwargs: dict[str, Any], method: bool
    ) -> Any:
        first = args[0] if args else None
        info = self.tracked(first)
        if target is getattr or target in ("size", "dim") or (target == "shape"):
            return None
        if (method and target in _ELEMENTWISE_METHODS) or (not method and target in _ELEMENTWISE_FUNCTIONS):
            self.observe(node, info, _NONLINEAR)
            return info
        if not method and target in _POOL_FUNCTIONS:
            return info
        if (method and target in _BINARY_METHODS) or (not method and target in _BINARY_FUNCTIONS):
            return self._binary(node, args)
        if (not method and target in (torch.flatten,)) or (method and target == "flatten"):
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self._flatten(node, first, start, end)
        if (method and target in ("view", "reshape")) or (not method and target is torch.reshape):
            return self._reshape(node, first)
        if (not method and target in _REDUCTIONS) or (method and target in _REDUCTION_METHODS):
            return self._reduce(node, first, args, kwargs)
        if not method and target in (torch.cat, torch.concat):
            return self._cat(node, args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0))
        if (not method and target in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)) or (
            method and target in ("softmax", "log_softmax")
        ):
            return info
        if not method and target is operator.getitem:
            return self._getitem(node, first, args[1])
        if not method and target is F.pad:
            return self._pad(node, first, args[1] if len(args) > 1 else kwargs["pad"])
        if info is None and not any(
            isinstance(self.tracked(a), _Tracked) for a in fx.node.map_aggregate(args, _leaves)
        ):
            return None  # arithmetic on shapes, constants, ...
        raise self.fail(node, "no permutation rule for this operation")

    def _binary(self, node: fx.Node, args: Sequence[Any]) -> _Tracked | None:
        left, right = self.tracked(args[0]), self.tracked(args[1]) if len(args) > 1 else None
        if left is not None and right is not None:
            shape_l, shape_r, shape_o = self.shape(args[0]), self.shape(args[1]), self.shape(node)
            if shape_l == shape_r or shape_o is None:
                layout = _unify_layouts(self.groups, left.layout, right.layout, f"node {node.name!r}")
                result = _Tracked(left.axis, layout)
            else:
                result = self._broadcast(node, (left, right), (shape_l, shape_r), shape_o)
            self.observe(node, result, _JOIN)
            return result
        tracked_arg, other = (
            (args[0], args[1]) if left is not None else (args[1] if len(args) > 1 else None, args[0])
        )
        info = left or right
        if info is None:
            return None
        self._attach_constant(node, tracked_arg, info, other)
        return info

    def _broadcast(
        self,
        node: fx.Node,
        infos: tuple[_Tracked, _Tracked],
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        shape_out: tuple[int, ...],
    ) -> _Tracked:
        """Element-wise op of two tracked tensors of different shapes (x * gate, gate N×C×1×1)."""
        (left, right), (shape_l, shape_r) = infos, shapes
        axis_l = left.axis + len(shape_out) - len(shape_l)
        axis_r = right.axis + len(shape_out) - len(shape_r)
        if axis_l == axis_r and shape_l[left.axis] == shape_r[right.axis]:
            return _Tracked(
                axis_l, _unify_layouts(self.groups, left.layout, right.layout, f"node {node.name!r}")
            )
        for mine, other, axis in ((left, right, axis_l), (right, left, axis_r)):
            if all(segment.group is None for segment in other.layout):
                return _Tracked(axis, mine.layout)
        raise self.fail(node, "broadcasts tensors whose permuted channels do not line up")

    def _attach_constant(self, node: fx.Node, tracked_arg: Any, info: _Tracked, other: Any) -> None:
        """A parameter/buffer combined element-wise with a tracked tensor shares its channel permutation."""
        if not isinstance(other, fx.Node) or other.op != "get_attr":
            if (
                isinstance(other, fx.Node)
                and self.shape(other) not in (None, ())
                and self.tracked(other) is None
            ):
                shape = self.shape(other)
                if shape is not None and math.prod(shape) > 1 and any(s.group for s in info.layout):
                    raise self.fail(node, "combines permuted channels with an untracked tensor")
            return
        key = str(other.target)
        shape, out_shape = self.shape(other), self.shape(node)
        if key not in self.state or shape is None or out_shape is None:
            return
        axis = info.axis - (len(out_shape) - len(shape))
        if 0 <= axis < len(shape) and shape[axis] > 1:
            self.record(node, key, axis, info.layout)

    def _reshape(self, node: fx.Node, source: Any) -> _Tracked | None:
        info, shape_in, shape_out = self.tracked(source), self.shape(source), self.shape(node)
        if info is None or shape_in is None or shape_out is None or shape_in == shape_out:
            return info
        if len(shape_out) == 2 and shape_out[0] == shape_in[0] and info.axis >= 1:
            return self._flatten(node, source, 1, -1)
        if all(segment.group is None for segment in info.layout):
            return None
        raise self.fail(node, f"reshapes permuted channels from {shape_in} to {shape_out}")

    def _reduce(
        self, node: fx.Node, source: Any, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> _Tracked | None:
        info, shape = self.tracked(source), self.shape(source)
        if info is None or shape is None:
            return None
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if dims is None:
            return None
        dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if info.axis in dims:
            return None  # reducing over the channels is permutation invariant
        axis = info.axis if keepdim else info.axis - sum(d < info.axis for d in dims)
        return _Tracked(axis, info.layout)

    def _cat(self, node: fx.Node, tensors: Sequence[Any], dim: int) -> _Tracked | None:
        infos = [self.tracked(t) for t in tensors]
        shapes = [self.shape(t) for t in tensors]
        if all(info is None for info in infos):
            return None
        if any(info is None or shape is None for info, shape in zip(infos, shapes, strict=True)):
            raise self.fail(node, "concatenates permuted channels with an untracked tensor")
        dim = dim % len(shapes[0])
        if all(info.axis == dim for info in infos):
            return _Tracked(dim, tuple(segment for info in infos for segment in info.layout))
        layout = infos[0].layout
        for info in infos[1:]:
            layout = _unify_layouts(self.groups, layout, info.layout, f"node {node.name!r}")
        return _Tracked(infos[0].axis, layout)

    def _getitem(self, node: fx.Node, source: Any, index: Any) -> _Tracked | None:
        info = self.tracked(source)
        if info is None:
            return None
        entries = index if isinstance(index, tuple) else (index,)
        if any(entry is None or entry is Ellipsis for entry in entries[: info.axis + 1]):
            raise self.fail(node, "indexing with None/Ellipsis before the channel axis is not supported")
        if info.axis < len(entries) and entries[info.axis] != slice(None):
            raise self.fail(node, "indexes or slices along the permuted channel axis")
        removed = sum(isinstance(entry, int) for entry in entries[: info.axis])
        return _Tracked(info.axis - removed, info.layout)

    def _pad(self, node: fx.Node, source: Any, pad: Sequence[int]) -> _Tracked | None:
        """``F.pad`` pads the last ``len(pad) // 2`` dims; padding the channel axis is not permutable."""
        info, shape = self.tracked(source), self.shape(source)
        if info is None or shape is None:
            return info
        position = len(shape) - 1 - info.axis  # the channel axis' index counted from the last dim
        if 2 * position + 1 < len(pad) and (pad[2 * position] or pad[2 * position + 1]):
            raise self.fail(node, "pads along the permuted channel axis")
        return info

    # ------------------------------------------------------------------- result
    def spec(self) -> PermutationSpec:
        groups = self.groups
        roots = [
            g
            for g in groups.order
            if groups.find(g) == g and g not in groups.pinned and g not in groups.aliases
        ]
        names = {root: root for root in roots}

        def resolve(layout: Layout | None) -> Layout | None:
            if layout is None:
                return None
            expanded = [part for segment in layout for part in groups.expand(segment)]
            resolved = tuple(
                Segment(names.get(s.group) if s.group else None, s.size, s.block) for s in expanded
            )
            return None if all(segment.group is None for segment in resolved) else resolved

        axes = {}
        for key, layouts in self.records.items():
            resolved = tuple(resolve(layout) for layout in layouts)
            if any(layout is not None for layout in resolved):
                axes[key] = resolved
        sizes = {names[root]: self.groups.size[root] for root in roots}
        used = {segment.group for layouts in axes.values() for layout in layouts for segment in layout or ()}
        sizes = {group: size for group, size in sizes.items() if group in used}
        probes = self._probes(names, sizes)
        chosen = {name for names_ in probes.values() for name in names_}
        probe_axes = {name: axis for name, axis in self.observed_axes.items() if name in chosen}
        return PermutationSpec(
            sizes, axes, probes, probe_kind="node", probe_axes=probe_axes, graph=self.gm.graph
        )

    def _probes(self, names: dict[str, str], sizes: dict[str, int]) -> dict[str, tuple[str, ...]]:
        candidates: dict[str, list[tuple[str, str]]] = {}
        for node_name, raw, kind in self.observations:
            root = self.groups.find(raw)
            if root in names and names[root] in sizes:
                candidates.setdefault(names[root], []).append((node_name, kind))
        probes = {}
        for group, found in candidates.items():
            for kind in _PROBE_PREFERENCE:
                chosen = [name for name, k in found if k == kind]
                if chosen:
                    probes[group] = tuple(chosen)
                    break
        return probes


def _leaves(value: Any) -> Any:
    return value


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _autograd_call(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """A graph target standing for ``function.apply`` (it runs it; the spec builder refuses it)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return function.apply(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{function.__qualname__}_apply"
    call.autograd_function = function  # type: ignore[attr-defined]
    return call


class _Tracer(fx.Tracer):
    """fx's tracer, except that custom ``torch.autograd.Function.apply`` calls become visible nodes.

    (Plain fx runs the function's ``forward`` on proxies and records what it does, silently dropping
    the custom backward; whatever it does to channels must not be guessed.)
    """

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        original = torch.autograd.Function.__dict__["apply"]
        tracer = self

        def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
            if any(isinstance(value, fx.Proxy) for value in (*args, *kwargs.values())):
                return tracer.create_proxy("call_function", _autograd_call(cls), args, kwargs)
            return original.__get__(None, cls)(*args, **kwargs)

        torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.autograd.Function.apply = original  # type: ignore[method-assign]


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` tracing with an error that says what to do when the model cannot be traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many kinds: TraceError, TypeError, NotImplementedError, ...
        raise UnsupportedModelError(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}). {FALLBACK}"
        ) from error
    return fx.GraphModule(model, graph, type(model).__name__)


def permutation_spec(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> PermutationSpec:
    """Derives ``model``'s :class:`PermutationSpec` by tracing it with ``torch.fx`` on ``example_input``.

    ``example_input`` fixes the shapes (e.g. the spatial size a ``flatten`` sees); one or two samples are
    enough. The model is run once in eval mode without gradients (BatchNorm statistics are untouched).

    Raises:
        UnsupportedModelError: for an untraceable model or an operation without a permutation rule (the
            message names the node and module and points to the hand-written fallback).
    """
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    was_training = model.training
    try:
        # Eval mode while tracing too: F.dropout(x, training=self.training) is frozen into the graph.
        model.eval()
        graph_module = trace(model)
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*inputs)
    except UnsupportedModelError:
        raise
    except Exception as error:
        raise UnsupportedModelError(
            f"Running {type(model).__name__} on the example input of shape "
            f"{tuple(getattr(inputs[0], 'shape', ()))} failed ({type(error).__name__}: {error}); "
            "pass an input the model accepts."
        ) from error
    finally:
        model.train(was_training)
    builder = _SpecBuilder(model, graph_module)
    builder.run()
    return builder.spec()


SpecFactory = Callable[[nn.Module, Tensor], PermutationSpec]
