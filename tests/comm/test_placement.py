"""Which agents live in which process (comm/placement.py): contiguous blocks covering every agent once."""

from __future__ import annotations

import pytest

from lightning_dimat.comm.placement import agents_on_rank, rank_of_agent


@pytest.mark.parametrize(("num_agents", "world_size"), [(5, 1), (5, 2), (8, 2), (7, 3), (4, 4)])
def test_placement_gives_contiguous_blocks_covering_every_agent_once(
    num_agents: int, world_size: int
) -> None:
    blocks = [agents_on_rank(num_agents, world_size, rank) for rank in range(world_size)]
    assert [agent for block in blocks for agent in block] == list(range(num_agents))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert all(rank_of_agent(agent, num_agents, world_size) == r for r, b in enumerate(blocks) for agent in b)


def test_placement_refuses_more_processes_than_agents() -> None:
    with pytest.raises(ValueError, match="3 processes for 2 agents"):
        agents_on_rank(2, 3, 0)
