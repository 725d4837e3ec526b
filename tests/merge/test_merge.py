"""Merging free of Lightning (functional.py, state.py, batchnorm.py, matchers.py): align with the identity
matcher, state arithmetic, in-place loading, BatchNorm re-estimation, how data is read, unknown methods.

Identity, mean preservation, locality and plain models out (properties 3, 4, 5 and 8 of DESIGN.md §3) are
tested in tests/test_properties.py.
"""

from __future__ import annotations

import pytest
import torch
from permutation_helpers import permuted_copy, small_net, warm_model
from torch import nn

from lightning_dimat import ActivationMatcher, Matcher, align, merge, recompute_batchnorm, register_matcher
from lightning_dimat.merge import load_state_in_place, weighted_state
from lightning_dimat.permutation import permutation_spec
from lightning_dimat.permutation.context import PROBE_PLACEMENTS


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_align_with_average_returns_the_other_model_unchanged() -> None:
    reference, other = small_net(1), small_net(2)
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
    model = small_net(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    identities = [id(p) for p in model.parameters()]
    load_state_in_place(model, small_net(2).state_dict())
    assert [id(p) for p in model.parameters()] == identities
    assert optimizer.param_groups[0]["params"][0] is next(model.parameters())
    assert torch.equal(model[0].weight, small_net(2)[0].weight)
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
    assert recompute_batchnorm(small_net(0), [torch.randn(8, 4)] * 10, num_batches=3) == 3


def test_merge_reads_generators_once_and_exactly_num_batches() -> None:
    model, x = warm_model("mlp")
    permuted, _ = permuted_copy(model, permutation_spec(model, x[:2]))
    drawn: list[int] = []

    def batches():
        for index in range(10):
            drawn.append(index)
            yield x[index * 2 : index * 2 + 2], None

    merged = merge([model, permuted], [0.5, 0.5], method="activation", data=batches(), num_batches=3)
    assert drawn == [0, 1, 2]
    assert type(merged) is type(model)
    merge([model, permuted], method="weight", data=(x, torch.zeros(len(x))))  # an (x, y) tuple is one batch


def test_the_activation_matchers_probes_place_the_derived_spec() -> None:
    reference, other, x = (
        small_net(1),
        small_net(2),
        torch.randn(64, 4, generator=torch.Generator().manual_seed(0)),
    )
    aligned = {}
    for probes in PROBE_PLACEMENTS:
        explicit = align(reference, other, "activation", x, spec=permutation_spec(reference, x[:2], probes))
        aligned[probes] = align(reference, other, ActivationMatcher(probes=probes), x).state_dict()
        assert _same(aligned[probes], explicit.state_dict()), probes
    # (the placements observe different nodes here: BatchNorm output vs ReLU output, different alignments)
    assert not _same(aligned["pre_activation"], aligned["stage_output"])
    with pytest.raises(ValueError, match=r"probes must be .*'stage_output', got 'after_relu'"):
        ActivationMatcher(probes="after_relu")


def test_unknown_method_and_missing_data_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Unknown merge method 'activations'"):
        merge([small_net(1), small_net(2)], method="activations")

    @register_matcher("needs_data_for_test")
    class NeedsData(Matcher):
        requires_data = True

        def match(self, reference, states, data=None, **_):  # pragma: no cover - never called
            return [{} for _ in states]

    with pytest.raises(ValueError, match="needs `data=`"):
        merge([small_net(1), small_net(2)], method="needs_data_for_test")
