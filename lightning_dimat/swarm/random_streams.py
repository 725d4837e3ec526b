"""One random stream per agent.

Each agent's dropout, data augmentation and shuffling draw from its own stream, seeded from
``(seed, agent id)``. An agent's randomness therefore does not depend on which other agents share
its process, and the streams are saved in checkpoints, so a resumed run continues them exactly.

Examples:
    >>> streams = AgentRandomStreams(seed=0, agent_ids=[0, 1])
    >>> with streams.activate(1):
    ...     x = torch.rand(1)  # drawn from agent 1's stream; the global stream is untouched
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def agent_seed(seed: int, agent_id: int, *purpose: int) -> int:
    """A 63-bit seed derived from the run seed, the agent id and an optional purpose tuple."""
    sequence = np.random.SeedSequence([seed, agent_id, *purpose])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)


LIBRARIES = ("torch", "numpy", "python")
"""Generators a stream can cover: torch's CPU generator (always; plus the device's CUDA generator),
numpy's global ``np.random`` and python's ``random``. Swapping numpy's state costs ~70 µs, python's ~10 µs,
torch's ~1 µs, per agent and switch: cover numpy/python only when agent code draws from them."""


def _capture(libraries: Iterable[str], device: torch.device | None) -> dict[str, Any]:
    """The current states of the global generators in ``libraries`` (and ``device``'s CUDA generator)."""
    state: dict[str, Any] = {}
    if "torch" in libraries:
        state["torch"] = torch.get_rng_state()
        if device is not None and device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
    if "numpy" in libraries:
        state["numpy"] = np.random.get_state()
    if "python" in libraries:
        state["python"] = random.getstate()
    return state


def _restore(state: dict[str, Any], device: torch.device | None) -> None:
    """Makes the generator states in ``state`` (from :func:`_capture`) the global ones."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Runs the block with all global generators seeded by ``seed``, then restores them."""
    saved = _capture(LIBRARIES, device)
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if device is not None and device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield
    finally:
        _restore(saved, device)


def untracked_fingerprint(libraries: Iterable[str]) -> tuple[int, ...]:
    """A cheap-to-compare summary of the global generators *not* in ``libraries`` (to detect their use)."""
    parts: list[int] = []
    if "numpy" not in libraries:
        _, keys, position, *_ = np.random.get_state()
        parts += [hash(keys.tobytes()), position]
    if "python" not in libraries:
        parts.append(hash(random.getstate()))
    return tuple(parts)


class AgentRandomStreams:
    """The random states of each local agent, for the generators in ``libraries``.

    Args:
        seed: the run seed.
        agent_ids: global ids of the agents that live in this process.
        device: the device whose CUDA generator is also swapped (``None`` or CPU: not swapped).
        libraries: which of :data:`LIBRARIES` to give each agent its own stream of (``"torch"`` is required).
    """

    def __init__(
        self,
        seed: int,
        agent_ids: Iterable[int],
        device: torch.device | None = None,
        libraries: Iterable[str] = ("torch",),
    ) -> None:
        self.libraries = tuple(libraries)
        unknown = sorted(set(self.libraries) - set(LIBRARIES))
        if unknown or "torch" not in self.libraries:
            raise ValueError(
                f"random_streams must include 'torch' and may add 'numpy' and 'python'; got {self.libraries}."
            )
        self.device = device
        self._states: dict[int, dict[str, Any]] = {}
        self._active: list[int] = []
        for agent_id in agent_ids:
            with seeded(agent_seed(seed, agent_id), device):
                self._states[agent_id] = _capture(self.libraries, device)

    @contextmanager
    def activate(self, agent_id: int) -> Iterator[None]:
        """Makes ``agent_id``'s stream the global one for the duration of the block (re-entrant)."""
        if agent_id in self._active:
            yield
            return
        saved = _capture(self.libraries, self.device)
        _restore(self._states[agent_id], self.device)
        self._active.append(agent_id)
        try:
            yield
        finally:
            self._active.remove(agent_id)
            self._states[agent_id] = _capture(self.libraries, self.device)
            _restore(saved, self.device)

    @contextmanager
    def preserved(self, agent_id: int) -> Iterator[None]:
        """Runs the block (which may :meth:`activate` the agent), then puts ``agent_id``'s stream back as it
        was before: what the block drew from it is not drawn in training. Use it outside the agent's own
        :meth:`activate` block."""
        if agent_id in self._active:
            raise RuntimeError(f"preserved({agent_id}) inside activate({agent_id}): its stream is in use.")
        saved = self._states[agent_id]
        try:
            yield
        finally:
            self._states[agent_id] = saved

    def state_dict(self) -> dict[int, dict[str, Any]]:
        """Per-agent states keyed by global agent id, made of tensors and builtins only.

        (``torch.load(weights_only=True)`` refuses numpy arrays, so numpy's key is stored as a tensor.)
        """
        return {agent_id: _to_builtin(state) for agent_id, state in self._states.items()}

    def load_state_dict(self, states: dict[int, dict[str, Any]]) -> None:
        """Restores the states of the local agents; agents missing from ``states`` raise a ``KeyError``."""
        for agent_id in self._states:
            if agent_id not in states:
                raise KeyError(f"The checkpoint holds no random state for agent {agent_id}.")
            state = _from_builtin(states[agent_id])
            missing = sorted(set(self.libraries) - set(state))
            if missing:
                raise KeyError(
                    f"The checkpoint holds no {missing} random state for agent {agent_id}; resume with the "
                    f"random_streams the run was started with ({sorted(state)})."
                )
            if self.device is None or self.device.type != "cuda":
                state.pop("cuda", None)
            elif "cuda" not in state:  # a CPU run's checkpoint resumed on a GPU: keep each agent's own seed
                state["cuda"] = self._states[agent_id]["cuda"]
            self._states[agent_id] = state


def _to_builtin(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with numpy's key array as a tensor (loadable with ``weights_only=True``)."""
    saved = dict(state)
    if "numpy" in state:
        name, keys, position, has_gauss, cached_gaussian = state["numpy"]
        saved["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)
    return saved


def _from_builtin(saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_to_builtin` (with torch's state back on the CPU)."""
    state = dict(saved)
    if "numpy" in saved:
        name, keys, position, has_gauss, cached_gaussian = saved["numpy"]
        state["numpy"] = (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
    state["torch"] = saved["torch"].cpu()
    return state
