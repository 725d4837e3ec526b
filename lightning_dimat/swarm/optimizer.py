"""All local agents' optimizers and LR schedulers, presented to Lightning as one optimizer.

Lightning sees a single optimizer, so one ``LightningOptimizer.step`` per (accumulated) batch advances
``global_step`` once, whatever the number of agents. Each agent keeps its own optimizer (from its own
``configure_optimizers``) and its own schedulers; :meth:`SwarmOptimizer.step` steps only the agents that
computed gradients since the last step. ``state_dict`` is keyed by global agent id, so a checkpoint does
not depend on how agents were spread over processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer
from typing_extensions import override


class SwarmOptimizer(Optimizer):
    """Steps each active agent's own optimizer.

    ``Optimizer.__init__`` is deliberately not called: ``param_groups`` are the agents' own group dicts
    (so learning-rate changes made through either object reach both) and ``state`` is a merged view.

    Args:
        optimizers: ``{global agent id: optimizer}`` for the local agents.
        schedulers: ``{global agent id: [LRSchedulerConfig, ...]}``.
        before_agent_step: called as ``fn(agent_id, optimizer)`` right before an agent's step (the swarm
            clips gradients there).

    Examples:
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> sgd = {0: torch.optim.SGD(a.parameters(), lr=0.1), 1: torch.optim.SGD(b.parameters(), lr=0.1)}
        >>> swarm = SwarmOptimizer(sgd)
        >>> len(swarm.param_groups)
        2
    """

    def __init__(
        self,
        optimizers: Mapping[int, Optimizer],
        schedulers: Mapping[int, list[LRSchedulerConfig]] | None = None,
        before_agent_step: Callable[[int, Optimizer], None] | None = None,
    ) -> None:
        self.optimizers = dict(optimizers)
        self.schedulers = {
            agent_id: list((schedulers or {}).get(agent_id, [])) for agent_id in self.optimizers
        }
        self.before_agent_step = before_agent_step
        self.defaults: dict[str, Any] = {}
        self.param_groups = [
            group for optimizer in self.optimizers.values() for group in optimizer.param_groups
        ]
        self.active: set[int] = set()
        self.steps = dict.fromkeys(self.optimizers, 0)

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        """Every agent's per-parameter state, merged into one read-only view."""
        merged: dict[torch.Tensor, Any] = {}
        for optimizer in self.optimizers.values():
            merged.update(optimizer.state)
        return merged

    def mark_active(self, agent_id: int) -> None:
        """Records that ``agent_id`` has gradients to apply at the next :meth:`step`."""
        self.active.add(agent_id)

    @override
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Steps the optimizers of the agents marked active (the caller clears the marks)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for agent_id in sorted(self.active):
            optimizer = self.optimizers[agent_id]
            if self.before_agent_step is not None:
                self.before_agent_step(agent_id, optimizer)
            optimizer.step()
            self.steps[agent_id] += 1
        return loss

    @override
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes every local agent's gradients."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    @override
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"agents": {agent id: {"optimizer", "schedulers", "steps"}}}``."""
        return {
            "agents": {
                agent_id: {
                    "optimizer": optimizer.state_dict(),
                    "schedulers": [config.scheduler.state_dict() for config in self.schedulers[agent_id]],
                    "steps": self.steps[agent_id],
                }
                for agent_id, optimizer in self.optimizers.items()
            }
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restores the local agents' optimizers and schedulers from a :meth:`state_dict`."""
        saved = state_dict.get("agents")
        if saved is None:
            raise KeyError(
                "This optimizer state was not written by DIMATStrategy (no 'agents' entry); "
                "resume DIMAT runs only from DIMAT checkpoints."
            )
        missing = sorted(set(self.optimizers) - set(saved))
        if missing:
            raise KeyError(
                f"The checkpoint holds optimizer states for agents {sorted(saved)}, not for agents {missing}."
            )
        for agent_id, optimizer in self.optimizers.items():
            entry = saved[agent_id]
            optimizer.load_state_dict(entry["optimizer"])
            configs = self.schedulers[agent_id]
            if len(entry["schedulers"]) != len(configs):
                raise ValueError(
                    f"Agent {agent_id} has {len(configs)} LR schedulers but the checkpoint holds "
                    f"{len(entry['schedulers'])}; configure_optimizers must match the checkpointed run."
                )
            for config, scheduler_state in zip(configs, entry["schedulers"], strict=True):
                config.scheduler.load_state_dict(scheduler_state)
            self.steps[agent_id] = int(entry["steps"])

    @override
    def __repr__(self) -> str:
        inner = ", ".join(f"{agent_id}: {type(opt).__name__}" for agent_id, opt in self.optimizers.items())
        return f"SwarmOptimizer({{{inner}}})"

    @override
    def __getstate__(self) -> dict[str, Any]:
        """All attributes (``Optimizer``'s own keeps only ``defaults``, ``state`` and ``param_groups``)."""
        return self.__dict__

    @override
    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restores the attributes as saved, without ``Optimizer``'s step-hook patching."""
        self.__dict__.update(state)
