"""The properties that must hold (DESIGN.md §3), each stated once and tested here or named where it is tested.

1. Permutation invariance: any valid permutation of a supported model leaves its outputs unchanged (≤ 1e-4 in
   float32, eval mode) for MLP, plain CNN, ResNet-20, VGG16, ResNet-50 and torchvision's resnet18.
   Here: test_random_permutation_leaves_logits_unchanged (also ResNet-20 ×8 with 3×3 shortcuts).
   Elsewhere: permutation/test_tracing.py (torchvision ResNet-50, concatenation and gating, user op rules).
2. Recovery: matching a model against a randomly permuted copy of itself recovers the permutation exactly, by
   activation matching (before and after the nonlinearity) and by weight matching.
   Here: test_activation_matching_recovers_the_permutation_exactly (probes before and after the ReLU),
   test_weight_matching_recovers_the_permutation_exactly, test_align_returns_the_original_weights and
   test_merging_a_model_with_its_permuted_copy_gives_the_model (every model of property 1).
   Elsewhere: permutation/test_tracing.py (hand-written specs, user op rules), permutation/test_matching.py
   (sequences, a group on two axes of one tensor), callbacks/test_shared_basis.py (permuted copies of one
   model on a ring of 6 end with identical weights).
3. Identity: merging identical models, or merging with Π = I, returns the same weights.
   Here: test_merging_identical_agents_is_the_identity, test_weight_one_on_self_is_the_identity,
   test_average_merge_of_identical_agents_is_the_identity (in a Trainer).
4. Mean preservation: with method="average" and a doubly stochastic Π, a merge leaves the average of all
   agents' parameters unchanged.
   Here: test_average_preserves_the_mean_of_all_agents_under_a_doubly_stochastic_mixing,
   test_average_merge_preserves_the_mean_of_the_agents_parameters (in a Trainer).
5. Locality: agent i's merge reads only its own data and its neighbours' weights (and, for the shared basis,
   its tree neighbours' weights and permutation indices).
   Here: test_locality_agent_i_reads_only_its_neighbours,
   test_batchnorm_is_recomputed_on_each_agents_own_data_only,
   test_each_agent_merges_its_neighbours_aligned_by_the_method_on_its_own_data.
   Elsewhere: comm/test_transport.py::test_exchange_plans_are_symmetric_and_neighbour_only,
   strategy/test_scaleout.py::test_each_process_sends_only_its_agents_neighbours_needs. What building the
   shared basis reads has no test of its own; strategy/test_scaleout_methods.py::
   test_the_shared_basis_and_a_topology_schedule_on_two_processes_give_the_agents_of_one_process runs it
   across processes.
6. Same results at any scale-out: the same seed gives the same agents in one process and in W processes.
   Tested in strategy/test_scaleout.py (W = 2 in a subprocess, gloo; W = 1 in the test's process):
   test_two_processes_give_the_agents_of_one_process, test_checkpoints_move_between_process_counts,
   test_spawn_and_fork_launchers_hand_the_exported_module_back; and in strategy/test_scaleout_methods.py:
   test_fully_connected_uses_one_all_gather,
   test_the_shared_basis_and_a_topology_schedule_on_two_processes_give_the_agents_of_one_process,
   test_per_step_gossip_on_two_processes_gives_the_agents_of_one_process,
   test_int8_compression_on_two_processes_gives_the_agents_of_one_process.
7. Resume: stopping and resuming from a checkpoint gives the same final weights as an uninterrupted run.
   Here: test_resume_gives_the_same_final_weights_as_an_uninterrupted_run,
   test_a_checkpoint_written_by_version_0_1_resumes_to_the_weights_version_0_1_reached (tests/fixtures/).
   Elsewhere: callbacks/test_gossip.py::test_gossip_resumes_from_a_checkpoint_as_if_uninterrupted,
   callbacks/test_shared_basis.py::test_resuming_keeps_the_shared_basis_and_the_weights,
   strategy/test_scaleout.py::test_checkpoints_move_between_process_counts,
   swarm/test_random_streams.py::test_random_streams_round_trip_through_state_dict.
8. Plain models out: a merged agent is an instance of the user's class and loads into it with
   load_state_dict; an exported checkpoint loads with the user's load_from_checkpoint.
   Here: test_merge_returns_a_plain_model_of_the_input_class, test_export_agent_into_user_module,
   test_export_consensus_is_the_average_of_agent_parameters,
   test_the_exported_module_saves_and_loads_with_load_from_checkpoint.
   Elsewhere: strategy/test_lightning_integration.py::test_layers_built_in_configure_model_are_exported,
   strategy/test_scaleout.py::test_spawn_and_fork_launchers_hand_the_exported_module_back.
9. Entering a basis changes nothing: permuting an agent (weights, buffers, optimizer state) leaves its outputs
   and its next optimizer step unchanged.
   Here: test_permuting_a_model_and_its_optimizer_state_changes_no_output_and_no_next_step (MLP and
   ResNet-20; SGD with momentum and Adam).
   Elsewhere: callbacks/test_shared_basis.py::
   test_entering_the_shared_basis_changes_no_function_and_no_next_step (in a Trainer, SGD with momentum),
   permutation/test_apply.py::test_optimizer_state_is_permuted_with_the_model.
10. Bad agents stay contained: a non-finite agent never reaches a neighbour, the consensus or the export.
    Not built yet (issue 11): no test.

Paths are relative to tests/.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BlobsData,
    TinyNet,
    agent_states,
    checkpoint_of_epoch,
    fit_merging_ring,
    make_trainer,
)
from lightning.pytorch import Callback, LightningModule, Trainer
from permutation_helpers import ARCHITECTURES, assert_recovers, permuted_copy, small_net, warm_model
from torch import Tensor, nn

from lightning_dimat import (
    ActivationMatcher,
    DIMATStrategy,
    MergeCallback,
    align,
    build_topology,
    merge,
    recompute_batchnorm,
)
from lightning_dimat.merge import combine, matcher_spec, merge_into_basis, resolve_matcher
from lightning_dimat.permutation import (
    PermutationSpec,
    match_activations,
    match_weights,
    permutation_spec,
    permute_optimizer_state,
    permute_state,
    random_permutations,
)
from lightning_dimat.permutation.cache import spec_for
from lightning_dimat.permutation.verify import check_spec
from lightning_dimat.strategy.strategy import batches_done_mid_epoch

FIXTURES = Path(__file__).parent / "fixtures"


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _merge_round(states: dict[int, dict[str, Tensor]], mixing: np.ndarray) -> dict[int, dict]:
    """One synchronous round of the callback's update with method "average": x_i <- Σ_j π_ij x_j."""
    topology = build_topology(mixing, len(states))
    merged = {}
    for i in states:
        weights = topology.weights(i)
        neighbours = sorted(j for j in weights if j != i)
        merged[i], _ = merge_into_basis(
            small_net(0),
            states[i],
            [states[j] for j in neighbours],
            [weights[j] for j in [i, *neighbours]],
            resolve_matcher("average"),
        )
    return merged


