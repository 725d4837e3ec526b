"""The permutation engine (DESIGN.md §3.1–3.3, 3.8): automatic specs, invariance, exact recovery by activation
and weight matching, merges of a model with a permuted copy of itself, clear errors for unsupported ops."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import Tensor, fx, nn

from lightning_dimat import align, merge, recompute_batchnorm
from lightning_dimat.models import resnet20, resnet50, vgg16
from lightning_dimat.permutation import (
    PermutationSpec,
    UnsupportedModelError,
    compose,
    identity_permutations,
    invert,
    invert_permutations,
    match_activations,
    match_weights,
    permutation_spec,
    permute_optimizer_state,
    permute_state,
    random_permutations,
    register_op_rule,
    solve_assignment,
)
from lightning_dimat.permutation.context import TraceContext, Tracked
from lightning_dimat.permutation.verify import SpecMismatchError, check_spec


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
    for seed in range(2):  # float64 and randomised state: only the order of sums differs (relative 1e-9)
        check_spec(model, spec, x[:4], seed=seed, tolerance=1e-9)
    fresh = MODELS[name][0]().eval()  # float32, default initialisation: logits of ordinary size
    assert check_spec(fresh, spec, x[:4], dtype=None, randomise=False) <= 1e-4


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


# --------------------------------------------------------------------------- regressions found in review


class _Sequence(nn.Module):
    """Linear layers on (N, L, C) inputs: the units are on the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x))))).mean(1)


@pytest.mark.parametrize("length", [5, 16])
def test_activation_matching_reads_units_on_the_last_axis_for_sequences(length: int) -> None:
    torch.manual_seed(0)
    model, x = _Sequence().eval(), torch.randn(32, length, 6)
    spec = permutation_spec(model, x[:2])
    assert set(spec.probe_axes.values()) == {2}
    permuted, truth = _permuted_copy(model, spec)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    _assert_recovers(found, truth)


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
    permuted, _ = _permuted_copy(residual, spec_for(residual, x))
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
    permuted, truth = _permuted_copy(model, spec)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    _assert_recovers(found, truth)


def test_a_module_probe_that_runs_twice_is_refused() -> None:
    tanh = nn.Tanh()
    model = nn.Sequential(nn.Linear(4, 8), tanh, nn.Linear(8, 8), tanh, nn.Linear(8, 2))
    spec = PermutationSpec.from_groups(
        model, {"A": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]}, probes={"A": ["1"]}
    )
    with pytest.raises(ValueError, match="produced two activations in one forward pass"):
        match_activations(spec, model, [model.state_dict()], [torch.randn(8, 4)])


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


