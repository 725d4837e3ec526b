"""Gathering per-agent values from every process into one dict keyed by global agent id.

Each process holds some agents and reports ``{agent id: value}`` for them; the gather runs one
``all_gather_object`` collective and merges the processes' dicts in rank order. An agent reported by two
processes is an error (each agent lives in exactly one process).

Examples:
    >>> one_process = lambda obj: [obj]
    >>> gather_by_agent(one_process, {0: "a", 1: "b"})
    {0: 'a', 1: 'b'}
    >>> two_processes = lambda obj: [obj, {2: "c"}]
    >>> gather_by_agent(two_processes, {0: "a", 1: "b"})
    {0: 'a', 1: 'b', 2: 'c'}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

AllGatherObject = Callable[[Any], list[Any]]
"""``fn(obj)`` returning ``obj`` from every process in rank order (``[obj]`` in one process)."""


def gather_by_agent(all_gather_object: AllGatherObject, local: Mapping[int, T]) -> dict[int, T]:
    """Every process's ``{agent id: value}``, merged into one dict (one collective).

    Args:
        all_gather_object: the gather, e.g. ``trainer.strategy.all_gather_object``.
        local: this process's agents' values.

    Returns:
        ``{agent id: value}`` over all processes, in rank order, each process's dict in its own order.

    Raises:
        ValueError: if two processes report the same agent.

    Examples:
        >>> gather_by_agent(lambda obj: [obj], {3: 1.5})
        {3: 1.5}
    """
    merged: dict[int, T] = {}
    for rank, part in enumerate(all_gather_object(dict(local))):
        _merge_part(merged, part, rank, "")
    return merged


def gather_fields_by_agent(
    all_gather_object: AllGatherObject, local: Mapping[str, Mapping[int, Any]]
) -> dict[str, dict[int, Any]]:
    """Every process's ``{field: {agent id: value}}``, merged per field (one collective for all fields).

    A field that only some processes report holds only their agents.

    Args:
        all_gather_object: the gather, e.g. ``trainer.strategy.all_gather_object``.
        local: this process's agents' values, per field.

    Returns:
        ``{field: {agent id: value}}`` over all processes.

    Raises:
        ValueError: if two processes report the same agent in one field.

    Examples:
        >>> gather_fields_by_agent(lambda obj: [obj], {"steps": {0: 4, 1: 5}, "loss": {0: 0.5}})
        {'steps': {0: 4, 1: 5}, 'loss': {0: 0.5}}
    """
    merged: dict[str, dict[int, Any]] = {}
    parts = all_gather_object({name: dict(values) for name, values in local.items()})
    for rank, part in enumerate(parts):
        for name, values in part.items():
            _merge_part(merged.setdefault(name, {}), values, rank, f" in {name!r}")
    return merged


def _merge_part(merged: dict[int, Any], part: Mapping[int, Any], rank: int, where: str) -> None:
    for agent_id, value in part.items():
        if agent_id in merged:
            raise ValueError(
                f"Agent {agent_id} was reported by two processes{where} (again by rank {rank}); each agent "
                "must live in exactly one process. Check that every process uses the same agent placement."
            )
        merged[agent_id] = value
