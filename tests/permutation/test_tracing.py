"""Deriving permutation specs (tracing.py, rules.py, verify.py, cache.py): the groups of known architectures,
concatenation and gating, clear errors for unsupported ops and untraceable models, hand-written specs and the
verifier that catches wrong ones, one spec per forward, tracing in eval mode, and user op rules.

That a derived spec leaves every supported model's outputs unchanged, and that matching recovers its
permutations, are properties 1 and 2 of DESIGN.md §3: tests/test_properties.py.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from permutation_helpers import assert_recovers, permuted_copy, warm_model
from torch import Tensor, fx, nn

from lightning_dimat import align, recompute_batchnorm
from lightning_dimat.permutation import (
    PermutationSpec,
    UnsupportedModelError,
    match_activations,
    match_weights,
    permutation_spec,
    register_op_rule,
)
from lightning_dimat.permutation.context import TraceContext, Tracked
from lightning_dimat.permutation.verify import SpecMismatchError, check_spec


def test_spec_groups_for_known_architectures() -> None:
    model, x = warm_model("resnet20")
    spec = permutation_spec(model, x[:2])
    # 3 residual streams + one inner group per basic block (9).
    assert len(spec.group_sizes) == 12
    assert sorted(set(spec.group_sizes.values())) == [16, 32, 64]
    assert "fc.weight" in spec.axes and spec.axes["fc.weight"][0] is None  # the output is never permuted
    vgg, x = warm_model("vgg16_bn_64")
    spec = permutation_spec(vgg, x[:2])
    flatten_input = next(
        layout
        for key, layouts in spec.axes.items()
        for layout in layouts[1:2]
        if layout and layout[0].block > 1
    )
    assert flatten_input[0].block == 4 and flatten_input[0].size == 512  # 512 channels × 2×2 pixels


def test_torchvision_resnet50_traces_and_its_spec_is_exact() -> None:
    model = torchvision.models.resnet50(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    spec = permutation_spec(model, x)
    assert len(spec.group_sizes) == 4 + 16 * 2 + 1  # 4 residual streams, 2 inner groups per bottleneck, stem
    check_spec(model, spec, x, tolerance=1e-9)


def test_concatenation_and_gating_are_supported() -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
            self.gate = nn.Linear(10, 10)
            self.head = nn.Conv2d(10, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
            scale = torch.sigmoid(self.gate(y.mean((2, 3))))[:, :, None, None]
            return self.head(y * scale).mean((2, 3))

    model, x = Branches().eval(), torch.randn(4, 3, 6, 6)
    spec = permutation_spec(model, x)
    assert check_spec(model, spec, x) < 1e-5
    layout = spec.axes["head.weight"][1]
    assert [segment.size for segment in layout] == [4, 6]


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return 2 * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return 2 * grad


def test_unsupported_operations_are_named_in_the_error() -> None:
    class Rolls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.roll(self.conv(x), 1, dims=1))

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(_Twice.apply(self.fc(x)))

    with pytest.raises(UnsupportedModelError, match=r"node 'roll'.*roll.*PermutationSpec\.from_groups"):
        permutation_spec(Rolls(), torch.randn(2, 3, 4, 4))
    with pytest.raises(UnsupportedModelError, match=r"apply.*PermutationSpec\.from_groups"):
        permutation_spec(Custom(), torch.randn(2, 3))
    attention = nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (2, 4)))
    with pytest.raises(UnsupportedModelError, match=r"Unflatten"):
        permutation_spec(attention, torch.randn(2, 4))


def test_untraceable_model_points_to_the_hand_written_fallback() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedModelError, match=r"torch\.fx cannot trace DataDependent.*from_groups"):
        permutation_spec(DataDependent(), torch.randn(2, 3))


def test_hand_written_spec_with_module_probes_works_for_both_methods() -> None:
    model, x = warm_model("mlp")
    spec = PermutationSpec.from_groups(
        model,
        {
            "h1": [
                ("1.weight", 0),
                ("1.bias", 0),
                ("2.weight", 0),
                ("2.bias", 0),
                ("2.running_mean", 0),
                ("2.running_var", 0),
                ("4.weight", 1),
            ],
            "h2": [("4.weight", 0), ("4.bias", 0), ("6.weight", 1)],
        },
        probes={"h1": ["3"], "h2": ["5"]},
    )
    assert check_spec(model, spec, x) < 1e-5
    permuted, truth = permuted_copy(model, spec)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    assert_recovers(found, truth)
    assert_recovers(match_weights(spec, model.state_dict(), permuted.state_dict()), truth)


def test_wrong_hand_written_spec_is_caught_by_the_verifier() -> None:
    model, x = warm_model("mlp")
    wrong = PermutationSpec.from_groups(model, {"h1": [("1.weight", 0), ("1.bias", 0)]})  # consumers missing
    with pytest.raises(SpecMismatchError, match="changed the outputs"):
        check_spec(model, wrong, x)


# --------------------------------------------------------------------------- regressions found in review


class _Configurable(nn.Module):
    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h)) if self.residual else torch.relu(self.b(h))
        return self.head(h)


def test_instances_of_one_class_with_different_forwards_get_their_own_specs() -> None:
    from lightning_dimat.permutation.cache import spec_for

    x = torch.randn(4, 8)
    plain, residual = _Configurable(False), _Configurable(True)
    assert len(spec_for(plain, x).group_sizes) == 2
    assert len(spec_for(residual, x).group_sizes) == 1  # the add ties a and b
    permuted, _ = permuted_copy(residual, spec_for(residual, x))
    aligned = align(residual, permuted, method="weight", data=x)
    assert torch.allclose(aligned(x), residual(x), atol=1e-6)


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.dropout(torch.relu(self.a(x)), 0.5, training=self.training))


def test_specs_are_traced_in_eval_mode_so_functional_dropout_is_off_during_matching() -> None:
    torch.manual_seed(0)
    model, x = _FunctionalDropout().train(), torch.randn(64, 6)
    spec = permutation_spec(model, x[:2])
    assert model.training
    permuted, truth = permuted_copy(model, spec)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    assert_recovers(found, truth)


class _DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.c(torch.relu(self.a(x)))}


def test_the_verifier_compares_dict_outputs_and_sees_through_fresh_batchnorm() -> None:
    model, x = _DictOutput(), torch.randn(5, 4)
    wrong = PermutationSpec.from_groups(model, {"h": [("a.weight", 0)]})  # a.bias and c.weight forgotten
    with pytest.raises(SpecMismatchError):
        check_spec(model, wrong, x)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    missing_batchnorm = PermutationSpec.from_groups(
        fresh, {"h": [("0.weight", 0), ("0.bias", 0), ("3.weight", 1)]}
    )  # BatchNorm's entries forgotten: invisible while they hold their default values
    with pytest.raises(SpecMismatchError):
        check_spec(fresh, missing_batchnorm, torch.randn(2, 3, 6, 6))


# --------------------------------------------------------------------------------------- user op rules


class _SwishFunction(torch.autograd.Function):
    """x·σ(x) with a hand-written backward (a memory-saving Swish): opaque to the tracer."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        gate = torch.sigmoid(x)
        return grad * gate * (1 + x * (1 - gate))


