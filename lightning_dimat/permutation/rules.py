"""The per-op rule table of the spec tracer: how each module, function and method moves channel layouts.

A rule is a function ``rule(ctx, node) -> Tracked | None`` (see
:class:`~lightning_dimat.permutation.context.TraceContext`): it reads the layouts of ``node``'s inputs,
records the layouts of the parameters the node uses, and returns the layout of its output (``None``:
nothing permuted). Rules are looked up by the node's kind: a module's class (its closest registered base
class), a function (``torch.add``, ``operator.add``, ``F.relu``) or a method name (``"view"``).

:func:`register_op_rule` adds rules. A module class registered by a user is also kept whole while tracing
(``torch.fx`` does not look into its ``forward``), so a module that cannot be traced — a fused kernel, a
custom ``torch.autograd.Function`` — becomes usable once its rule says what it does to the channels.

Examples:
    >>> import torch, torch.nn as nn
    >>> from lightning_dimat.permutation import permutation_spec, register_op_rule
    >>> class Swish(nn.Module):
    ...     def forward(self, x):
    ...         return x * torch.sigmoid(x)
    >>> @register_op_rule(Swish)
    ... def swish_rule(ctx, node):
    ...     return ctx.tracked(node.args[0])  # element-wise: the channels pass through unchanged
    >>> net = nn.Sequential(nn.Linear(4, 8), Swish(), nn.Linear(8, 2))
    >>> spec = permutation_spec(net, torch.randn(2, 4))
    >>> [node.target for node in spec.graph.nodes if node.op == "call_module"]
    ['0', '1', '2']
    >>> spec.axes["2.weight"]
    (None, (Segment(group='0', size=8, block=1),))
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_dimat.permutation.context import JOIN, LAYER, NONLINEAR, NORM, TraceContext, Tracked
from lightning_dimat.permutation.spec import Layout, Segment

Rule: TypeAlias = Callable[[TraceContext, fx.Node], Tracked | None]
OpKind: TypeAlias = type[nn.Module] | Callable[..., Any] | str

_MODULE_RULES: dict[type[nn.Module], Rule] = {}
_FUNCTION_RULES: dict[Callable[..., Any], Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


def _table_for(kind: OpKind) -> dict[Any, Rule]:
    """The table that holds rules for ``kind``; raises a ``TypeError`` for something that is no op kind."""
    if isinstance(kind, str):
        return _METHOD_RULES
    if isinstance(kind, type) and issubclass(kind, nn.Module):
        return _MODULE_RULES
    if isinstance(kind, nn.Module):
        raise TypeError(f"Register a rule for the module's class, {type(kind).__name__}, not an instance.")
    if callable(kind):
        try:
            hash(kind)
        except TypeError:
            raise TypeError(f"Functions with rules must be hashable; {kind!r} is not.") from None
        return _FUNCTION_RULES
    raise TypeError(
        f"An op kind is a module class, a function or a method name; got {type(kind).__name__} {kind!r}."
    )


def register_op_rule(*kinds: OpKind, override: bool = False) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule(ctx, node) -> Tracked | None`` for the given op kinds.

    The rule reads its inputs' layouts with ``ctx.tracked(node.args[0])`` or ``ctx.input_layout(...)``,
    notes its parameters' layouts with ``ctx.record(...)`` and returns its output's :class:`Tracked`
    layout (see :class:`~lightning_dimat.permutation.context.TraceContext`). The built-in rules
    :func:`elementwise` and :func:`pass_through` can be reused: ``register_op_rule(MyAct)(elementwise)``.

    Args:
        kinds: module classes (a registered class is kept whole while tracing; ``torch.nn`` subclasses
            of it share its rule), functions (``torch.add``, ``operator.add``, ``F.relu``) or method
            names (``"view"``, ``"flatten"``).
        override: replace a rule already registered for one of ``kinds`` (else a ``ValueError``).

    Raises:
        TypeError: for something that is not an op kind (a module instance, say).
    """
    if not kinds:
        raise TypeError("register_op_rule needs at least one module class, function or method name.")
    tables = [(_table_for(kind), kind) for kind in kinds]

    def decorator(rule: Rule) -> Rule:
        taken = [kind for table, kind in tables if kind in table]
        if taken and not override:
            raise ValueError(
                f"A permutation rule for {_kind_name(taken[0])} is already registered; "
                "pass override=True to replace it."
            )
        for table, kind in tables:
            table[kind] = rule
        return rule

    return decorator


def _kind_name(kind: OpKind) -> str:
    return repr(kind) if isinstance(kind, str) else getattr(kind, "__qualname__", repr(kind))


