"""Split a training set among DIMAT agents: each agent trains on its own disjoint shard.

A partition scheme maps ``(labels, num_agents, rng, **options)`` to one index array per agent. The built-in
schemes are ``iid`` (stratified), ``by_class`` (the paper's non-IID split: whole classes per agent),
``dirichlet`` (per-class Dir(alpha) proportions) and ``shards`` (FedAvg-style label-sorted shards). Add your
own with :func:`register_partition`; :func:`partition` checks that whatever a scheme returns is a partition.

Examples:
    >>> import numpy as np
    >>> from lightning_dimat.partition import partition
    >>> labels = np.repeat(np.arange(4), 3)  # 4 classes x 3 samples
    >>> [s.tolist() for s in partition(labels, num_agents=2, scheme="by_class")]
    [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from lightning_dimat.registry import Registry
from lightning_dimat.validation import check_int

__all__ = [
    "PARTITIONS",
    "PartitionScheme",
    "dataset_labels",
    "partition",
    "register_partition",
    "shard_sizes_table",
]

PartitionScheme = Callable[..., list[np.ndarray]]
"""``scheme(labels, num_agents, rng, **options) -> list[np.ndarray]``: one index array per agent."""

PARTITIONS: Registry[PartitionScheme] = Registry("partition scheme")
register_partition = PARTITIONS.register


def _split_by_sizes(indices: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cuts ``indices`` into consecutive pieces of the given ``sizes`` (which sum to ``len(indices)``)."""
    return np.split(indices, np.cumsum(sizes)[:-1])


def _class_indices(labels: np.ndarray, cls: Any, rng: np.random.Generator) -> np.ndarray:
    """The indices of class ``cls``, shuffled with ``rng``."""
    return rng.permutation(np.flatnonzero(labels == cls))


