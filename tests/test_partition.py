"""Tests for lightning_dimat.partition: the schemes, their validation and reading dataset labels."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from lightning_dimat.partition import (
    PARTITIONS,
    dataset_labels,
    partition,
    register_partition,
    shard_sizes_table,
)

_SHUFFLE = np.random.default_rng(123)
BALANCED = _SHUFFLE.permutation(np.repeat(np.arange(10), 50))  # 10 classes x 50, in mixed order
UNEQUAL = _SHUFFLE.permutation(np.repeat(np.arange(10), [5, 17, 30, 8, 41, 3, 22, 60, 11, 2]))

SCHEMES: list[tuple[str, dict[str, Any]]] = [
    ("iid", {}),
    ("by_class", {}),
    ("by_class", {"shuffle_classes": True}),
    ("dirichlet", {"alpha": 0.5}),
    ("shards", {"shards_per_agent": 2}),
]
SCHEME_IDS = [f"{name}{'-' + '-'.join(map(str, opts.values())) if opts else ''}" for name, opts in SCHEMES]


def class_counts(shards: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """(agents, classes) matrix of per-agent sample counts."""
    return np.stack([np.bincount(labels[s], minlength=labels.max() + 1) for s in shards])


def class_sets(shards: list[np.ndarray], labels: np.ndarray) -> list[set[int]]:
    return [set(np.unique(labels[s]).tolist()) for s in shards]


# --- properties every scheme must have --------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "options"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("labels", [BALANCED, UNEQUAL], ids=["balanced", "unequal"])
@pytest.mark.parametrize("num_agents", [2, 3, 5, 7])
def test_every_scheme_returns_a_sorted_int64_partition(
    scheme: str, options: dict[str, Any], labels: np.ndarray, num_agents: int
) -> None:
    shards = partition(labels, num_agents, scheme, seed=1, **options)
    assert len(shards) == num_agents
    for s in shards:
        assert s.dtype == np.int64 and s.ndim == 1 and len(s) > 0
        assert np.all(np.diff(s) > 0)  # sorted, no duplicates within a shard
    everything = np.concatenate(shards)
    assert len(everything) == len(labels)  # disjoint ...
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))  # ... and complete


@pytest.mark.parametrize(("scheme", "options"), SCHEMES, ids=SCHEME_IDS)
def test_every_scheme_is_deterministic_and_ignores_global_rng(scheme: str, options: dict[str, Any]) -> None:
    np.random.seed(1)
    torch.manual_seed(1)
    first = partition(UNEQUAL, 4, scheme, seed=7, **options)
    np.random.seed(2)
    torch.manual_seed(2)
    np.random.rand(10)
    second = partition(UNEQUAL, 4, scheme, seed=7, **options)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    ("scheme", "options", "labels", "num_agents"),
    [
        ("iid", {}, BALANCED, 4),
        ("dirichlet", {"alpha": 0.5}, BALANCED, 4),
        ("shards", {}, BALANCED, 4),
        ("by_class", {"shuffle_classes": True}, BALANCED, 5),
        ("by_class", {}, np.repeat(np.arange(3), 20), 6),  # K < N: the within-class slices are random
    ],
)
def test_seed_changes_the_split_where_randomness_matters(
    scheme: str, options: dict[str, Any], labels: np.ndarray, num_agents: int
) -> None:
    a = partition(labels, num_agents, scheme, seed=0, **options)
    b = partition(labels, num_agents, scheme, seed=1, **options)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_by_class_without_shuffling_ignores_the_seed_when_classes_cover_agents() -> None:
    a = partition(BALANCED, 5, "by_class", seed=0)
    b = partition(BALANCED, 5, "by_class", seed=99)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_labels_may_be_a_list_array_or_tensor() -> None:
    expected = partition(UNEQUAL, 3, "iid", seed=4)
    for labels in (UNEQUAL.tolist(), torch.from_numpy(UNEQUAL), UNEQUAL.astype(np.int32)):
        got = partition(labels, 3, "iid", seed=4)
        assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))


# --- iid ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [BALANCED, UNEQUAL], ids=["balanced", "unequal"])
@pytest.mark.parametrize("num_agents", [2, 3, 4, 7])
def test_iid_gives_every_agent_an_equal_share_of_every_class(labels: np.ndarray, num_agents: int) -> None:
    shards = partition(labels, num_agents, "iid", seed=3)
    counts = class_counts(shards, labels)
    class_sizes = np.bincount(labels)
    assert np.all(np.abs(counts - class_sizes / num_agents) < 1)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


# --- by_class -------------------------------------------------------------------------------------


def test_by_class_ten_classes_five_agents_gives_two_whole_classes_each() -> None:
    shards = partition(BALANCED, 5, "by_class")
    assert class_sets(shards, BALANCED) == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}]
    assert all(len(s) == 100 for s in shards)  # whole classes


def test_by_class_ten_classes_three_agents_gives_blocks_of_four_three_three() -> None:
    shards = partition(UNEQUAL, 3, "by_class")
    assert class_sets(shards, UNEQUAL) == [{0, 1, 2, 3}, {4, 5, 6}, {7, 8, 9}]
    class_sizes = np.bincount(UNEQUAL)
    assert [len(s) for s in shards] == [class_sizes[:4].sum(), class_sizes[4:7].sum(), class_sizes[7:].sum()]


def test_by_class_fewer_classes_than_agents_splits_each_class_within_a_group() -> None:
    labels = _SHUFFLE.permutation(np.repeat(np.arange(3), [20, 21, 9]))
    shards = partition(labels, 6, "by_class", seed=5)
    assert class_sets(shards, labels) == [{0}, {0}, {1}, {1}, {2}, {2}]  # one class per agent
    for cls, pair in enumerate([(0, 1), (2, 3), (4, 5)]):
        a, b = (shards[g] for g in pair)
        assert not np.intersect1d(a, b).size
        assert np.array_equal(np.union1d(a, b), np.flatnonzero(labels == cls))
        assert abs(len(a) - len(b)) <= 1


def test_by_class_names_the_agent_left_without_samples() -> None:
    # 3 classes, 7 agents: class 0 -> agents 0-2, class 1 -> agents 3-4, class 2 -> agents 5-6.
    labels = np.repeat(np.arange(3), [10, 10, 1])
    with pytest.raises(
        ValueError, match=r"by_class with 3 classes and 7 agents leaves agent 6 without samples"
    ):
        partition(labels, 7, "by_class")


def test_by_class_shuffle_classes_permutes_the_class_blocks() -> None:
    groupings = []
    for seed in range(4):
        shards = partition(BALANCED, 5, "by_class", seed=seed, shuffle_classes=True)
        assert all(len(s) == 100 for s in shards)  # still two whole classes each
        groupings.append(class_sets(shards, BALANCED))
    assert any(g != [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}] for g in groupings)
    assert len({str(g) for g in groupings}) > 1


# --- dirichlet ------------------------------------------------------------------------------------


def test_dirichlet_alpha_controls_the_label_skew() -> None:
    labels = np.repeat(np.arange(10), 200)
    num_agents = 5

    def dominant_fraction(alpha: float) -> float:
        counts = class_counts(partition(labels, num_agents, "dirichlet", seed=0, alpha=alpha), labels)
        return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))

    assert dominant_fraction(0.05) > 0.4  # a few classes dominate each agent
    near_iid = class_counts(partition(labels, num_agents, "dirichlet", seed=0, alpha=1e4), labels)
    assert np.all(np.abs(near_iid - 200 / num_agents) <= 6)
    assert dominant_fraction(1e4) < 0.12


@pytest.mark.parametrize("alpha", [None, 0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_alpha(alpha: float | None) -> None:
    options = {} if alpha is None else {"alpha": alpha}
    with pytest.raises(ValueError, match="alpha"):
        partition(BALANCED, 4, "dirichlet", **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_size": -1}, r"min_size must be an integer >= 0 \(.*\), got -1\."),
        ({"min_size": 2.5}, r"min_size must be an integer >= 0 \(.*\), got 2\.5\."),
        ({"max_tries": 0}, r"max_tries must be an integer >= 1 \(.*\), got 0\."),
        ({"max_tries": True}, r"max_tries must be an integer >= 1 \(.*\), got True\."),
    ],
)
def test_dirichlet_rejects_bad_integer_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(BALANCED, 4, "dirichlet", alpha=1.0, **options)


def test_dirichlet_rejects_an_impossible_min_size() -> None:
    with pytest.raises(ValueError, match=r"min_size=200"):
        partition(BALANCED, 4, "dirichlet", alpha=1.0, min_size=200)


def test_dirichlet_gives_up_after_max_tries_and_suggests_a_larger_alpha() -> None:
    with pytest.raises(ValueError, match=r"alpha=0\.01.*min_size=100.*larger alpha"):
        partition(BALANCED, 4, "dirichlet", alpha=0.01, min_size=100, max_tries=3)


def test_dirichlet_min_size_is_respected() -> None:
    shards = partition(BALANCED, 5, "dirichlet", seed=2, alpha=0.3, min_size=40)
    assert min(len(s) for s in shards) >= 40


# --- shards ---------------------------------------------------------------------------------------


def test_shards_give_whole_classes_when_shards_align_with_classes() -> None:
    shards = partition(BALANCED, 5, "shards", shards_per_agent=2, seed=3)
    counts = class_counts(shards, BALANCED)
    assert np.all((counts == 0) | (counts == 50))
    assert np.all((counts > 0).sum(axis=1) == 2)


@pytest.mark.parametrize(("num_agents", "shards_per_agent"), [(4, 3), (5, 2), (3, 1), (6, 2)])
def test_each_agent_gets_shards_per_agent_label_contiguous_shards(
    num_agents: int, shards_per_agent: int
) -> None:
    labels = BALANCED
    shards = partition(labels, num_agents, "shards", shards_per_agent=shards_per_agent, seed=8)
    # The label counts of each shard of the label-sorted order; each agent's counts must be a sum of
    # shards_per_agent of them, and no shard is used twice.
    pieces = np.array_split(np.sort(labels), num_agents * shards_per_agent)
    piece_counts = [np.bincount(p, minlength=10) for p in pieces]
    aligned = max(map(len, pieces)) <= 50  # shards no longer than a class span at most 2 classes
    assert not aligned or all((c > 0).sum() <= 2 for c in piece_counts)
    unused = set(range(len(pieces)))
    for agent_counts in class_counts(shards, labels):
        match = next(
            combo
            for combo in itertools.combinations(sorted(unused), shards_per_agent)
            if np.array_equal(sum(piece_counts[i] for i in combo), agent_counts)
        )
        unused -= set(match)
        assert not aligned or (agent_counts > 0).sum() <= 2 * shards_per_agent
    assert not unused


@pytest.mark.parametrize("shards_per_agent", [0, -1, 1.5, True, "2"])
def test_shards_rejects_bad_shards_per_agent(shards_per_agent: Any) -> None:
    message = rf"shards_per_agent must be an integer >= 1 \(.*\), got {shards_per_agent!r}\."
    with pytest.raises(ValueError, match=message):
        partition(BALANCED, 4, "shards", shards_per_agent=shards_per_agent)


# --- validation -----------------------------------------------------------------------------------


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"Unknown partition scheme 'nope'.*by_class.*dirichlet.*iid.*shards"
    ):
        partition(BALANCED, 4, "nope")


@pytest.mark.parametrize("num_agents", [1, 0, -3, 2.5, True, "4", None])
def test_num_agents_must_be_at_least_two(num_agents: Any) -> None:
    with pytest.raises(ValueError, match=rf"num_agents must be an integer >= 2 \(.*\), got {num_agents!r}\."):
        partition(BALANCED, num_agents)


def test_num_agents_may_be_a_numpy_integer() -> None:
    expected = partition(BALANCED, 4, "iid", seed=5)
    shards = partition(BALANCED, np.int64(4), "iid", seed=5)
    assert len(shards) == 4
    for got, want in zip(shards, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_num_agents_cannot_exceed_the_number_of_samples() -> None:
    with pytest.raises(ValueError, match=r"num_agents=6 exceeds the 5 samples"):
        partition([0, 1, 0, 1, 0], 6)


@pytest.mark.parametrize("labels", [np.zeros((5, 2), dtype=int), [], np.array(3)], ids=["2d", "empty", "0d"])
def test_labels_must_be_a_non_empty_1d_array(labels: Any) -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition(labels, 2)


def test_scheme_options_are_passed_through_and_unknown_ones_fail() -> None:
    with pytest.raises(TypeError, match="alpha"):
        partition(BALANCED, 4, "iid", alpha=0.5)


def test_a_user_registered_scheme_is_used() -> None:
    @register_partition("test_round_robin", override=True)
    def round_robin(labels: np.ndarray, num_agents: int, rng: np.random.Generator) -> list[np.ndarray]:
        return [np.arange(g, len(labels), num_agents) for g in range(num_agents)]

    assert "test-round-robin" in PARTITIONS
    shards = partition(BALANCED, 3, "test_round_robin")
    assert [s[:2].tolist() for s in shards] == [[0, 3], [1, 4], [2, 5]]


@pytest.mark.parametrize(
    ("name", "broken", "problem"),
    [
        ("test_overlapping", lambda n, k: [np.arange(n)] + [np.arange(1)] * (k - 1), "duplicated"),
        ("test_incomplete", lambda n, k: [np.arange(g, n - 1, k) for g in range(k)], "missing"),
        ("test_out_of_range", lambda n, k: [np.arange(g, n + 1, k) for g in range(k)], "outside"),
        ("test_too_few", lambda n, k: [np.arange(n)], "1 shards for 3 agents"),
        ("test_floats", lambda n, k: [np.arange(g, n, k) + 0.5 for g in range(k)], "non-integer"),
    ],
)
def test_a_scheme_that_breaks_the_partition_raises_runtime_error(
    name: str, broken: Any, problem: str
) -> None:
    PARTITIONS.add(name, lambda labels, num_agents, rng: broken(len(labels), num_agents), override=True)
    with pytest.raises(RuntimeError, match=rf"{name}.*{problem}"):
        partition(BALANCED, 3, name)


def test_empty_shards_from_any_scheme_are_named() -> None:
    @register_partition("test_starving", override=True)
    def starving(labels: np.ndarray, num_agents: int, rng: np.random.Generator) -> list[np.ndarray]:
        return [np.arange(len(labels))] + [np.empty(0, dtype=np.int64)] * (num_agents - 1)

    with pytest.raises(ValueError, match=r"test_starving .* leaves agents 1, 2 without samples"):
        partition(BALANCED, 3, "test_starving")


# --- dataset_labels -------------------------------------------------------------------------------


class FakeDataset:
    """A dataset that only has label metadata; loading an item is an error."""

    def __init__(self, **metadata: Any) -> None:
        self.__dict__.update(metadata)
        self._n = len(next(iter(metadata.values()))) if metadata else 3

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:
        raise AssertionError("dataset_labels must not load items")


def test_dataset_labels_reads_a_targets_list() -> None:
    labels = dataset_labels(FakeDataset(targets=[2, 0, 1, 1]))
    assert isinstance(labels, np.ndarray) and labels.tolist() == [2, 0, 1, 1]


def test_dataset_labels_reads_a_labels_tensor() -> None:
    assert dataset_labels(FakeDataset(labels=torch.tensor([4, 3, 3]))).tolist() == [4, 3, 3]


def test_dataset_labels_reads_a_tensor_dataset() -> None:
    ds = TensorDataset(torch.randn(4, 3), torch.tensor([1, 0, 1, 2]))
    assert dataset_labels(ds).tolist() == [1, 0, 1, 2]


def test_dataset_labels_needs_a_label_tensor_in_a_tensor_dataset() -> None:
    with pytest.raises(TypeError, match="second tensor"):
        dataset_labels(TensorDataset(torch.randn(4, 3)))


def test_dataset_labels_unwraps_subsets_and_concatenations() -> None:
    base = FakeDataset(targets=[0, 1, 2, 3, 4, 5])
    assert dataset_labels(Subset(base, [5, 0, 2])).tolist() == [5, 0, 2]
    assert dataset_labels(Subset(Subset(base, [5, 4, 3, 2]), torch.tensor([3, 0]))).tolist() == [2, 5]
    other = FakeDataset(labels=torch.tensor([9, 8]))
    assert dataset_labels(ConcatDataset([base, other])).tolist() == [0, 1, 2, 3, 4, 5, 9, 8]
    nested = ConcatDataset([Subset(base, [1]), Subset(other, [1, 0])])
    assert dataset_labels(Subset(nested, [2, 0])).tolist() == [9, 1]


def test_dataset_labels_rejects_datasets_without_label_metadata() -> None:
    with pytest.raises(TypeError, match=r"FakeDataset.*`targets` attribute"):
        dataset_labels(FakeDataset())


def test_dataset_labels_checks_one_label_per_item() -> None:
    ds = FakeDataset(targets=[0, 1, 2])
    ds._n = 5
    with pytest.raises(ValueError, match="5 items but 3 labels"):
        dataset_labels(ds)


def test_partition_of_dataset_labels_end_to_end() -> None:
    ds = Subset(FakeDataset(targets=BALANCED.tolist()), range(0, 500, 2))
    shards = partition(dataset_labels(ds), 5, "by_class")
    assert sum(len(s) for s in shards) == 250


# --- shard_sizes_table ----------------------------------------------------------------------------


def test_shard_sizes_table_counts_samples_per_agent_and_class() -> None:
    table = shard_sizes_table(partition(BALANCED, 5, "by_class"), BALANCED)
    lines = table.splitlines()
    assert len(lines) == 6
    assert lines[0].split() == ["agent", *map(str, range(10)), "total"]
    assert lines[1].split() == ["0", "50", "50", *["0"] * 8, "100"]
