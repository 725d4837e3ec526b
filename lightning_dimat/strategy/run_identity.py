"""What a checkpoint records about the run that wrote it, and the check that a resumed run is the same one.

A checkpoint holds the agents' weights but not, by itself, the graph they merge on or the shards they train
on: resuming with another topology, partition or seed would continue a different experiment without a word.
The strategy writes :func:`run_identity` into ``checkpoint["dimat"]["run"]`` and, when resuming, refuses a
difference unless it is named in ``DIMATStrategy(resume_changes=[...])``.

Examples:
    >>> saved = {"topology": [[0.5, 0.5], [0.5, 0.5]], "partition": "iid", "partition_options": {}, "seed": 0}
    >>> differences(saved, {**saved, "seed": 1}, allowed=())
    ['seed (checkpoint: 0, this run: 1)']
    >>> differences(saved, {**saved, "seed": 1}, allowed=("seed",))
    []
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lightning_dimat.strategy.strategy import DIMATStrategy

RESUME_CHANGES = (
    "topology",
    "partition",
    "seed",
    "method",
    "basis",
    "compression",
    "participation",
    "rematch_every",
)
"""What ``resume_changes`` may name: the parts of a run that a resumed run is allowed to change."""


def run_identity(strategy: DIMATStrategy) -> dict[str, Any]:
    """The strategy's part of a run's identity: Π, the partition and its options, the seed."""
    return {
        "topology": strategy.topology.mixing.tolist()
        if strategy.schedule is None
        else strategy.schedule.describe(),
        "partition": strategy.partition,
        "partition_options": dict(strategy.partition_options),
        "seed": strategy.seed,
    }


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Collection[str]) -> list[str]:
    """The fields of ``current`` that differ from ``saved`` and are not ``allowed`` to, described."""
    found = []
    for name, now in current.items():
        if name in allowed or name not in saved:
            continue
        before = saved[name]
        if name == "topology" and isinstance(before, dict) != isinstance(now, dict):
            same, shown = False, "a schedule against a fixed graph"
        elif name == "topology" and isinstance(now, dict):  # a schedule: its name, period, first period
            rounds = before.get("rounds"), now.get("rounds")
            same = (
                before.get("schedule") == now.get("schedule")
                and np.shape(rounds[0]) == np.shape(rounds[1])  # (another period: another shape)
                and np.allclose(*rounds, atol=1e-12)
            )
            shown = f"schedule: checkpoint {before.get('schedule')!r}, this run {now.get('schedule')!r}"
        elif name == "topology":
            same = np.shape(before) == np.shape(now) and np.allclose(before, now, atol=1e-12)
            shown = "the mixing matrix Π differs"
        else:
            same = before == now
            shown = f"checkpoint: {before!r}, this run: {now!r}"
        if not same:
            found.append(f"{name} ({shown})")
    return found


def refuse_differences(found: list[str], where: str) -> None:
    """A ``ValueError`` listing ``found`` differences of a resumed run, with the way to accept them."""
    if found:
        names = [difference.split(" ", 1)[0] for difference in found]
        raise ValueError(
            f"{where} was written by a different run: {'; '.join(found)}. Resume with the same settings, or "
            f"accept the change explicitly with DIMATStrategy(resume_changes={names})."
        )
