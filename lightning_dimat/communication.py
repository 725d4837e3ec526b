"""``CommunicationLedger``: what a decentralized method sends, per agent, as a real deployment would send it.

Every agent is its own machine in the model this ledger counts: one *round* is one model exchange with
each neighbour (agent j sends its state to every agent i with π_ij > 0, i ≠ j), and its bytes are the state's
size times the number of receivers — whether or not those agents share a process here (for merges, the bytes
that actually cross a process boundary are logged separately as ``merge/bytes_sent``). DIMAT's activation
matching also costs forward passes: ``forward_samples`` counts the samples each agent runs through its own
and its neighbours' models per merge (plus BatchNorm re-estimation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lightning_dimat.topology import Topology


def receivers_of(topology: Topology, agent_ids: Iterable[int]) -> dict[int, int]:
    """How many agents each of ``agent_ids`` sends its state to on ``topology`` (its degree)."""
    return {agent_id: topology.degree(agent_id) for agent_id in agent_ids}


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes needed to send ``state`` (every tensor at its own dtype)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


@dataclass
class CommunicationLedger:
    """Cumulative communication counts per agent id.

    Examples:
        >>> from lightning_dimat.topology import build_topology
        >>> ledger = CommunicationLedger()
        >>> ledger.record_exchange(receivers_of(build_topology("ring", 4), [0, 1, 2, 3]), state_size=100)
        >>> ledger.rounds[0], ledger.bytes_sent[0], ledger.totals()["comm/bytes_sent"]
        (1, 200, 800.0)
    """

    rounds: dict[int, int] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)
    messages_sent: dict[int, int] = field(default_factory=dict)
    forward_samples: dict[int, int] = field(default_factory=dict)

    def record_exchange(self, receivers: Mapping[int, int], state_size: int) -> None:
        """One round: each agent in ``receivers`` sends ``state_size`` bytes to that many other agents."""
        for agent_id, count in receivers.items():
            self.rounds[agent_id] = self.rounds.get(agent_id, 0) + 1
            self.messages_sent[agent_id] = self.messages_sent.get(agent_id, 0) + count
            self.bytes_sent[agent_id] = self.bytes_sent.get(agent_id, 0) + count * state_size

    def record_forward(self, agent_id: int, samples: int) -> None:
        """``samples`` extra forward passes run by ``agent_id`` (not training steps)."""
        self.forward_samples[agent_id] = self.forward_samples.get(agent_id, 0) + samples

    def totals(self) -> dict[str, float]:
        """``comm/rounds`` (per agent; the most any agent did), ``comm/bytes_sent``, ``comm/messages_sent``
        and ``comm/forward_samples`` summed over the agents counted here."""
        return {
            "comm/rounds": float(max(self.rounds.values(), default=0)),
            "comm/bytes_sent": float(sum(self.bytes_sent.values())),
            "comm/messages_sent": float(sum(self.messages_sent.values())),
            "comm/forward_samples": float(sum(self.forward_samples.values())),
        }

    def per_agent(self) -> dict[str, float]:
        """``comm/agent_<i>/rounds``, ``.../bytes_sent`` and ``.../forward_samples`` per agent counted."""
        metrics: dict[str, float] = {}
        for agent_id in sorted(set(self.rounds) | set(self.forward_samples)):
            metrics[f"comm/agent_{agent_id}/rounds"] = float(self.rounds.get(agent_id, 0))
            metrics[f"comm/agent_{agent_id}/bytes_sent"] = float(self.bytes_sent.get(agent_id, 0))
            metrics[f"comm/agent_{agent_id}/forward_samples"] = float(self.forward_samples.get(agent_id, 0))
        return metrics

    def restrict(self, agent_ids: Iterable[int]) -> None:
        """Keeps only ``agent_ids``' counts (after loading a checkpoint that holds every process's agents)."""
        keep = set(agent_ids)
        for name in ("rounds", "bytes_sent", "messages_sent", "forward_samples"):
            setattr(self, name, {g: v for g, v in getattr(self, name).items() if g in keep})

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": dict(self.rounds),
            "bytes_sent": dict(self.bytes_sent),
            "messages_sent": dict(self.messages_sent),
            "forward_samples": dict(self.forward_samples),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in ("rounds", "bytes_sent", "messages_sent", "forward_samples"):
            setattr(self, name, {int(k): int(v) for k, v in state.get(name, {}).items()})
