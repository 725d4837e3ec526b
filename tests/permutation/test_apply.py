"""Applying permutations (apply.py): optimizer state permuted with its model, composition and inversion.

That permuting a model and its optimizer state in place changes neither its outputs nor its next optimizer
step is property 9 of DESIGN.md §3: tests/test_properties.py.
"""

from __future__ import annotations

import pytest
import torch
from permutation_helpers import ARCHITECTURES, assert_same_permutations, warm_model

from lightning_dimat.permutation import (
    compose,
    identity_permutations,
    invert,
    invert_permutations,
    permutation_spec,
    permute_optimizer_state,
    permute_state,
    random_permutations,
)


def test_optimizer_state_is_permuted_with_the_model() -> None:
    model, x = warm_model("mlp")
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


# ------------------------------------------------------------------------------- composing permutations


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_compose_with_the_inverse_is_the_identity(name: str) -> None:
    build, shape = ARCHITECTURES[name]
    spec = permutation_spec(build(), torch.randn(2, *shape))
    permutations = random_permutations(spec, torch.Generator().manual_seed(0))
    inverse = invert_permutations(permutations)
    assert_same_permutations(compose(permutations, inverse), identity_permutations(spec))
    assert_same_permutations(compose(inverse, permutations), identity_permutations(spec))
    assert_same_permutations(compose(permutations, {}), permutations)  # missing groups: the identity
    assert_same_permutations(compose({}, permutations), permutations)
    for group, permutation in permutations.items():
        assert torch.equal(inverse[group], invert(permutation)), group


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_permuting_twice_is_permuting_by_the_composition(name: str) -> None:
    build, shape = ARCHITECTURES[name]
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
