"""Deriving a :class:`PermutationSpec` automatically from a model's ``torch.fx`` graph.

Every tensor in the graph carries a *channel axis* with a layout (segments of permutation groups). Linear
and convolution layers create a group for their output units; element-wise operations, pooling, dropout
and normalisation pass layouts through; a residual ``add`` (or any element-wise op of two tracked
tensors) ties the groups of its operands into one (one permutation per residual stream); ``flatten``
turns a channel layout into blocks; ``cat`` concatenates layouts. The network's input is never permuted,
and groups reaching the output are pinned to the identity. Anything else stops with an error naming the
node, so that a wrong spec can never be produced silently.

This module is the driver: it traces the model, hands every node to the rule registered for its op
(:mod:`~lightning_dimat.permutation.rules`; add your own with
:func:`~lightning_dimat.permutation.rules.register_op_rule`) and assembles the spec.

Examples:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 2))
    >>> spec = permutation_spec(net, torch.randn(2, 3, 6, 6))
    >>> spec.group_sizes, spec.axes["4.weight"][1]
    ({'0': 8}, (Segment(group='0', size=8, block=16),))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_dimat.permutation.context import (
    DEFAULT_PROBES,
    FALLBACK,
    PROBE_PLACEMENTS,
    TraceContext,
    Tracked,
)
from lightning_dimat.permutation.groups import UnsupportedModelError
from lightning_dimat.permutation.rules import function_rule, is_registered_module, method_rule, module_rule
from lightning_dimat.permutation.spec import Layout, PermutationSpec, Segment
from lightning_dimat.validation import check_choice

__all__ = ["FALLBACK", "SpecFactory", "UnsupportedModelError", "permutation_spec", "trace"]


class _SpecBuilder(TraceContext):
    """Walks the graph once, handing each node to its rule, then assembles the spec."""

    placement: str = DEFAULT_PROBES

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            handler = getattr(self, f"_{node.op}")
            self.values[node] = handler(node)

    def _placeholder(self, node: fx.Node) -> Tracked | None:
        shape = self.shape(node)
        return None if shape is None or len(shape) < 2 else Tracked(1, self.untracked_layout(shape[1]))

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

    def _call_module(self, node: fx.Node) -> Tracked | None:
        module = self.module(node)
        rule = module_rule(type(module))
        if rule is not None:
            return rule(self, node)
        info = self.tracked(node.args[0] if node.args else None)
        if info is None or all(segment.group is None for segment in info.layout):
            return None  # e.g. input preprocessing: nothing permuted goes in, nothing permuted comes out
        raise self.fail(node, f"no permutation rule for {type(module).__name__}")

    def _call_function(self, node: fx.Node) -> Tracked | None:
        return self._call(node, function_rule(node.target))

    def _call_method(self, node: fx.Node) -> Tracked | None:
        return self._call(node, method_rule(node.target))

    def _call(self, node: fx.Node, rule: Callable[[TraceContext, fx.Node], Tracked | None] | None) -> Any:
        if rule is not None:
            return rule(self, node)
        if not any(self.tracked(argument) is not None for argument in node.args):
            return None  # arithmetic on shapes, constants, ...
        raise self.fail(node, "no permutation rule for this operation")

    # ------------------------------------------------------------------- result
    def spec(self) -> PermutationSpec:
        """The spec: surviving groups (neither pinned nor aliases), their entries' layouts and probes."""
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
        preference, which = PROBE_PLACEMENTS[self.placement]
        probes = {}
        for group, found in candidates.items():
            for kind in preference:
                chosen = [name for name, k in found if k == kind]
                if chosen:
                    probes[group] = tuple(chosen[-1:] if which == "last" else chosen)
                    break
        return probes


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
    the custom backward; whatever it does to channels must not be guessed.) Modules whose class has a
    registered rule (:func:`~lightning_dimat.permutation.rules.register_op_rule`) are kept whole.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_registered_module(type(m)) or super().is_leaf_module(m, module_qualified_name)

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


def permutation_spec(
    model: nn.Module, example_input: Tensor | Sequence[Tensor], probes: str = DEFAULT_PROBES
) -> PermutationSpec:
    """Derives ``model``'s :class:`PermutationSpec` by tracing it with ``torch.fx`` on ``example_input``.

    ``example_input`` fixes the shapes (e.g. the spatial size a ``flatten`` sees); one or two samples are
    enough. The model is run once in eval mode without gradients (BatchNorm statistics are untouched).
    ``probes`` names where activation matching observes each group (one of ``PROBE_PLACEMENTS``:
    ``"pre_activation"``, ``"post_activation"``, ``"stage_output"``).

    Raises:
        UnsupportedModelError: for an untraceable model or an operation without a permutation rule (the
            message names the node and module and points to the hand-written fallback).
    """
    check_choice("probes", probes, tuple(PROBE_PLACEMENTS))
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
    builder.placement = probes
    builder.run()
    return builder.spec()


SpecFactory = Callable[[nn.Module, Tensor], PermutationSpec]
