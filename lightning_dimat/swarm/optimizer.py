"""All local agents' optimizers and LR schedulers, presented to Lightning as one optimizer.

Lightning sees a single optimizer, so one ``LightningOptimizer.step`` per (accumulated) batch advances
``global_step`` once, whatever the number of agents. Each agent keeps its own optimizer (from its own
``configure_optimizers``) and its own schedulers; :meth:`SwarmOptimizer.step` steps only the agents that
computed gradients since the last step. ``state_dict`` is keyed by global agent id, so a checkpoint does
not depend on how agents were spread over processes.

What Lightning's ``LearningRateMonitor`` reads names the agents, not this wrapper: the object's class is
named after the agents' optimizer class (``Adam``, so keys start with ``lr-Adam``) and every parameter
group it shows carries a ``"name"``, ``agent_<g>`` (global id ``g``), or ``agent_<g>/<group>`` when an
agent's optimizer has several groups or names its group (``<group>`` is the group's own ``"name"`` or
``pg1``, ``pg2``, ... as Lightning numbers them). So a swarm of Adam agents logs ``lr-Adam/agent_0``,
``lr-Adam/agent_1``, ... in every process layout. The names live only in this view: the agents' own
groups and their checkpointed state are left as they are.

It is not a subclass of ``torch.optim.Optimizer`` (Lightning accepts any object with an optimizer's
interface), so it is not offered among the optimizers of ``lightning-dimat fit --help``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer


class AgentParamGroup(MutableMapping[str, Any]):
    """One agent's parameter group as :attr:`SwarmOptimizer.param_groups` shows it: every key reads and
    writes the agent's own group dict (so a learning rate set here reaches the agent's optimizer), except
    ``"name"``, which is the agent's logging name and read-only.

    Examples:
        >>> group = {"params": [], "lr": 0.1}
        >>> view = AgentParamGroup(group, "agent_2")
        >>> view["name"], view["lr"]
        ('agent_2', 0.1)
        >>> view["lr"] = 0.01
        >>> group["lr"]
        0.01
    """

    def __init__(self, group: dict[str, Any], name: str) -> None:
        self.group = group
        self.name = name

    def __getitem__(self, key: str) -> Any:
        return self.name if key == "name" else self.group[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "name":
            raise KeyError(f"'name' of {self.name}'s parameter group is fixed by its agent id.")
        self.group[key] = value

    def __delitem__(self, key: str) -> None:
        if key == "name":
            raise KeyError(f"'name' of {self.name}'s parameter group is fixed by its agent id.")
        del self.group[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.group
        if "name" not in self.group:
            yield "name"

    def __len__(self) -> int:
        return len(self.group) + ("name" not in self.group)

    def __repr__(self) -> str:
        return f"AgentParamGroup({self.name!r}, lr={self.group.get('lr')!r})"


def agent_group_names(agent_id: int, param_groups: list[dict[str, Any]]) -> list[str]:
    """Logging names of agent ``agent_id``'s parameter groups: ``agent_<g>`` for one unnamed group, else
    ``agent_<g>/<name>`` with each group's own ``"name"`` or ``pg<i>`` (1-based, as Lightning numbers them).

    Examples:
        >>> agent_group_names(3, [{"lr": 0.1}])
        ['agent_3']
        >>> agent_group_names(3, [{"lr": 0.1, "name": "backbone"}, {"lr": 0.2}])
        ['agent_3/backbone', 'agent_3/pg2']
    """
    prefix = f"agent_{agent_id}"
    if len(param_groups) == 1 and "name" not in param_groups[0]:
        return [prefix]
    return [f"{prefix}/{group.get('name', f'pg{index}')}" for index, group in enumerate(param_groups, 1)]


_NAMED_CLASSES: dict[str, type[SwarmOptimizer]] = {}


def _named_class(optimizers: Mapping[int, Any]) -> type[SwarmOptimizer]:
    """The :class:`SwarmOptimizer` subclass named after the agents' optimizer class (``"Adam+SGD"`` when
    agents differ), so that ``type(swarm_optimizer).__name__`` names what actually steps."""
    return _class_named(
        "+".join(dict.fromkeys(type(optimizer).__name__ for optimizer in optimizers.values()))
    )


def _class_named(name: str) -> type[SwarmOptimizer]:
    """The :class:`SwarmOptimizer` subclass called ``name`` (made once per name and process)."""
    if name in ("", SwarmOptimizer.__name__):
        return SwarmOptimizer
    if name not in _NAMED_CLASSES:
        namespace = {"__qualname__": f"SwarmOptimizer[{name}]", "__module__": __name__}
        _NAMED_CLASSES[name] = type(name, (SwarmOptimizer,), namespace)
    return _NAMED_CLASSES[name]


def _restore(name: str) -> SwarmOptimizer:
    """Unpickling: an empty instance of the :class:`SwarmOptimizer` subclass called ``name``."""
    return object.__new__(_class_named(name))


class SwarmOptimizer:
    """Steps each active agent's own optimizer.

    It has a torch optimizer's interface (``param_groups``, ``defaults``, ``state``, ``step``, ``zero_grad``,
    ``state_dict``, ``load_state_dict``) without being one. ``param_groups`` shows the agents' own group dicts
    through :class:`AgentParamGroup` views (so learning-rate changes made through either object reach both,
    also after ``load_state_dict`` replaced an agent's group dicts), each named as the module docstring
    describes; ``state`` is a merged view. An instance's class is a subclass named after the agents'
    optimizer class (``type(SwarmOptimizer({0: adam})).__name__ == "Adam"``).

    Args:
        optimizers: ``{global agent id: optimizer}`` for the local agents.
        schedulers: ``{global agent id: [LRSchedulerConfig, ...]}``.
        before_agent_step: called as ``fn(agent_id, optimizer)`` right before an agent's step (the swarm
            clips gradients there).

    Examples:
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> sgd = {0: torch.optim.SGD(a.parameters(), lr=0.1), 1: torch.optim.SGD(b.parameters(), lr=0.1)}
        >>> swarm = SwarmOptimizer(sgd)
        >>> type(swarm).__name__, [group["name"] for group in swarm.param_groups]
        ('SGD', ['agent_0', 'agent_1'])
    """

    def __new__(
        cls, optimizers: Mapping[int, Any] | None = None, *args: Any, **kwargs: Any
    ) -> SwarmOptimizer:
        if cls is SwarmOptimizer and optimizers:
            cls = _named_class(optimizers)
        return super().__new__(cls)

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
        self.active: set[int] = set()
        self.steps = dict.fromkeys(self.optimizers, 0)

    @property
    def param_groups(self) -> list[AgentParamGroup]:
        """Every local agent's parameter groups (agent by agent), named ``agent_<g>`` or ``agent_<g>/...``."""
        return [
            AgentParamGroup(group, name)
            for agent_id, optimizer in self.optimizers.items()
            for group, name in zip(
                optimizer.param_groups, agent_group_names(agent_id, optimizer.param_groups), strict=True
            )
        ]

    @property
    def defaults(self) -> dict[str, Any]:
        """The agents' optimizer defaults when all agents use one optimizer class (``{}`` otherwise)."""
        classes = {type(optimizer) for optimizer in self.optimizers.values()}
        if len(classes) != 1:
            return {}
        return next(iter(self.optimizers.values())).defaults

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        """Every agent's per-parameter state, merged into one read-only view."""
        merged: dict[torch.Tensor, Any] = {}
        for optimizer in self.optimizers.values():
            merged.update(optimizer.state)
        return merged

    def mark_active(self, agent_id: int) -> None:
        """Records that ``agent_id`` has gradients to apply at the next :meth:`step`."""
        self.active.add(agent_id)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes every local agent's gradients."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
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

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
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

    def __repr__(self) -> str:
        inner = ", ".join(f"{agent_id}: {type(opt).__name__}" for agent_id, opt in self.optimizers.items())
        return f"SwarmOptimizer({{{inner}}})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles by class name (the named subclass is made again on loading) and attributes."""
        return _restore, (type(self).__name__,), self.__dict__