class _Snapshots(Callback):
    """Copies every agent's state right before the merge callback runs (it must come first in the list)."""

    def __init__(self) -> None:
        self.before: list[dict[int, dict[str, Tensor]]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.is_last_batch:
            swarm = trainer.strategy.swarm
            self.before.append(
                {
                    g: {k: v.detach().clone() for k, v in agent.state_dict().items()}
                    for g, agent in swarm.items()
                }
            )


class _Frozen(TinyNet):
    """lr = 0: training leaves weights alone, so the state after fit is the state after the last merge."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


# ------------------------------------------------------------- 1. permutation invariance, 2. recovery


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Tensor, PermutationSpec]:
    model, x = warm_model(request.param)
    return request.param, model, x, permutation_spec(model, x[:2])


def test_random_permutation_leaves_logits_unchanged(case) -> None:  # type: ignore[no-untyped-def]
    name, model, x, spec = case
    assert spec.group_sizes, name
    for seed in range(2):  # float64 and randomised state: only the order of sums differs (relative 1e-9)
        check_spec(model, spec, x[:4], seed=seed, tolerance=1e-9)
    fresh = ARCHITECTURES[name][0]().eval()  # float32, default initialisation: logits of ordinary size
    assert check_spec(fresh, spec, x[:4], dtype=None, randomise=False) <= 1e-4


@pytest.mark.parametrize("probes", ["pre_activation", "stage_output"])
def test_activation_matching_recovers_the_permutation_exactly(case, probes: str) -> None:  # type: ignore[no-untyped-def]
    # After a ReLU ("stage_output") some units are zero on every input (VGG16's classifier: 11 and 16 of
    # 64) or active on the same few inputs: their correlations tie, and their weights decide
    # (activation.TIE_BREAK).
    _, model, x, _ = case
    spec = permutation_spec(model, x[:2], probes)
    permuted, truth = permuted_copy(model, spec)
    (found,) = match_activations(spec, model, [permuted.state_dict()], [x])
    assert_recovers(found, truth)


def test_weight_matching_recovers_the_permutation_exactly(case) -> None:  # type: ignore[no-untyped-def]
    _, model, _, spec = case
    permuted, truth = permuted_copy(model, spec)
    found = match_weights(spec, model.state_dict(), permuted.state_dict())
    assert_recovers(found, truth)


# Weight matching on ResNet-50 (its slowest case) is covered by the recovery test above; aligning and merging
# add only permuting and averaging, which the other architectures cover for both matchings.
ALIGN_CASES = [
    (name, method)
    for name in ARCHITECTURES
    for method in ("activation", "weight")
    if (name, method) != ("resnet50", "weight")
]


@pytest.mark.parametrize(("case", "method"), ALIGN_CASES, indirect=["case"])
def test_align_returns_the_original_weights(case, method: str) -> None:  # type: ignore[no-untyped-def]
    _, model, x, spec = case
    permuted, _ = permuted_copy(model, spec)
    aligned = align(model, permuted, method=method, data=x)
    assert type(aligned) is type(model)
    for key, value in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value), key


@pytest.mark.parametrize(("case", "method"), ALIGN_CASES, indirect=["case"])
def test_merging_a_model_with_its_permuted_copy_gives_the_model(case, method: str) -> None:  # type: ignore[no-untyped-def]
    _, model, x, spec = case
    permuted, _ = permuted_copy(model, spec)
    merged = merge([model, permuted], [0.5, 0.5], method=method, data=[(x, None)])
    assert type(merged) is type(model)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    expected = copy.deepcopy(model)
    recompute_batchnorm(expected, [(x, None)])
    for key, value in expected.state_dict().items():
        assert torch.allclose(merged.state_dict()[key].float(), value.float(), atol=1e-5), key


# --------------------------------------------------------------------------------------------- 3. identity


def test_merging_identical_agents_is_the_identity() -> None:
    state = small_net(3).state_dict()
    merged = _merge_round({i: copy.deepcopy(state) for i in range(5)}, build_topology("ring", 5).mixing)
    for i in merged:
        for key in state:
            assert torch.allclose(merged[i][key], state[key], atol=1e-6)


def test_weight_one_on_self_is_the_identity() -> None:
    model = small_net(1)
    merged = merge([model, small_net(2)], [1.0, 0.0], method="average")
    assert _same(merged.state_dict(), model.state_dict())


def test_average_merge_of_identical_agents_is_the_identity() -> None:
    snapshots = _Snapshots()
    merge = MergeCallback(every_n_epochs=1, method="average", recompute_batchnorm=False)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, agent_init="copy"), callbacks=[snapshots, merge], max_epochs=1
    )
    trainer.fit(_Frozen(), datamodule=BlobsData())
    before, after = snapshots.before[-1], agent_states(trainer)
    parameters = [name for name, _ in trainer.strategy.swarm.agent(0).named_parameters()]
    for g in range(3):
        for key in parameters:  # (BatchNorm buffers differ: each agent ran forward passes on its own data)
            assert torch.allclose(after[g][key], before[g][key], atol=1e-6)


# --------------------------------------------------------------------------------- 4. mean preservation


@pytest.mark.parametrize("topology", ["ring", "fully_connected", "star", "exponential"])
def test_average_preserves_the_mean_of_all_agents_under_a_doubly_stochastic_mixing(topology: str) -> None:
    states = {i: small_net(i).state_dict() for i in range(6)}
    mixing = build_topology(topology, 6).mixing
    merged = _merge_round(states, mixing)
    for key in states[0]:
        if not torch.is_floating_point(states[0][key]):
            continue
        before = torch.stack([states[i][key] for i in states]).mean(0)
        after = torch.stack([merged[i][key] for i in merged]).mean(0)
        assert torch.allclose(before, after, atol=1e-6), key


@pytest.mark.parametrize("topology", ["ring", "fully_connected", "star"])
def test_average_merge_preserves_the_mean_of_the_agents_parameters(topology: str) -> None:
    snapshots = _Snapshots()
    merge = MergeCallback(every_n_epochs=1, method="average", recompute_batchnorm=False)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=4, topology=topology), callbacks=[snapshots, merge], max_epochs=1
    )
    trainer.fit(_Frozen(), datamodule=BlobsData())
    before, after = snapshots.before[-1], agent_states(trainer)
    mixing = trainer.strategy.topology.mixing
    for key, value in before[0].items():
        if not torch.is_floating_point(value):
            continue
        mean_before = torch.stack([before[g][key] for g in range(4)]).mean(0)
        mean_after = torch.stack([after[g][key] for g in range(4)]).mean(0)
        assert torch.allclose(mean_before, mean_after, atol=1e-6), key
        expected_0 = sum(float(mixing[0, j]) * before[j][key] for j in range(4))
        assert torch.allclose(after[0][key], expected_0, atol=1e-6), key


# ------------------------------------------------------------------------------------------- 5. locality


def test_locality_agent_i_reads_only_its_neighbours() -> None:
    states = {i: small_net(i).state_dict() for i in range(5)}
    merged = _merge_round(states, build_topology("ring", 5).mixing)
    # Changing a non-neighbour of agent 0 (agent 2) must not change agent 0's merge.
    changed = dict(states)
    changed[2] = small_net(99).state_dict()
    merged_again = _merge_round(changed, build_topology("ring", 5).mixing)
    assert torch.equal(merged[0]["0.weight"], merged_again[0]["0.weight"])
    assert not torch.equal(merged[1]["0.weight"], merged_again[1]["0.weight"])
    expected = (states[0]["0.weight"] + states[1]["0.weight"] + states[4]["0.weight"]) / 3
    assert torch.allclose(merged[0]["0.weight"], expected, atol=1e-6)


class _BatchNormProbe(TinyNet):
    """Counts the samples whose features went through forward in train mode with gradients off (BN passes)."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.recalibration_ids: set[int] = set()

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not torch.is_grad_enabled():
            self.recalibration_ids.update(x[:, 0].long().tolist())
        return super().forward(x)


def test_batchnorm_is_recomputed_on_each_agents_own_data_only() -> None:
    points, labels = BlobsData().train_set.tensors
    points = points.clone()
    points[:, 0] = torch.arange(len(points), dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(points, labels), batch_size=16)
    merge = MergeCallback(every_n_epochs=1, num_batches=2)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, partition="by_class"), callbacks=[merge], max_epochs=1
    )
    trainer.fit(_BatchNormProbe(), loader)
    for agent_id, agent in trainer.strategy.swarm.items():
        shard = set(trainer.strategy.shards[agent_id].tolist())
        assert agent.recalibration_ids and agent.recalibration_ids <= shard
        assert len(agent.recalibration_ids) <= 2 * 16


