"""``CommunicationLedger``: what a decentralized method sends, per agent, as a real deployment would send it.

Every agent is its own machine in the model this ledger counts: one *round* is one model exchange with
each neighbour (agent j sends its state to every agent i with π_ij > 0, i ≠ j), and its bytes are the state's
size times the number of receivers — whether or not those agents share a process here (for merges, the bytes
that actually cross a process boundary in this run are logged separately, as
``merge/bytes_between_processes``). DIMAT's activation
matching also costs forward passes: ``forward_samples`` counts the samples each agent runs through its own
and its neighbours' models per merge (plus BatchNorm re-estimation).

Like a torchmetrics ``Metric``, the ledger declares its state (:attr:`CommunicationLedger.FIELDS`: one
``{agent id: count}`` per field) and how each field reduces over agents, so totals over processes come from
one gather of the per-agent counts (:func:`lightning_dimat.comm.gather.gather_fields_by_agent`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from lightning_dimat.topology import Topology


def receivers_of(topology: Topology, agent_ids: Iterable[int]) -> dict[int, int]:
    """How many agents each of ``agent_ids`` sends its state to on ``topology`` (its degree; in a directed
    round, the agents that take a weight from it)."""
    return {agent_id: len(topology.receivers(agent_id)) for agent_id in agent_ids}


_REDUCTIONS = {"sum": sum, "max": lambda values: max(values, default=0)}


class CommunicationLedger:
    """Cumulative communication counts per agent id.

    Examples:
        >>> from lightning_dimat.topology import build_topology
        >>> ledger = CommunicationLedger()
        >>> ledger.record_exchange(receivers_of(build_topology("ring", 4), [0, 1, 2, 3]), state_size=100)
        >>> ledger.rounds[0], ledger.bytes_sent[0], ledger.totals()["comm/bytes_sent"]
        (1, 200, 800.0)
    """

    FIELDS: ClassVar[dict[str, str]] = {
        "rounds": "max",
        "bytes_sent": "sum",
        "messages_sent": "sum",
        "forward_samples": "sum",
    }
    """Each field's reduction over agents: ``rounds`` is the most any agent did, the rest are summed."""

    def __init__(self) -> None:
        self.rounds: dict[int, int] = {}
        self.bytes_sent: dict[int, int] = {}
        self.messages_sent: dict[int, int] = {}
        self.forward_samples: dict[int, int] = {}

    def _add(self, field: str, agent_id: int, amount: int) -> None:
        counts: dict[int, int] = getattr(self, field)
        counts[agent_id] = counts.get(agent_id, 0) + amount

    def record_exchange(self, receivers: Mapping[int, int], state_size: int) -> None:
        """One round: each agent in ``receivers`` sends ``state_size`` bytes to that many other agents."""
        for agent_id, count in receivers.items():
            self._add("rounds", agent_id, 1)
            self._add("messages_sent", agent_id, count)
            self._add("bytes_sent", agent_id, count * state_size)

    def record_forward(self, agent_id: int, samples: int) -> None:
        """``samples`` extra forward passes run by ``agent_id`` (not training steps)."""
        self._add("forward_samples", agent_id, samples)

    def totals(self, state: Mapping[str, Mapping[int, int]] | None = None) -> dict[str, float]:
        """``comm/<field>`` reduced over the agents of ``state`` (default: this ledger's own)."""
        state = self.state_dict() if state is None else state
        return {
            f"comm/{name}": float(_REDUCTIONS[reduction](state.get(name, {}).values()))
            for name, reduction in self.FIELDS.items()
        }

    def per_agent(self, state: Mapping[str, Mapping[int, int]] | None = None) -> dict[str, float]:
        """``comm/agent_<i>/rounds``, ``.../bytes_sent`` and ``.../forward_samples`` per agent counted."""
        state = self.state_dict() if state is None else state
        metrics: dict[str, float] = {}
        for agent_id in sorted(set(state["rounds"]) | set(state["forward_samples"])):
            for name in ("rounds", "bytes_sent", "forward_samples"):
                metrics[f"comm/agent_{agent_id}/{name}"] = float(state[name].get(agent_id, 0))
        return metrics

    def restrict(self, agent_ids: Iterable[int]) -> None:
        """Keeps only ``agent_ids``' counts (after loading a checkpoint that holds every process's agents)."""
        keep = set(agent_ids)
        for name in self.FIELDS:
            setattr(self, name, {g: v for g, v in getattr(self, name).items() if g in keep})

    def state_dict(self) -> dict[str, dict[int, int]]:
        """Every field's ``{agent id: count}`` (copies)."""
        return {name: dict(getattr(self, name)) for name in self.FIELDS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the counts written by :meth:`state_dict`."""
        for name in self.FIELDS:
            setattr(self, name, {int(k): int(v) for k, v in state.get(name, {}).items()})