class _Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _SwishFunction.apply(x)


class _UnregisteredSwish(_Swish):
    pass


@register_op_rule(_Swish)
def _swish_rule(ctx: TraceContext, node: fx.Node) -> Tracked | None:
    return ctx.tracked(node.args[0])  # element-wise: every channel stays where it is


def _swish_net(activation: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), activation(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), activation(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12 * 4, 5),
    )  # fmt: skip


def test_a_registered_rule_makes_a_custom_module_traceable() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    with pytest.raises(UnsupportedModelError, match=r"custom autograd function _SwishFunction\.apply"):
        permutation_spec(_swish_net(_UnregisteredSwish), x[:2])  # a subclass is traced into, not matched
    model = _swish_net(_Swish).eval()
    recompute_batchnorm(model, [x])
    spec = permutation_spec(model, x[:2])
    assert spec.group_sizes == {"0": 8, "3": 12}
    assert [node.target for node in spec.graph.nodes if node.op == "call_module"][2] == "2"  # kept whole
    check_spec(model, spec, x, tolerance=1e-9)
    permuted, truth = permuted_copy(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-4, rtol=0)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    assert_recovers(found, truth)


def test_op_rules_are_registered_carefully() -> None:
    with pytest.raises(ValueError, match=r"already registered.*override=True"):
        register_op_rule(_Swish)(_swish_rule)
    with pytest.raises(TypeError, match=r"class, _Swish, not an instance"):
        register_op_rule(_Swish())
    with pytest.raises(TypeError, match=r"at least one"):
        register_op_rule()
    with pytest.raises(TypeError, match=r"module class, a function or a method name"):
        register_op_rule(3)  # type: ignore[arg-type]
    assert register_op_rule(_Swish, override=True)(_swish_rule) is _swish_rule


def test_probe_placements_observe_the_named_nodes_and_keep_the_groups() -> None:
    model, x = warm_model("resnet20")
    pre, post, stage = (
        permutation_spec(model, x[:2], probes)
        for probes in ("pre_activation", "post_activation", "stage_output")
    )
    assert pre.axes == post.axes == stage.axes  # only where the activations are observed changes
    stream = next(group for group, names in pre.probes.items() if len(names) == 3)
    assert all(name.startswith("add") for name in pre.probes[stream])  # the three residual sums
    assert len(post.probes[stream]) == 4 and all("relu" in n or "stem" in n for n in post.probes[stream])
    assert stage.probes[stream] == post.probes[stream][-1:]  # the stage's last block output only
    permuted, truth = permuted_copy(model, stage)  # matching on this placement recovers a permuted copy
    (found,) = match_activations(stage, model, [permuted.state_dict()], [x])
    assert_recovers(found, truth)
    with pytest.raises(ValueError, match=r"probes.*'after_relu'"):
        permutation_spec(model, x[:2], "after_relu")