class _SmallCNN(TinyNet):
    """Convolutions on the 8 features seen as a 2×2×2 image."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_dimat.models import small_cnn

        self.net = nn.Sequential(nn.Unflatten(1, (2, 2, 2)), small_cnn(in_channels=2, num_classes=4, width=8))


@pytest.mark.parametrize("method", ["activation", "weight", "average"])
def test_each_agent_merges_its_neighbours_aligned_by_the_method_on_its_own_data(method: str) -> None:
    snapshots = _Snapshots()
    merge = MergeCallback(every_n_epochs=1, method=method, num_batches=2, basis="own")
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), callbacks=[snapshots, merge], max_epochs=1)
    trainer.fit(_SmallCNN(), datamodule=BlobsData())
    before, strategy = snapshots.before[-1], trainer.strategy
    for agent_id, agent in strategy.swarm.items():
        weights = strategy.topology.weights(agent_id)
        neighbours = [j for j in sorted(weights) if j != agent_id]
        reference = copy.deepcopy(agent)
        reference.load_state_dict(before[agent_id])
        data = list(strategy.local_batches(agent_id, 2))  # the same two batches the merge used
        matcher = resolve_matcher(method)
        spec = matcher_spec(matcher, reference, data)
        found = matcher.match(reference, [before[j] for j in neighbours], data, spec=spec)
        expected = combine(
            [before[j] for j in [agent_id, *neighbours]],
            [weights[j] for j in [agent_id, *neighbours]],
            found,
            spec,
        )
        for name, parameter in agent.named_parameters():  # (BatchNorm buffers were re-estimated)
            assert torch.allclose(parameter, expected[name], atol=1e-6), (method, agent_id, name)
    assert float(trainer.callback_metrics["merge/round"]) == 1.0


# --------------------------------------------------------------------------------------------- 7. resume


def test_resume_gives_the_same_final_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted = fit_merging_ring(5, checkpoints=tmp_path)
    # epoch index 2: after the first merge (epoch 1) and mid-way to the next one (epoch 3).
    resumed = fit_merging_ring(5, ckpt_path=checkpoint_of_epoch(tmp_path, 2))
    expected, actual = agent_states(uninterrupted), agent_states(resumed)
    for agent_id in expected:
        for key in expected[agent_id]:
            assert torch.equal(expected[agent_id][key], actual[agent_id][key]), (agent_id, key)
    assert resumed.global_step == uninterrupted.global_step
    merge = next(c for c in resumed.callbacks if isinstance(c, MergeCallback))
    assert merge.merged_epochs == [1, 3] and merge.round == 2


def test_resume_from_a_mid_epoch_checkpoint_gives_the_same_final_weights(tmp_path: Path) -> None:
    # Before, the resumed epoch started its batches over: max |Δ| = 0.052 against the uninterrupted run.
    uninterrupted = fit_merging_ring(4, checkpoints=tmp_path, every_n_train_steps=3)
    middles = {
        path: batches_done_mid_epoch(torch.load(path, weights_only=True)) for path in tmp_path.iterdir()
    }
    path = max((p for p, done in middles.items() if done), key=lambda p: p.stat().st_mtime)  # after a merge
    resumed = fit_merging_ring(4, ckpt_path=path)
    expected, actual = agent_states(uninterrupted), agent_states(resumed)
    for agent_id in expected:
        for key in expected[agent_id]:
            assert torch.equal(expected[agent_id][key], actual[agent_id][key]), (path.name, agent_id, key)
    assert resumed.global_step == uninterrupted.global_step


def test_a_checkpoint_written_by_version_0_1_resumes_to_the_weights_version_0_1_reached(
    tmp_path: Path,
) -> None:
    """``fixtures/`` holds a checkpoint written by the package before its restructuring into layered
    packages (3 agents, ring, activation merges, epoch 2) and the agents that version reached resuming it to
    epoch 4: the current code must load it and reach the same agents.

    The fixture was written on 2 CPU threads; on another thread count float sums are ordered differently
    (on 1 thread the agents differ by up to 4.8e-7 after two epochs), so the test runs on 2 threads and allows
    1e-6 — a checkpoint loaded wrongly would be off by orders of magnitude more.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = _resume_version_0_1_fixture()
    finally:
        torch.set_num_threads(threads)
    expected = torch.load(FIXTURES / "dimat_v0_1_resumed_epoch4.pt", weights_only=True)
    actual = agent_states(trainer)
    assert sorted(actual) == sorted(expected) == [0, 1, 2]
    for agent_id in expected:
        for key in expected[agent_id]:
            torch.testing.assert_close(actual[agent_id][key], expected[agent_id][key], atol=1e-6, rtol=0)
    merge = next(c for c in trainer.callbacks if isinstance(c, MergeCallback))
    assert merge.merged_epochs == [1, 3] and merge.round == 2


