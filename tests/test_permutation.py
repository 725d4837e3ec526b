"""The permutation engine (DESIGN.md §3.1–3.3, 3.8): automatic specs, invariance, exact recovery by activation
and weight matching, merges of a model with a permuted copy of itself, clear errors for unsupported ops."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import Tensor, nn

from lightning_dimat import align, merge, recompute_batchnorm
from lightning_dimat.models import resnet20, resnet50, vgg16
from lightning_dimat.permutation import (
    PermutationSpec,
    UnsupportedModelError,
    invert,
    permutation_spec,
    permute_optimizer_state,
    permute_state,
    random_permutations,
)
from lightning_dimat.permutation.activation import match_activations
from lightning_dimat.permutation.verify import SpecMismatchError, check_spec
from lightning_dimat.permutation.weight import match_weights


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(48, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 24),
        nn.ReLU(),
        nn.Linear(24, 5),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 5),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (3, 4, 4)),
    "cnn": (_cnn, (3, 8, 8)),
    "resnet20": (lambda: resnet20(width=1, num_classes=5), (3, 16, 16)),
    "resnet20x8_conv3x3": (lambda: resnet20(width=8, num_classes=5, shortcut="conv3x3"), (3, 8, 8)),
    "vgg16_bn_64": (lambda: vgg16(num_classes=5, input_size=64, hidden=64), (3, 64, 64)),
    "resnet50": (lambda: resnet50(num_classes=5), (3, 8, 8)),
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=5), (3, 64, 64)),
}
HEAVY = {"resnet20x8_conv3x3", "resnet50", "vgg16_bn_64"}


def _warm_model(name: str) -> tuple[nn.Module, Tensor]:
    """A model with non-trivial BatchNorm statistics, in eval mode, and a batch of inputs."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    samples = 6 if name in HEAVY else 24
    x = torch.randn(samples, *shape)
    recompute_batchnorm(model, [x])  # exact statistics: activations stay normalised through the depth
    return model.eval(), x


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Tensor, PermutationSpec]:
    model, x = _warm_model(request.param)
    return request.param, model, x, permutation_spec(model, x[:2])


def test_random_permutation_leaves_logits_unchanged(case) -> None:  # type: ignore[no-untyped-def]
    name, model, x, spec = case
    assert spec.group_sizes, name
    for seed in range(2):
        assert check_spec(model, spec, x[:4], seed=seed) <= 1e-9  # float64: only the order of sums differs
    fresh = MODELS[name][0]().eval()  # float32, default initialisation: logits of ordinary size
    assert check_spec(fresh, spec, x[:4], dtype=None) <= 1e-4


def _permuted_copy(
    model: nn.Module, spec: PermutationSpec, seed: int = 1
) -> tuple[nn.Module, dict[str, Tensor]]:
    truth = random_permutations(spec, torch.Generator().manual_seed(seed))
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_state(model.state_dict(), spec, truth))
    return permuted, truth


def _assert_recovers(found: dict[str, Tensor], truth: dict[str, Tensor]) -> None:
    # permuted = original[truth]; aligning it back needs invert(truth).
    for group, permutation in truth.items():
        assert torch.equal(found[group], invert(permutation)), group


def test_activation_matching_recovers_the_permutation_exactly(case) -> None:  # type: ignore[no-untyped-def]
    _, model, x, spec = case
    permuted, truth = _permuted_copy(model, spec)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    _assert_recovers(found, truth)


def test_weight_matching_recovers_the_permutation_exactly(case) -> None:  # type: ignore[no-untyped-def]
    _, model, _, spec = case
    permuted, truth = _permuted_copy(model, spec)
    found = match_weights(spec, model.state_dict(), permuted.state_dict())
    _assert_recovers(found, truth)


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_align_returns_the_original_weights(case, method: str) -> None:  # type: ignore[no-untyped-def]
    _, model, x, spec = case
    permuted, _ = _permuted_copy(model, spec)
    aligned = align(model, permuted, method=method, data=x)
    assert type(aligned) is type(model)
    for key, value in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_merging_a_model_with_its_permuted_copy_gives_the_model(case, method: str) -> None:  # type: ignore[no-untyped-def]
    _, model, x, spec = case
    permuted, _ = _permuted_copy(model, spec)
    merged = merge([model, permuted], [0.5, 0.5], method=method, data=[(x, None)])
    assert type(merged) is type(model)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    expected = copy.deepcopy(model)
    recompute_batchnorm(expected, [(x, None)])
    for key, value in expected.state_dict().items():
        assert torch.allclose(merged.state_dict()[key].float(), value.float(), atol=1e-5), key


def test_spec_groups_for_known_architectures() -> None:
    model, x = _warm_model("resnet20")
    spec = permutation_spec(model, x[:2])
    # 3 residual streams + one inner group per basic block (9).
    assert len(spec.group_sizes) == 12
    assert sorted(set(spec.group_sizes.values())) == [16, 32, 64]
    assert "fc.weight" in spec.axes and spec.axes["fc.weight"][0] is None  # the output is never permuted
    vgg, x = _warm_model("vgg16_bn_64")
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
    assert check_spec(model, spec, x) <= 1e-9


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
    model, x = _warm_model("mlp")
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
    permuted, truth = _permuted_copy(model, spec)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    _assert_recovers(found, truth)
    _assert_recovers(match_weights(spec, model.state_dict(), permuted.state_dict()), truth)


def test_wrong_hand_written_spec_is_caught_by_the_verifier() -> None:
    model, x = _warm_model("mlp")
    wrong = PermutationSpec.from_groups(model, {"h1": [("1.weight", 0), ("1.bias", 0)]})  # consumers missing
    with pytest.raises(SpecMismatchError, match="changed the outputs"):
        check_spec(model, wrong, x)


def test_optimizer_state_is_permuted_with_the_model() -> None:
    model, x = _warm_model("mlp")
    spec = permutation_spec(model, x[:2])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    model(x).square().mean().backward()
    optimizer.step()
    before = {name: optimizer.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}
    permutations = random_permutations(spec, torch.Generator().manual_seed(3))
    permuted_state = permute_state(model.state_dict(), spec, permutations)
    permute_optimizer_state(optimizer, model, spec, permutations)
    model.load_state_dict(permuted_state)
    for name, parameter in model.named_parameters():
        expected = permute_state({name: before[name]}, spec, permutations)[name]
        assert torch.equal(optimizer.state[parameter]["exp_avg"], expected), name