@register_partition("iid", "stratified")
def iid(labels: np.ndarray, num_agents: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Stratified split: every agent gets an equal share (±1) of every class.

    Each class's remainder samples go to the next agents in a round-robin that carries over from class to
    class, so total shard sizes also differ by at most one.

    Examples:
        >>> shards = iid(np.repeat(np.arange(3), 5), 2, np.random.default_rng(0))
        >>> [len(s) for s in shards]
        [8, 7]
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(num_agents)]
    offset = 0
    for cls in np.unique(labels):
        idx = _class_indices(labels, cls, rng)
        sizes = np.full(num_agents, len(idx) // num_agents)
        extra = len(idx) % num_agents
        sizes[(offset + np.arange(extra)) % num_agents] += 1
        offset = (offset + extra) % num_agents
        for agent, piece in enumerate(_split_by_sizes(idx, sizes)):
            parts[agent].append(piece)
    return [np.concatenate(p) for p in parts]


@register_partition("by_class", "non_iid", "noniid")
def by_class(
    labels: np.ndarray, num_agents: int, rng: np.random.Generator, *, shuffle_classes: bool = False
) -> list[np.ndarray]:
    """The DIMAT paper's non-IID split: each agent sees only its own classes.

    With K classes (sorted; permuted by ``rng`` if ``shuffle_classes``) and N agents: if K >= N the class list
    is cut into N contiguous blocks and agent g gets every sample of block g; if K < N, agent g joins the
    group of class ``g * K // N`` and each class's shuffled samples are split evenly within its group.

    Examples:
        >>> shards = by_class(np.repeat(np.arange(4), 2), 2, np.random.default_rng(0))
        >>> [s.tolist() for s in shards]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    classes = np.unique(labels)
    if shuffle_classes:
        classes = rng.permutation(classes)
    if len(classes) >= num_agents:
        return [np.flatnonzero(np.isin(labels, block)) for block in np.array_split(classes, num_agents)]
    shards: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_agents
    group = np.arange(num_agents) * len(classes) // num_agents
    for k, cls in enumerate(classes):
        members = np.flatnonzero(group == k)
        pieces = np.array_split(_class_indices(labels, cls, rng), len(members))
        for agent, piece in zip(members, pieces, strict=True):
            shards[agent] = piece
    return shards


@register_partition("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_agents: int,
    rng: np.random.Generator,
    *,
    alpha: float | None = None,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among agents in proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives each agent few dominant classes; large ``alpha`` (1e3) approaches ``iid``.
    Everything is redrawn until every agent holds at least ``min_size`` samples, at most ``max_tries`` times.

    Examples:
        >>> shards = dirichlet(np.repeat(np.arange(3), 20), 2, np.random.default_rng(0), alpha=0.5)
        >>> sum(len(s) for s in shards)
        60
    """
    if alpha is None:
        raise ValueError("The dirichlet partition needs alpha > 0, e.g. partition(..., alpha=0.5).")
    alpha = float(alpha)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"The dirichlet partition needs a finite alpha > 0, got alpha={alpha}.")
    min_size = check_int("min_size", min_size, minimum=0, hint="the fewest samples an agent may get")
    max_tries = check_int("max_tries", max_tries, minimum=1, hint="how many draws before giving up")
    if min_size * num_agents > len(labels):
        raise ValueError(
            f"dirichlet with min_size={min_size} needs {min_size * num_agents} samples for {num_agents} "
            f"agents but there are only {len(labels)} (alpha={alpha}). Lower min_size or num_agents."
        )
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_agents)]
        for cls in classes:
            idx = _class_indices(labels, cls, rng)
            cuts = (np.cumsum(rng.dirichlet(np.full(num_agents, alpha)))[:-1] * len(idx)).astype(np.int64)
            for agent, piece in enumerate(np.split(idx, np.clip(cuts, 0, len(idx)))):
                parts[agent].append(piece)
        shards = [np.concatenate(p) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ValueError(
        f"dirichlet with alpha={alpha} gave some agent fewer than min_size={min_size} samples in all "
        f"{max_tries} tries. Use a larger alpha, a smaller min_size or fewer agents (or raise max_tries)."
    )


@register_partition("shards", "pathological")
def shards(
    labels: np.ndarray, num_agents: int, rng: np.random.Generator, *, shards_per_agent: int = 2
) -> list[np.ndarray]:
    """FedAvg-style split: sort by label, cut into equal shards, deal ``shards_per_agent`` to each agent.

    Ties in the label sort are broken randomly; shards are assigned by a random permutation.

    Examples:
        >>> shards_ = shards(np.repeat(np.arange(4), 5), 2, np.random.default_rng(0))
        >>> [len(s) for s in shards_]
        [10, 10]
    """
    shards_per_agent = check_int(
        "shards_per_agent", shards_per_agent, minimum=1, hint="label-sorted shards dealt to each agent"
    )
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    pieces = np.array_split(order, num_agents * shards_per_agent)
    dealt = rng.permutation(len(pieces)).reshape(num_agents, shards_per_agent)
    return [np.concatenate([pieces[i] for i in row]) for row in dealt]


_EMPTY_SHARD_HINTS: dict[PartitionScheme, str] = {
    by_class: (
        "With fewer classes than agents, agent g shares class g*K//N with the other agents of its group, so "
        "every class needs at least as many samples as agents sharing it. Use fewer agents, more samples per "
        "class, or the 'iid', 'dirichlet' or 'shards' scheme."
    ),
    dirichlet: "Raise min_size (>= 1) so every agent is guaranteed samples.",
    shards: "There are more shards (num_agents * shards_per_agent) than samples; lower shards_per_agent.",
}


def _to_numpy(values: Any) -> np.ndarray:
    """A list, numpy array or torch tensor as a numpy array."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _check_is_partition(
    shards: list[Any], num_samples: int, num_agents: int, scheme: str
) -> list[np.ndarray]:
    """Returns the shards as sorted int64 arrays; raises ``RuntimeError`` if they are not a partition."""
    if len(shards) != num_agents:
        raise RuntimeError(
            f"Partition scheme {scheme!r} returned {len(shards)} shards for {num_agents} agents."
        )
    arrays = [np.asarray(s).reshape(-1) for s in shards]
    if any(a.size and not np.issubdtype(a.dtype, np.integer) for a in arrays):
        raise RuntimeError(f"Partition scheme {scheme!r} returned non-integer indices.")
    arrays = [np.sort(a.astype(np.int64)) for a in arrays]
    flat = np.concatenate(arrays)
    if flat.size and (flat.min() < 0 or flat.max() >= num_samples):
        raise RuntimeError(f"Partition scheme {scheme!r} returned indices outside [0, {num_samples}).")
    counts = np.bincount(flat, minlength=num_samples)
    for problem, bad in (("duplicated", counts > 1), ("missing", counts == 0)):
        if bad.any():
            raise RuntimeError(
                f"Partition scheme {scheme!r} did not return a partition: {bad.sum()} {problem} indices "
                f"(first: {np.flatnonzero(bad)[:5].tolist()})."
            )
    return arrays


def partition(
    labels: Sequence[Any] | np.ndarray | torch.Tensor,
    num_agents: int,
    scheme: str = "iid",
    seed: int = 0,
    **options: Any,
) -> list[np.ndarray]:
    """Splits sample indices among ``num_agents`` agents with a registered partition scheme.

    Args:
        labels: one class label per sample (list, numpy array or torch tensor); see :func:`dataset_labels`.
        num_agents: number of agents N (>= 2).
        scheme: a name in :data:`PARTITIONS` (``iid``, ``by_class``, ``dirichlet``, ``shards``, ...).
        seed: seeds the scheme's ``np.random.default_rng``; the result depends only on the arguments.
        **options: scheme options, e.g. ``alpha=0.5`` for ``dirichlet``.

    Returns:
        N sorted int64 index arrays, disjoint and together covering ``range(len(labels))``.

    Examples:
        >>> [s.tolist() for s in partition([0, 0, 1, 1], num_agents=2, scheme="iid", seed=0)]
        [[0, 2], [1, 3]]
    """
    fn = PARTITIONS.get(scheme)
    num_agents = check_int(
        "num_agents", num_agents, minimum=2, hint="DIMAT needs at least 2 agents, one shard each"
    )
    labels = _to_numpy(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class labels, got shape {labels.shape}.")
    if num_agents > len(labels):
        raise ValueError(
            f"num_agents={num_agents} exceeds the {len(labels)} samples; every agent needs at least one. "
            f"Use at most {len(labels)} agents."
        )
    shards = _check_is_partition(
        fn(labels, num_agents, np.random.default_rng(seed), **options), len(labels), num_agents, scheme
    )
    empty = [agent for agent, s in enumerate(shards) if s.size == 0]
    if empty:
        who = ", ".join(map(str, empty))
        raise ValueError(
            f"{scheme} with {len(np.unique(labels))} classes and {num_agents} agents leaves "
            f"agent{'s' if len(empty) > 1 else ''} {who} without samples. "
            + _EMPTY_SHARD_HINTS.get(fn, "Use fewer agents or another partition scheme.")
        )
    return shards


def dataset_labels(dataset: Any) -> np.ndarray:
    """Reads one class label per item from a dataset's metadata, without loading any item.

    Looks for a ``targets`` or ``labels`` attribute (torchvision ImageFolder/CIFAR/MNIST/SVHN), then
    unwraps ``TensorDataset`` (labels are ``tensors[1]``), ``Subset`` and ``ConcatDataset``.

    Examples:
        >>> import torch
        >>> from torch.utils.data import Subset, TensorDataset
        >>> ds = TensorDataset(torch.zeros(4, 2), torch.tensor([3, 1, 4, 1]))
        >>> dataset_labels(Subset(ds, [2, 0])).tolist()
        [4, 3]
    """
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            labels = _to_numpy(values)
            break
    else:
        if isinstance(dataset, Subset):
            labels = dataset_labels(dataset.dataset)[_to_numpy(dataset.indices).astype(np.int64)]
        elif isinstance(dataset, ConcatDataset):
            labels = np.concatenate([dataset_labels(part) for part in dataset.datasets])
        elif isinstance(dataset, TensorDataset):
            if len(dataset.tensors) < 2:
                raise TypeError(
                    "A TensorDataset needs a second tensor of labels, e.g. TensorDataset(inputs, labels)."
                )
            labels = _to_numpy(dataset.tensors[1])
        else:
            raise TypeError(
                f"Cannot read labels from a {type(dataset).__name__} without loading its items. Give it a "
                f"`targets` attribute: a sequence of integer class labels, one per item."
            )
    if labels.ndim != 1:
        raise ValueError(
            f"{type(dataset).__name__} labels must be 1-D (one per item), got shape {labels.shape}."
        )
    if hasattr(dataset, "__len__") and len(labels) != len(dataset):
        raise ValueError(f"{type(dataset).__name__} has {len(dataset)} items but {len(labels)} labels.")
    return labels


def shard_sizes_table(shards: Sequence[np.ndarray], labels: Sequence[Any] | np.ndarray | torch.Tensor) -> str:
    """A text table of each agent's sample count per class, for logging.

    Examples:
        >>> print(shard_sizes_table([np.array([0, 1]), np.array([2])], [0, 1, 1]))
        agent  0  1  total
            0  1  1      2
            1  0  1      1
    """
    labels = _to_numpy(labels)
    classes = np.unique(labels)
    rows = [["agent", *map(str, classes), "total"]]
    for agent, shard in enumerate(shards):
        counts = [int(np.sum(labels[shard] == cls)) for cls in classes]
        rows.append([str(agent), *map(str, counts), str(len(shard))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
