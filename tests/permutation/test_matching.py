"""Finding permutations (activation.py, weight.py, assignment.py): activation matching on sequences and with
exact streamed correlations, weight matching of a group on two axes of one tensor, the assignment solver with
its prior and identity bias, and clear errors for diverged weights.

Exact recovery of a random permutation on every supported architecture, by both methods, is property 2 of
DESIGN.md §3: tests/test_properties.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from permutation_helpers import assert_recovers, assert_same_permutations, permuted_copy, warm_model
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from lightning_dimat.permutation import (
    PermutationSpec,
    activation,
    identity_permutations,
    invert,
    match_activations,
    match_weights,
    permutation_spec,
    solve_assignment,
)
from lightning_dimat.permutation.assignment import solve_assignments

# ------------------------------------------------------------------------------------ activation matching


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
    permuted, truth = permuted_copy(model, spec)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    assert_recovers(found, truth)


def test_a_module_probe_that_runs_twice_is_refused() -> None:
    tanh = nn.Tanh()
    model = nn.Sequential(nn.Linear(4, 8), tanh, nn.Linear(8, 8), tanh, nn.Linear(8, 2))
    spec = PermutationSpec.from_groups(
        model, {"A": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]}, probes={"A": ["1"]}
    )
    with pytest.raises(ValueError, match="produced two activations in one forward pass"):
        match_activations(spec, model, [model.state_dict()], [torch.randn(8, 4)])


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


def test_units_the_data_cannot_tell_apart_are_matched_by_their_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A ReLU unit that is zero on every input correlates with nothing after the ReLU; its weights (bias,
    # normalisation parameters, the norms of its weight rows) still tell it apart from the others.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)).eval()
    with torch.no_grad():
        net[1].bias[:4] = -10.0  # units 0-3 are negative before the ReLU on every input: dead after it
    x = torch.randn(256, 4)
    for probes in ("pre_activation", "post_activation", "stage_output"):
        spec = permutation_spec(net, x[:2], probes)
        permuted, truth = permuted_copy(net, spec)
        (found,) = match_activations(spec, net, [permuted.state_dict()], [x])
        assert_recovers(found, truth)
    # Without the weights' tie-break, after the ReLU the data alone leaves the dead units' pairing arbitrary.
    monkeypatch.setattr(activation, "TIE_BREAK", 0.0)
    (found,) = match_activations(spec, net, [permuted.state_dict()], [x])
    ((group, permutation),) = truth.items()
    expected = invert(permutation)
    assert torch.equal(found[group][4:], expected[4:])  # the live units
    assert not torch.equal(found[group][:4], expected[:4])  # the dead ones


def test_the_tie_break_moves_no_unit_the_data_tells_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two independently initialised networks: every assignment is decided by the activations' correlation.
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(3))
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        layers = (nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
        nets.append(nn.Sequential(*layers))
    spec = permutation_spec(nets[0], x[:2], "post_activation")
    (with_tie_break,) = match_activations(spec, nets[0], [nets[1].state_dict()], [x])
    monkeypatch.setattr(activation, "TIE_BREAK", 0.0)
    (without,) = match_activations(spec, nets[0], [nets[1].state_dict()], [x])
    assert_same_permutations(with_tie_break, without)
    assert not all(torch.equal(p, torch.arange(len(p))) for p in without.values())  # (something moved)


# ---------------------------------------------------------------------------------------- weight matching


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
    permuted, truth = permuted_copy(model, spec)
    assert_recovers(match_weights(spec, model.state_dict(), permuted.state_dict()), truth)


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


def test_assignments_solved_side_by_side_are_those_solved_one_by_one_in_order() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(n, n, generator=generator) for n in (3, 64, 17, 128, 1, 40)]
    for bias in (0.0, 0.05):
        expected = [solve_assignment(score, identity_bias=bias) for score in scores]
        found = solve_assignments(scores, identity_bias=bias)
        assert len(found) == len(expected)
        for got, want in zip(found, expected, strict=True):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="NaN or inf"):  # an error in a worker thread reaches the caller
        solve_assignments([scores[0], torch.full((2, 2), float("nan"))])


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
    model, x = warm_model("mlp")
    broken = {key: value.clone() for key, value in model.state_dict().items()}
    broken["4.weight"][0, 0] = float("nan")
    spec = permutation_spec(model, x[:2])
    with pytest.raises(ValueError, match=r"activations/weights .*contain NaN or inf"):
        match_weights(spec, model.state_dict(), broken)
    with pytest.raises(ValueError, match=r"activations/weights .*contain NaN or inf"):
        match_activations(spec, model, [broken], [x])


def test_a_large_identity_bias_keeps_both_matchings_at_the_identity() -> None:
    model, x = warm_model("resnet20")
    spec = permutation_spec(model, x[:2])
    permuted, truth = permuted_copy(model, spec)
    identity = identity_permutations(spec)
    assert_same_permutations(
        match_weights(spec, model.state_dict(), permuted.state_dict(), identity_bias=1e9), identity
    )
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x], identity_bias=10.0)
    assert_same_permutations(found, identity)  # correlations are at most 1
    assert_recovers(match_weights(spec, model.state_dict(), permuted.state_dict(), identity_bias=0.0), truth)