def test_resuming_version_0_1_with_todays_default_basis_is_refused_naming_it() -> None:
    # Version 0.1 had no basis option: its agents stayed in their own bases and re-matched every round.
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class"),
        callbacks=[MergeCallback(every_n_epochs=2, method="activation", num_batches=2)],
        max_epochs=4,
    )
    with pytest.raises(ValueError, match=r"basis \(checkpoint: 'own', this run: 'shared'\).*resume_changes"):
        trainer.fit(TinyNet(), datamodule=BlobsData(), ckpt_path=FIXTURES / "dimat_v0_1_epoch2.ckpt")


def test_resuming_version_0_1_with_other_probes_is_refused_naming_them() -> None:
    # Version 0.1 recorded no method; matching activations, it observed them before the ReLU.
    after_the_relu = ActivationMatcher(probes="stage_output")
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class"),
        callbacks=[MergeCallback(every_n_epochs=2, method=after_the_relu, num_batches=2, basis="own")],
        max_epochs=4,
    )
    with pytest.raises(
        ValueError, match=r"method \(checkpoint: .*'pre_activation'.*this run: .*'stage_output'"
    ):
        trainer.fit(TinyNet(), datamodule=BlobsData(), ckpt_path=FIXTURES / "dimat_v0_1_epoch2.ckpt")


