"""The swarm's checkpoint hooks: the agents' random streams and their own checkpoint extras.

Weights and optimizer states reach the checkpoint through Lightning (the swarm's ``state_dict`` and
:class:`~lightning_dimat.swarm.optimizer.SwarmOptimizer`). These hooks add ``checkpoint["dimat"]``:
the number of agents, every agent's random stream and whatever each agent's own ``on_save_checkpoint``
wrote, all keyed by global agent id (gathered from every process), so a run resumes on any number of
processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_dimat.comm.gather import gather_fields_by_agent

if TYPE_CHECKING:
    from lightning_dimat.swarm.random_streams import AgentRandomStreams


class AgentCheckpointHooks(LightningModule):
    """Checkpoint hooks of :class:`~lightning_dimat.swarm.AgentSwarm` (a mixin; not used on its own)."""

    if TYPE_CHECKING:
        num_agents: int
        streams: AgentRandomStreams

        def items(self) -> list[tuple[int, LightningModule]]: ...

        def _all_gather_object(self, obj: Any) -> list[Any]: ...

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds ``checkpoint["dimat"]``: every agent's random stream and checkpoint extras, by global id."""
        extras: dict[int, dict[str, Any]] = {}
        for agent_id, agent in self.items():
            own: dict[str, Any] = {}
            if is_overridden("on_save_checkpoint", agent, LightningModule):
                agent.on_save_checkpoint(own)
            extras[agent_id] = own
        local = {"random_streams": self.streams.state_dict(), "agent_checkpoint_extras": extras}
        checkpoint["dimat"] = {
            "num_agents": self.num_agents,
            **gather_fields_by_agent(self._all_gather_object, local),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the local agents' random streams and hands each agent its own checkpoint extras."""
        saved = checkpoint.get("dimat")
        if saved is None:
            raise KeyError(
                "This checkpoint was not written by DIMATStrategy (it has no 'dimat' entry). To start agents "
                "from a plain checkpoint, load it into your module and pass that module to fit()."
            )
        if saved["num_agents"] != self.num_agents:
            raise ValueError(
                f"The checkpoint holds agents {list(range(saved['num_agents']))} but this run has "
                f"num_agents={self.num_agents}; resume with the same number of agents."
            )
        self.streams.load_state_dict(saved["random_streams"])
        for agent_id, agent in self.items():
            if is_overridden("on_load_checkpoint", agent, LightningModule):
                agent.on_load_checkpoint(saved["agent_checkpoint_extras"].get(agent_id, {}))
