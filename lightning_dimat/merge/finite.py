"""Non-finite agents: found before an exchange is used, left out of everyone's weighted sum, restored.

An agent whose state holds a NaN or an infinity (a diverged step, a NaN loss on one shard) would reach its
neighbours at the next merge and every agent soon after. Each merge and gossip exchange therefore checks the
states it received, leaves the non-finite ones out (the remaining mixing weights are renormalised), and
rebuilds a non-finite agent from its finite neighbours — or raises, naming the agent.

Examples:
    >>> import torch
    >>> states = {0: {"w": torch.ones(2)}, 1: {"w": torch.tensor([1.0, float("nan")])}}
    >>> nonfinite_agents(states)
    [1]
    >>> renormalised([0, 1, 2], [0.5, 0.25, 0.25], excluded=[1])
    ([0, 2], [0.6666666666666666, 0.3333333333333333])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor

ON_NONFINITE = ("restore", "raise")
"""What a callback does with a non-finite agent: rebuild it from its finite neighbours, or raise."""


class NonFiniteAgentError(ValueError):
    """An agent's state holds NaN or infinite values (and the callback was asked to raise, or cannot
    restore it because none of its neighbours is finite)."""


def is_finite_state(state: Mapping[str, Tensor]) -> bool:
    """Whether every floating entry of ``state`` is finite (integer buffers cannot be NaN)."""
    return all(bool(torch.isfinite(value).all()) for value in state.values() if value.is_floating_point())


def nonfinite_agents(states: Mapping[int, Mapping[str, Tensor]]) -> list[int]:
    """Ids of the agents in ``states`` whose state holds NaN or infinite values, in order."""
    return sorted(agent_id for agent_id, state in states.items() if not is_finite_state(state))


def renormalised(
    order: Sequence[int], weights: Sequence[float], excluded: Collection[int]
) -> tuple[list[int], list[float]]:
    """``order`` and its ``weights`` without the ``excluded`` agents, the rest rescaled to sum to 1
    (empty lists when nothing is left)."""
    kept = [
        (agent_id, weight)
        for agent_id, weight in zip(order, weights, strict=True)
        if agent_id not in excluded
    ]
    total = sum(weight for _, weight in kept)
    if not kept or total <= 0:
        return [], []
    return [agent_id for agent_id, _ in kept], [weight / total for _, weight in kept]


def nonfinite_message(agent_ids: Sequence[int], where: str) -> str:
    """The one message for non-finite agents: which, where (e.g. ``"merge at epoch 3, step 120"``)."""
    listed = ", ".join(map(str, agent_ids))
    return f"Agent(s) {listed} hold NaN or infinite weights at the {where}"


def check_states(
    states: Mapping[int, Mapping[str, Tensor]],
    local_ids: Collection[int],
    on_nonfinite: str,
    where: str,
    owner: str,
    everywhere: Callable[[list[int]], list[int]] | None = None,
) -> list[int]:
    """The non-finite agents among ``states``: with ``on_nonfinite="raise"`` a
    :class:`NonFiniteAgentError` naming them, else a warning for those in ``local_ids`` (each process
    warns about its own agents). ``owner`` names the callback in the messages.

    ``everywhere``, with several processes, turns this process's list into the list of every process (a
    collective): with ``"raise"`` every process then raises together, including one that neither holds
    nor receives the non-finite agent and would otherwise wait for the others at its next collective."""
    bad = nonfinite_agents(states)
    anywhere = bad if everywhere is None or on_nonfinite != "raise" else everywhere(bad)
    if on_nonfinite == "raise" and anywhere:
        raise NonFiniteAgentError(
            nonfinite_message(anywhere, where)
            + f"; {owner}(on_nonfinite='restore') would leave them out and rebuild them from their "
            "neighbours. Lower the learning rate or clip gradients."
        )
    local = [agent_id for agent_id in bad if agent_id in local_ids]
    if local:
        warnings.warn(
            nonfinite_message(local, where) + ": left out of their neighbours' sums and rebuilt from their "
            "finite neighbours (optimizer state reset).",
            stacklevel=3,
        )
    return bad


def no_finite_neighbour(agent_id: int, where: str) -> NonFiniteAgentError:
    """The error for a non-finite agent none of whose neighbours is finite."""
    return NonFiniteAgentError(
        nonfinite_message([agent_id], where) + " and none of its neighbours is finite: nothing to restore it "
        "from. Lower the learning rate or clip gradients."
    )