def test_correlations_are_exact_for_activations_with_large_means_and_under_autocast() -> None:
    from lightning_dimat.permutation.activation import CrossStatistics, Moments

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4 * 4096, 6, generator=generator) * 0.01 + 100.0
    b = a @ torch.randn(6, 6, generator=generator) * 0.01 + 50.0
    moments, cross = Moments(6, torch.device("cpu")), CrossStatistics(6, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunk_a, chunk_b in zip(a.split(4096), b.split(4096), strict=True):
            own = moments.centre(chunk_a)
            moments.update(own)
            with torch.autocast("cpu", enabled=False):
                cross.update(own, chunk_b)
    expected = torch.corrcoef(torch.cat([a, b], 1).T.double())[:6, 6:]
    assert torch.allclose(cross.correlation(moments), expected, atol=1e-4)


def test_merge_reads_generators_once_and_exactly_num_batches() -> None:
    model, x = _warm_model("mlp")
    permuted, _ = _permuted_copy(model, permutation_spec(model, x[:2]))
    drawn: list[int] = []

    def batches():
        for index in range(10):
            drawn.append(index)
            yield x[index * 2 : index * 2 + 2], None

    merged = merge([model, permuted], [0.5, 0.5], method="activation", data=batches(), num_batches=3)
    assert drawn == [0, 1, 2]
    assert type(merged) is type(model)
    merge([model, permuted], method="weight", data=(x, torch.zeros(len(x))))  # an (x, y) tuple is one batch


def test_weight_matching_handles_a_group_on_two_axes_of_one_tensor() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.shared, self.out = nn.Linear(4, 12), nn.Linear(12, 12), nn.Linear(12, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.inp(x))
            return self.out(self.shared(torch.relu(self.shared(h))))

    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(8, 4)
    spec = permutation_spec(model, x)
    assert spec.axes["shared.weight"][0] == spec.axes["shared.weight"][1]
    permuted, truth = _permuted_copy(model, spec)
    _assert_recovers(match_weights(spec, model.state_dict(), permuted.state_dict()), truth)


# ------------------------------------------------------------------------------- composing permutations


def _assert_same_permutations(found: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert found.keys() == expected.keys()
    for group, permutation in expected.items():
        assert torch.equal(found[group], permutation), group


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_compose_with_the_inverse_is_the_identity(name: str) -> None:
    build, shape = MODELS[name]
    spec = permutation_spec(build(), torch.randn(2, *shape))
    permutations = random_permutations(spec, torch.Generator().manual_seed(0))
    inverse = invert_permutations(permutations)
    _assert_same_permutations(compose(permutations, inverse), identity_permutations(spec))
    _assert_same_permutations(compose(inverse, permutations), identity_permutations(spec))
    _assert_same_permutations(compose(permutations, {}), permutations)  # missing groups: the identity
    _assert_same_permutations(compose({}, permutations), permutations)
    for group, permutation in permutations.items():
        assert torch.equal(inverse[group], invert(permutation)), group


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_permuting_twice_is_permuting_by_the_composition(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    spec = permutation_spec(model, torch.randn(2, *shape))
    generator = torch.Generator().manual_seed(1)
    first, second = random_permutations(spec, generator), random_permutations(spec, generator)
    del second[next(iter(second))]  # a group missing from one side is the identity there
    state = model.state_dict()
    twice = permute_state(permute_state(state, spec, first), spec, second)
    once = permute_state(state, spec, compose(first, second))
    undone = permute_state(permute_state(state, spec, first), spec, invert_permutations(first))
    assert any(not torch.equal(twice[key], state[key]) for key in spec.axes)
    for key, value in state.items():
        assert torch.equal(twice[key], once[key]), key
        assert torch.equal(undone[key], value), key


def test_compose_refuses_permutations_of_different_lengths() -> None:
    with pytest.raises(ValueError, match=r"group 'h'.*3 and 4 units"):
        compose({"h": torch.arange(3)}, {"h": torch.arange(4)})


# ------------------------------------------------------------------------------------ assignment solver


def _scipy_assignment(score: Tensor) -> Tensor:
    """The solver as it was before ``prior`` and ``identity_bias``: SciPy on the float64 scores."""
    rows, columns = linear_sum_assignment(score.numpy().astype(np.float64), maximize=True)
    permutation = torch.empty(len(rows), dtype=torch.long)
    permutation[torch.as_tensor(rows)] = torch.as_tensor(columns)
    return permutation


@pytest.mark.parametrize("seed", range(4))
def test_solver_without_bias_or_prior_is_the_plain_assignment(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    continuous = torch.randn(12, 12, generator=generator)
    tied = torch.randint(0, 3, (12, 12), generator=generator).float()  # many optimal permutations
    for score in (continuous, tied, continuous.double()):
        expected = _scipy_assignment(score)
        assert torch.equal(solve_assignment(score), expected)
        assert torch.equal(solve_assignment(score, None, 0.0), expected)
        assert torch.equal(solve_assignment(score, torch.zeros_like(score)), expected)


def test_a_large_identity_bias_returns_the_identity_and_a_small_one_only_breaks_close_calls() -> None:
    score = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(solve_assignment(score), torch.arange(16))
    assert torch.equal(solve_assignment(score, identity_bias=1e6), torch.arange(16))
    swap = torch.tensor([[0.0, 0.5], [0.5, 0.0]])  # swapping gains 1.0 over keeping both units (2λ)
    assert torch.equal(solve_assignment(swap, identity_bias=0.4), torch.tensor([1, 0]))
    assert torch.equal(solve_assignment(swap, identity_bias=0.6), torch.tensor([0, 1]))
    assert torch.equal(score, torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))  # untouched


def test_a_prior_shifts_the_assignment() -> None:
    generator = torch.Generator().manual_seed(0)
    score = torch.randn(10, 10, generator=generator)
    wanted = torch.randperm(10, generator=generator)
    prior = torch.zeros(10, 10)
    prior[torch.arange(10), wanted] = 100.0
    assert torch.equal(solve_assignment(score, prior), wanted)
    small = torch.randn(10, 10, generator=generator)
    assert torch.equal(solve_assignment(score, small), _scipy_assignment(score + small))


def test_solver_inputs_are_checked_with_clear_messages() -> None:
    score = torch.randn(4, 4)
    for bad in (float("nan"), float("inf")):
        broken = score.clone()
        broken[1, 2] = bad
        with pytest.raises(ValueError, match=r"NaN or inf: the activations/weights"):
            solve_assignment(broken)
    with pytest.raises(ValueError, match=r"square.*\(4, 3\)"):
        solve_assignment(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"prior has shape \(3, 3\).*\(4, 4\)"):
        solve_assignment(score, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"prior contains NaN"):
        solve_assignment(score, torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"identity_bias must be a finite"):
        solve_assignment(score, identity_bias=float("inf"))


def test_matching_diverged_weights_names_the_problem() -> None:
    model, x = _warm_model("mlp")
    broken = {key: value.clone() for key, value in model.state_dict().items()}
    broken["4.weight"][0, 0] = float("nan")
    spec = permutation_spec(model, x[:2])
    with pytest.raises(ValueError, match=r"activations/weights .*contain NaN or inf"):
        match_weights(spec, model.state_dict(), broken)
    with pytest.raises(ValueError, match=r"activations/weights .*contain NaN or inf"):
        match_activations(spec, model, [broken], [x])


def test_a_large_identity_bias_keeps_both_matchings_at_the_identity() -> None:
    model, x = _warm_model("resnet20")
    spec = permutation_spec(model, x[:2])
    permuted, truth = _permuted_copy(model, spec)
    identity = identity_permutations(spec)
    _assert_same_permutations(
        match_weights(spec, model.state_dict(), permuted.state_dict(), identity_bias=1e9), identity
    )
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x], identity_bias=10.0)
    _assert_same_permutations(found, identity)  # correlations are at most 1
    _assert_recovers(match_weights(spec, model.state_dict(), permuted.state_dict(), identity_bias=0.0), truth)


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
    permuted, truth = _permuted_copy(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-4, rtol=0)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    _assert_recovers(found, truth)


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
