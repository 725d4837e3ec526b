"""Merge math (DESIGN.md §3): identity, mean preservation, locality, plain models out, BatchNorm."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lightning_dimat import (
    Matcher,
    align,
    build_topology,
    merge,
    recompute_batchnorm,
    register_matcher,
)
from lightning_dimat.merge import load_state_in_place, merge_into_basis, resolve_matcher, weighted_state


def _net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _merge_round(states: dict[int, dict[str, torch.Tensor]], mixing: np.ndarray) -> dict[int, dict]:
    """One synchronous round of the callback's update with method "average": x_i <- Σ_j π_ij x_j."""
    topology = build_topology(mixing, len(states))
    merged = {}
    for i in states:
        weights = topology.weights(i)
        neighbours = sorted(j for j in weights if j != i)
        merged[i], _ = merge_into_basis(
            _net(0),
            states[i],
            [states[j] for j in neighbours],
            [weights[j] for j in [i, *neighbours]],
            resolve_matcher("average"),
        )
    return merged


@pytest.mark.parametrize("topology", ["ring", "fully_connected", "star", "exponential"])
def test_average_preserves_the_mean_of_all_agents_under_a_doubly_stochastic_mixing(topology: str) -> None:
    states = {i: _net(i).state_dict() for i in range(6)}
    mixing = build_topology(topology, 6).mixing
    merged = _merge_round(states, mixing)
    for key in states[0]:
        if not torch.is_floating_point(states[0][key]):
            continue
        before = torch.stack([states[i][key] for i in states]).mean(0)
        after = torch.stack([merged[i][key] for i in merged]).mean(0)
        assert torch.allclose(before, after, atol=1e-6), key


def test_merging_identical_agents_is_the_identity() -> None:
    state = _net(3).state_dict()
    merged = _merge_round({i: copy.deepcopy(state) for i in range(5)}, build_topology("ring", 5).mixing)
    for i in merged:
        for key in state:
            assert torch.allclose(merged[i][key], state[key], atol=1e-6)


def test_weight_one_on_self_is_the_identity() -> None:
    model = _net(1)
    merged = merge([model, _net(2)], [1.0, 0.0], method="average")
    assert _same(merged.state_dict(), model.state_dict())


def test_locality_agent_i_reads_only_its_neighbours() -> None:
    states = {i: _net(i).state_dict() for i in range(5)}
    merged = _merge_round(states, build_topology("ring", 5).mixing)
    # Changing a non-neighbour of agent 0 (agent 2) must not change agent 0's merge.
    changed = dict(states)
    changed[2] = _net(99).state_dict()
    merged_again = _merge_round(changed, build_topology("ring", 5).mixing)
    assert torch.equal(merged[0]["0.weight"], merged_again[0]["0.weight"])
    assert not torch.equal(merged[1]["0.weight"], merged_again[1]["0.weight"])
    expected = (states[0]["0.weight"] + states[1]["0.weight"] + states[4]["0.weight"]) / 3
    assert torch.allclose(merged[0]["0.weight"], expected, atol=1e-6)


def test_merge_returns_a_plain_model_of_the_input_class() -> None:
    class Custom(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.body = _net(seed)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    models = [Custom(1), Custom(2)]
    merged = merge(models, [0.5, 0.5], method="average", data=torch.randn(32, 4))
    assert type(merged) is Custom
    Custom(5).load_state_dict(merged.state_dict(), strict=True)
    expected = (models[0].body[0].weight + models[1].body[0].weight) / 2
    assert torch.allclose(merged.body[0].weight, expected)
    assert merged is not models[0] and models[0].body[0].weight.data_ptr() != merged.body[0].weight.data_ptr()


def test_align_with_average_returns_the_other_model_unchanged() -> None:
    reference, other = _net(1), _net(2)
    aligned = align(reference, other, method="average")
    assert type(aligned) is type(other) and aligned is not other
    assert _same(aligned.state_dict(), other.state_dict())


def test_weighted_state_keeps_integer_buffers_of_the_first_state_and_float64() -> None:
    a = {"w": torch.ones(2, dtype=torch.float64), "n": torch.tensor(3)}
    b = {"w": torch.zeros(2, dtype=torch.float64), "n": torch.tensor(9)}
    merged = weighted_state([a, b], [0.25, 0.75])
    assert merged["w"].dtype == torch.float64 and torch.equal(
        merged["w"], torch.full((2,), 0.25, dtype=torch.float64)
    )
    assert merged["n"].item() == 3


def test_weighted_state_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="2 states but 1 weights"):
        weighted_state([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [1.0])
    with pytest.raises(ValueError, match="keys"):
        weighted_state([{"w": torch.ones(1)}, {"v": torch.ones(1)}], [0.5, 0.5])


def test_load_state_in_place_keeps_parameter_identity_for_optimizers() -> None:
    model = _net(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    identities = [id(p) for p in model.parameters()]
    load_state_in_place(model, _net(2).state_dict())
    assert [id(p) for p in model.parameters()] == identities
    assert optimizer.param_groups[0]["params"][0] is next(model.parameters())
    assert torch.equal(model[0].weight, _net(2)[0].weight)
    with pytest.raises(KeyError, match="missing"):
        load_state_in_place(model, {"0.weight": torch.zeros(6, 4)})


def test_recompute_batchnorm_gives_the_exact_statistics_of_the_data_and_restores_momentum() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    model.eval()
    batches = [(torch.randn(16, 3) * 2 + 1, torch.zeros(16)) for _ in range(4)]
    used = recompute_batchnorm(model, batches)
    data = torch.cat([x for x, _ in batches])
    assert used == 4
    assert torch.allclose(model[0].running_mean, data.mean(0), atol=1e-5)
    per_batch_var = torch.stack([x.var(0, unbiased=True) for x, _ in batches]).mean(0)
    assert torch.allclose(model[0].running_var, per_batch_var, atol=1e-5)
    assert model[0].momentum == 0.1 and not model.training


def test_recompute_batchnorm_reads_no_data_without_batchnorm_and_limits_batches() -> None:
    def exploding():
        raise AssertionError("data was read")
        yield

    assert recompute_batchnorm(nn.Linear(2, 2), exploding()) == 0
    assert recompute_batchnorm(_net(0), [torch.randn(8, 4)] * 10, num_batches=3) == 3


def test_unknown_method_and_missing_data_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Unknown merge method 'activations'"):
        merge([_net(1), _net(2)], method="activations")

    @register_matcher("needs_data_for_test")
    class NeedsData(Matcher):
        requires_data = True

        def match(self, reference, states, data=None, **_):  # pragma: no cover - never called
            return [{} for _ in states]

    with pytest.raises(ValueError, match="needs `data=`"):
        merge([_net(1), _net(2)], method="needs_data_for_test")