def _resume_version_0_1_fixture() -> Trainer:
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class"),
        callbacks=[MergeCallback(every_n_epochs=2, method="activation", num_batches=2, basis="own")],
        max_epochs=4,
    )
    trainer.fit(
        TinyNet(momentum=0.9, dropout=0.3),
        datamodule=BlobsData(),
        ckpt_path=FIXTURES / "dimat_v0_1_epoch2.ckpt",
    )
    return trainer


# -------------------------------------------------------------------------------------- 8. plain models out


def test_merge_returns_a_plain_model_of_the_input_class() -> None:
    class Custom(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.body = small_net(seed)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    models = [Custom(1), Custom(2)]
    merged = merge(models, [0.5, 0.5], method="average", data=torch.randn(32, 4))
    assert type(merged) is Custom
    Custom(5).load_state_dict(merged.state_dict(), strict=True)
    expected = (models[0].body[0].weight + models[1].body[0].weight) / 2
    assert torch.allclose(merged.body[0].weight, expected)
    assert merged is not models[0] and models[0].body[0].weight.data_ptr() != merged.body[0].weight.data_ptr()


def test_export_agent_into_user_module() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3, export=1))
    model = TinyNet()
    trainer.fit(model, datamodule=BlobsData())
    agent = trainer.strategy.swarm.agent(1)
    for key, value in agent.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_export_consensus_is_the_average_of_agent_parameters() -> None:
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3))
    model = TinyNet()
    trainer.fit(model, datamodule=BlobsData())
    swarm = trainer.strategy.swarm
    for name, parameter in model.named_parameters():
        mean = torch.stack([agent.get_parameter(name) for _, agent in swarm.items()]).mean(dim=0)
        assert torch.allclose(parameter, mean, atol=1e-6)
    assert not torch.equal(model.net[1].running_mean, swarm.agent(0).net[1].running_mean)


