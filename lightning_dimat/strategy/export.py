"""What ``fit`` hands back: one agent, or the consensus of all agents merged in one basis."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_dimat.merge.batchnorm import recompute_batchnorm
from lightning_dimat.merge.combine import merge_into_basis
from lightning_dimat.merge.finite import (
    NonFiniteAgentError,
    is_finite_state,
    nonfinite_agents,
    nonfinite_message,
)
from lightning_dimat.merge.matchers import Matcher
from lightning_dimat.merge.state import StateDict, copy_holding
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.strategy.processes import to_cpu
from lightning_dimat.strategy.rounds import MergeRound

if TYPE_CHECKING:
    from lightning_dimat.strategy.strategy import DIMATStrategy

CONSENSUS_BATCHES = 10
"""Batches of every agent's data used to match and to re-estimate BatchNorm for the consensus."""


def export_to(strategy: DIMATStrategy, module: LightningModule) -> None:
    """Loads the agent chosen by ``strategy.export`` (or the consensus) into ``module``."""
    if is_overridden("configure_model", module, LightningModule):
        module.configure_model()  # layers built there exist in the agents, so they must here too
    if isinstance(strategy.export, int):
        state = strategy.agent_states()[strategy.export]  # (collective: every process takes part)
        if not is_finite_state(state):
            raise NonFiniteAgentError(
                nonfinite_message([strategy.export], f"end of fit (export={strategy.export})")
                + "; nothing was loaded into your module. Export another agent or 'consensus', which "
                "leaves non-finite agents out."
            )
    else:
        state = consensus_state(strategy, strategy.begin_round(num_batches=CONSENSUS_BATCHES))
    module.load_state_dict({key: value.to(module.device) for key, value in state.items()})


def consensus_state(strategy: DIMATStrategy, round: MergeRound) -> StateDict:
    """All agents merged with equal weights in the first agent's basis by the strategy's consensus matcher,
    BatchNorm re-estimated on every agent's round batches. With several processes it is computed once, on
    rank 0, from every process's states and batches, and handed to all."""
    states = strategy.agent_states()
    if strategy.world_size == 1:
        batches = [batch for handle in round for batch in handle.batches]
        return merged_consensus(round, states, batches, strategy.consensus_matcher, strategy.consensus_spec)
    local = [to_cpu(batch) for handle in round for batch in handle.batches]
    batches = [batch for part in strategy.all_gather_object(local) for batch in part]
    consensus = None
    if strategy.rank == 0:
        consensus = merged_consensus(
            round, states, batches, strategy.consensus_matcher, strategy.consensus_spec
        )
    return strategy.all_gather_object(consensus)[0]


def merged_consensus(
    round: MergeRound,
    states: Mapping[int, Mapping[str, Tensor]],
    batches: Sequence[Any],
    matcher: Matcher,
    spec: PermutationSpec | None,
) -> StateDict:
    """The finite ``states`` (every agent's) merged with equal weights in the basis of the round's first local
    agent (of the first finite agent if that one is not finite); a warning names agents left out."""
    reference_handle = next(iter(round))
    bad = nonfinite_agents(states)
    finite = [agent_id for agent_id in sorted(states) if agent_id not in bad]
    if not finite:
        raise NonFiniteAgentError(nonfinite_message(bad, "end of fit") + ": there is no consensus to export.")
    if bad:
        warnings.warn(
            nonfinite_message(bad, "end of fit") + ": left out of the exported consensus.", stacklevel=2
        )
    reference = reference_handle.module
    device = next(iter(reference.state_dict().values())).device
    first = reference_handle.agent_id if reference_handle.agent_id in finite else finite[0]
    if first != reference_handle.agent_id:
        reference = copy_holding(reference, {key: value.to(device) for key, value in states[first].items()})
    others = [agent_id for agent_id in finite if agent_id != first]
    weights = [1.0 / len(finite)] * len(finite)
    merged, _ = merge_into_basis(
        reference,
        reference.state_dict(),
        [{key: value.to(device) for key, value in states[agent_id].items()} for agent_id in others],
        weights,
        matcher,
        reference_handle.batches if matcher.requires_data else None,
        spec=spec,
        forward_context=round.forward_context,
    )
    consensus = copy_holding(reference, merged)
    if batches:
        recompute_batchnorm(consensus, batches, forward_context=round.forward_context)
    return consensus.state_dict()