def module_rule(cls: type[nn.Module]) -> Rule | None:
    """The rule of the closest registered class in ``cls``'s method resolution order, if any."""
    for base in cls.__mro__:
        if base in _MODULE_RULES:
            return _MODULE_RULES[base]
    return None


def function_rule(target: Any) -> Rule | None:
    """The rule of a ``call_function`` target, if any."""
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # an unhashable target has no rule
        return None


def method_rule(name: str) -> Rule | None:
    """The rule of a ``call_method`` target (a method name), if any."""
    return _METHOD_RULES.get(name)


def is_registered_module(cls: type[nn.Module]) -> bool:
    """Whether ``cls`` itself has a rule (such modules are leaves of the trace)."""
    return cls in _MODULE_RULES


# ------------------------------------------------------------------------------------- shared helpers


def _first(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


def _argument(node: fx.Node, position: int, name: str, default: Any) -> Any:
    """Argument ``position`` of ``node`` (counting ``self`` for methods), else keyword ``name``."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def flatten_layout(ctx: TraceContext, node: fx.Node, source: Any, start: int, end: int) -> Tracked | None:
    """The layout after flattening dims ``start..end`` of ``source`` (channels become blocks)."""
    info, shape = ctx.tracked(source), ctx.shape(source) if isinstance(source, fx.Node) else None
    if info is None or shape is None:
        return None
    start, end = start % len(shape), end % len(shape)
    if not start <= info.axis <= end:
        axis = info.axis if info.axis < start else info.axis - (end - start)
        return Tracked(axis, info.layout)
    outer = math.prod(shape[start : info.axis])
    inner = math.prod(shape[info.axis + 1 : end + 1])
    layout = tuple(Segment(s.group, s.size, s.block * inner) for s in info.layout) * outer
    return Tracked(start, layout)


# ------------------------------------------------------------------------------ element-wise & friends


@register_op_rule(
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.logsigmoid, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, torch.exp, torch.abs,
    torch.neg, torch.square, torch.sqrt, torch.clamp, torch.clip, operator.neg,
    "relu", "sigmoid", "tanh", "exp", "abs", "neg", "square", "sqrt", "clamp", "clip", "contiguous", "float",
    "half", "bfloat16", "to", "type_as", "clone", "detach", "relu_", "sigmoid_", "clamp_", "clamp_min",
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.AlphaDropout, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip
def elementwise(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """Element-wise ops (activations): the layout passes through; the output may serve as a probe."""
    info = ctx.tracked(_first(node))
    ctx.observe(node, info, NONLINEAR)
    return info


@register_op_rule(
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.interpolate,
    nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
    "softmax", "log_softmax",
)  # fmt: skip
def pass_through(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """Ops that keep every channel where it is (identity, dropout, pooling, softmax): layout unchanged."""
    return ctx.tracked(_first(node))


@register_op_rule(getattr, "size", "dim", "shape")
def untracked(ctx: TraceContext, node: fx.Node) -> None:
    """Ops whose result carries no channels (shapes, attributes)."""
    return None


@register_op_rule(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
def _pool_module(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    if getattr(ctx.module(node), "return_indices", False):
        raise ctx.fail(node, "pooling with return_indices is not supported")
    return ctx.tracked(_first(node))


# ------------------------------------------------------------------------------------------- layers


@register_op_rule(nn.Linear)
def _linear(ctx: TraceContext, node: fx.Node) -> Tracked:
    module, prefix = ctx.module(node), str(node.target)
    layout_in = ctx.input_layout(node, _first(node), -1)
    group = ctx.layer_group(node, prefix, module.out_features)
    ctx.record(node, f"{prefix}.weight", 0, (Segment(group, module.out_features),))
    ctx.record(node, f"{prefix}.weight", 1, layout_in)
    ctx.record(node, f"{prefix}.bias", 0, (Segment(group, module.out_features),))
    ndim = len(ctx.shape(node) or (0, 0))
    result = Tracked(ndim - 1, (Segment(group, module.out_features),))
    ctx.observe(node, result, LAYER)
    return result


@register_op_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(ctx: TraceContext, node: fx.Node) -> Tracked:
    """A new group for the output channels; a depthwise convolution keeps its input's layout."""
    module, prefix = ctx.module(node), str(node.target)
    layout_in = ctx.input_layout(node, _first(node), 1)
    if module.groups == 1:
        group = ctx.layer_group(node, prefix, module.out_channels)
        out_layout: Layout = (Segment(group, module.out_channels),)
        ctx.record(node, f"{prefix}.weight", 0, out_layout)
        ctx.record(node, f"{prefix}.weight", 1, layout_in)
    elif module.groups == module.in_channels == module.out_channels:
        out_layout = layout_in  # depthwise: output channel c is input channel c
        ctx.record(node, f"{prefix}.weight", 0, out_layout)
    else:
        raise ctx.fail(node, f"grouped convolution (groups={module.groups}) is not permutable by channel")
    ctx.record(node, f"{prefix}.bias", 0, out_layout)
    result = Tracked(1, out_layout)
    ctx.observe(node, result, LAYER)
    return result


# ------------------------------------------------------------------------------------ normalisation


def _per_channel(ctx: TraceContext, node: fx.Node, layout: Layout, names: Sequence[str]) -> Tracked:
    """Normalisation of channels on axis 1 laid out as ``layout``: the entries ``names`` take it too."""
    for name in names:
        ctx.record(node, f"{node.target}.{name}", 0, layout)
    result = Tracked(1, layout)
    ctx.observe(node, result, NORM)
    return result


@register_op_rule(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip
def _batch_norm(ctx: TraceContext, node: fx.Node) -> Tracked:
    layout = ctx.input_layout(node, _first(node), 1)
    return _per_channel(ctx, node, layout, ("weight", "bias", "running_mean", "running_var"))


@register_op_rule(nn.GroupNorm)
def _group_norm(ctx: TraceContext, node: fx.Node) -> Tracked:
    module = ctx.module(node)
    layout = ctx.input_layout(node, _first(node), 1)
    if module.num_groups not in (1, module.num_channels) and any(s.group for s in layout):
        raise ctx.fail(node, f"GroupNorm with {module.num_groups} groups of channels is not permutable")
    return _per_channel(ctx, node, layout, ("weight", "bias"))


@register_op_rule(nn.LayerNorm)
def _layer_norm(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """Normalises the last dims: if the channels are among them, the affine entries take their layout."""
    module, prefix = ctx.module(node), str(node.target)
    info, shape = ctx.tracked(_first(node)), ctx.shape(node)
    if info is None or shape is None:
        return info
    normalized = len(module.normalized_shape)
    first = len(shape) - normalized
    if info.axis >= first:
        for name in ("weight", "bias"):
            if f"{prefix}.{name}" in ctx.state:
                layouts: list[Layout | None] = [None] * normalized
                layouts[info.axis - first] = info.layout
                for axis, layout in enumerate(layouts):
                    ctx.record(node, f"{prefix}.{name}", axis, layout)
    return info


@register_op_rule(nn.PReLU)
def _prelu(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    module, source = ctx.module(node), _first(node)
    if module.num_parameters > 1:
        ctx.record(node, f"{node.target}.weight", 0, ctx.input_layout(node, source, 1))
    info = ctx.tracked(source)
    ctx.observe(node, info, NONLINEAR)
    return info


# -------------------------------------------------------------------------------------- binary ops


@register_op_rule(
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum",
)  # fmt: skip
def _binary(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """Two tracked operands: their groups are tied (residual streams); else a constant is attached."""
    args = node.args
    left, right = ctx.tracked(args[0]), ctx.tracked(args[1]) if len(args) > 1 else None
    if left is not None and right is not None:
        shape_l, shape_r, shape_o = ctx.shape(args[0]), ctx.shape(args[1]), ctx.shape(node)
        if shape_l == shape_r or shape_o is None:
            result = Tracked(left.axis, ctx.unify(node, left.layout, right.layout))
        else:
            result = _broadcast(ctx, node, (left, right), (shape_l, shape_r), shape_o)
        ctx.observe(node, result, JOIN)
        return result
    tracked_arg, other = (
        (args[0], args[1]) if left is not None else (args[1] if len(args) > 1 else None, args[0])
    )
    info = left or right
    if info is None:
        return None
    _attach_constant(ctx, node, tracked_arg, info, other)
    return info


def _broadcast(
    ctx: TraceContext,
    node: fx.Node,
    infos: tuple[Tracked, Tracked],
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    shape_out: tuple[int, ...],
) -> Tracked:
    """Element-wise op of two tracked tensors of different shapes (x * gate, gate N×C×1×1)."""
    (left, right), (shape_l, shape_r) = infos, shapes
    axis_l = left.axis + len(shape_out) - len(shape_l)
    axis_r = right.axis + len(shape_out) - len(shape_r)
    if axis_l == axis_r and shape_l[left.axis] == shape_r[right.axis]:
        return Tracked(axis_l, ctx.unify(node, left.layout, right.layout))
    for mine, other, axis in ((left, right, axis_l), (right, left, axis_r)):
        if all(segment.group is None for segment in other.layout):
            return Tracked(axis, mine.layout)
    raise ctx.fail(node, "broadcasts tensors whose permuted channels do not line up")


def _attach_constant(ctx: TraceContext, node: fx.Node, tracked_arg: Any, info: Tracked, other: Any) -> None:
    """A parameter/buffer combined element-wise with a tracked tensor shares its channel permutation."""
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        if isinstance(other, fx.Node) and ctx.shape(other) not in (None, ()) and ctx.tracked(other) is None:
            shape = ctx.shape(other)
            if shape is not None and math.prod(shape) > 1 and any(s.group for s in info.layout):
                raise ctx.fail(node, "combines permuted channels with an untracked tensor")
        return
    key = str(other.target)
    shape, out_shape = ctx.shape(other), ctx.shape(node)
    if key not in ctx.state or shape is None or out_shape is None:
        return
    axis = info.axis - (len(out_shape) - len(shape))
    if 0 <= axis < len(shape) and shape[axis] > 1:
        ctx.record(node, key, axis, info.layout)


# ----------------------------------------------------------------------------------- shape changes


@register_op_rule(nn.Flatten)
def _flatten_module(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    module = ctx.module(node)
    return flatten_layout(ctx, node, _first(node), module.start_dim, module.end_dim)


@register_op_rule(torch.flatten, "flatten")
def _flatten(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    start, end = _argument(node, 1, "start_dim", 0), _argument(node, 2, "end_dim", -1)
    return flatten_layout(ctx, node, _first(node), start, end)


@register_op_rule(torch.reshape, "view", "reshape")
def _reshape(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """Only a reshape to (batch, features) is understood (a flatten); else channels must be untracked."""
    source = _first(node)
    info, shape_in, shape_out = ctx.tracked(source), ctx.shape(source), ctx.shape(node)
    if info is None or shape_in is None or shape_out is None or shape_in == shape_out:
        return info
    if len(shape_out) == 2 and shape_out[0] == shape_in[0] and info.axis >= 1:
        return flatten_layout(ctx, node, source, 1, -1)
    if all(segment.group is None for segment in info.layout):
        return None
    raise ctx.fail(node, f"reshapes permuted channels from {shape_in} to {shape_out}")


@register_op_rule(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def _reduce(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """Reducing over the channels gives an unpermuted result; over other dims, the channels stay."""
    source = _first(node)
    info, shape = ctx.tracked(source), ctx.shape(source)
    if info is None or shape is None:
        return None
    dims = _argument(node, 1, "dim", None)
    keepdim = _argument(node, 2, "keepdim", False)
    if dims is None:
        return None
    dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if info.axis in dims:
        return None  # reducing over the channels is permutation invariant
    axis = info.axis if keepdim else info.axis - sum(d < info.axis for d in dims)
    return Tracked(axis, info.layout)


@register_op_rule(torch.cat, torch.concat)
def _cat(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """Along the channel axis the layouts are concatenated; along another axis they are tied."""
    tensors, dim = node.args[0], _argument(node, 1, "dim", 0)
    infos = [ctx.tracked(t) for t in tensors]
    shapes = [ctx.shape(t) for t in tensors]
    if all(info is None for info in infos):
        return None
    if any(info is None or shape is None for info, shape in zip(infos, shapes, strict=True)):
        raise ctx.fail(node, "concatenates permuted channels with an untracked tensor")
    dim = dim % len(shapes[0])
    if all(info.axis == dim for info in infos):
        return Tracked(dim, tuple(segment for info in infos for segment in info.layout))
    layout = infos[0].layout
    for info in infos[1:]:
        layout = ctx.unify(node, layout, info.layout)
    return Tracked(infos[0].axis, layout)


@register_op_rule(operator.getitem)
def _getitem(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """Indexing that keeps every channel (``x[:, :, 0]``, ``x[0]`` before the channel axis)."""
    info = ctx.tracked(_first(node))
    if info is None:
        return None
    index = node.args[1]
    entries = index if isinstance(index, tuple) else (index,)
    if any(entry is None or entry is Ellipsis for entry in entries[: info.axis + 1]):
        raise ctx.fail(node, "indexing with None/Ellipsis before the channel axis is not supported")
    if info.axis < len(entries) and entries[info.axis] != slice(None):
        raise ctx.fail(node, "indexes or slices along the permuted channel axis")
    removed = sum(isinstance(entry, int) for entry in entries[: info.axis])
    return Tracked(info.axis - removed, info.layout)


@register_op_rule(F.pad)
def _pad(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    """``F.pad`` pads the last ``len(pad) // 2`` dims; padding the channel axis is not permutable."""
    source = _first(node)
    pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
    info, shape = ctx.tracked(source), ctx.shape(source)
    if info is None or shape is None:
        return info
    position = len(shape) - 1 - info.axis  # the channel axis' index counted from the last dim
    if 2 * position + 1 < len(pad) and (pad[2 * position] or pad[2 * position + 1]):
        raise ctx.fail(node, "pads along the permuted channel axis")
    return info