def test_the_exported_module_saves_and_loads_with_load_from_checkpoint(tmp_path: Path) -> None:
    merge = MergeCallback(every_n_epochs=1, method="activation", num_batches=2)
    trainer = make_trainer(strategy=DIMATStrategy(num_agents=3), callbacks=[merge], max_epochs=1)
    model = TinyNet(lr=0.05, momentum=0.9, dropout=0.2)
    trainer.fit(model, datamodule=BlobsData())
    assert type(model) is TinyNet
    plain = make_trainer()  # the user's own single-process Trainer, no DIMAT
    plain.validate(model, datamodule=BlobsData(), verbose=False)
    plain.save_checkpoint(tmp_path / "exported.ckpt")
    loaded = TinyNet.load_from_checkpoint(tmp_path / "exported.ckpt")
    assert type(loaded) is TinyNet and dict(loaded.hparams) == {"lr": 0.05, "momentum": 0.9, "dropout": 0.2}
    assert _same(loaded.state_dict(), model.state_dict())


# ----------------------------------------------------------------------------- 9. entering a basis


def _sgd_momentum(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)


def _adam(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=0.01)


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
@pytest.mark.parametrize(
    ("make_optimizer", "dtype"),
    [(_sgd_momentum, torch.float32), (_adam, torch.float64)],
    ids=["sgd_momentum", "adam"],
)
def test_permuting_a_model_and_its_optimizer_state_changes_no_output_and_no_next_step(
    name: str, make_optimizer: Callable[[Any], torch.optim.Optimizer], dtype: torch.dtype
) -> None:
    """A model that took one step (so momentum or Adam's moments exist) is permuted in place, optimizer state
    included: its eval outputs stay, and its next step lands on the permuted next step of the original.

    Adam runs in float64: a gradient that is zero but for rounding (the bias of a layer that BatchNorm
    follows) is normalised by Adam into a step of about lr whose sign is the rounding's, which in float32
    differs between the two orders of summation by far more than 1e-6."""
    build, shape = ARCHITECTURES[name]  # resnet20: width 1, 16×16 images
    torch.manual_seed(0)
    model = build().to(dtype)
    x, y = torch.randn(16, *shape, dtype=dtype), torch.arange(16) % 5

    def step(network: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        network.train()
        optimizer.zero_grad()
        F.cross_entropy(network(x), y).backward()
        optimizer.step()

    optimizer = make_optimizer(model.parameters())
    step(model, optimizer)  # the state the permutation must carry along: momentum buffers, Adam moments
    spec = spec_for(model, x)
    twin = copy.deepcopy(model)
    twin_optimizer = make_optimizer(twin.parameters())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    permutations = random_permutations(spec, torch.Generator().manual_seed(1))
    permute_optimizer_state(twin_optimizer, twin, spec, permutations)
    twin.load_state_dict(permute_state(twin.state_dict(), spec, permutations))  # in place: same parameters
    assert any(not torch.equal(twin.state_dict()[key], model.state_dict()[key]) for key in spec.axes)
    with torch.no_grad():
        assert float((twin.eval()(x) - model.eval()(x)).abs().max()) <= 1e-4

    step(model, optimizer)
    step(twin, twin_optimizer)
    expected = permute_state(model.state_dict(), spec, permutations)
    for key, value in twin.state_dict().items():  # parameters and BatchNorm buffers
        assert float((value.double() - expected[key].double()).abs().max()) <= 1e-6, key
