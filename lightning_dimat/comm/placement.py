"""Which agents live in which process: contiguous blocks of global agent ids.

Examples:
    >>> agents_on_rank(num_agents=5, world_size=2, rank=0)
    [0, 1, 2]
    >>> agents_on_rank(num_agents=5, world_size=2, rank=1)
    [3, 4]
"""

from __future__ import annotations


def agents_on_rank(num_agents: int, world_size: int, rank: int) -> list[int]:
    """Global ids of process ``rank``'s agents; the first ``num_agents % world_size`` ranks get one more."""
    if world_size > num_agents:
        raise ValueError(
            f"{world_size} processes for {num_agents} agents would leave processes without an agent; "
            f"use at most {num_agents} devices (devices × num_nodes) or more agents."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}.")
    base, extra = divmod(num_agents, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def rank_of_agent(agent_id: int, num_agents: int, world_size: int) -> int:
    """The process that holds ``agent_id``."""
    for rank in range(world_size):
        if agent_id in agents_on_rank(num_agents, world_size, rank):
            return rank
    raise ValueError(f"Agent {agent_id} is outside 0..{num_agents - 1}.")
