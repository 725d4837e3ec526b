"""Handing freed heap memory back to the operating system between agents' backward passes.

On CPU, one agent's forward and backward allocate its activations (tens of MiB at batch 32) from glibc's heap,
next to tensors that live on (the gradients written during the backward). When the activations are freed,
glibc keeps their pages, and the next agent's activations do not fit exactly into the holes, so resident
memory grows with every agent beyond its live data (docs/scale.md: 13.5 MiB per agent of ResNet-20 ×1 whose
weights, gradients and Adam moments are 4.2 MiB). ``malloc_trim(0)`` after each agent's backward returns the
freed pages, and the peak stays near the live data: 8.4 MiB per agent instead of 13.5 (N = 5 → 100).

It costs time: the next forward faults its pages in again (11–14 % of a training step measured on CPU,
docs/scale.md), while the memory saved is about 5 MiB per agent — a few percent of the process with a
handful of agents, a third of it with a thousand. So ``"auto"`` turns it on only where it pays: agents on
CPU, under glibc (the only C library here with ``malloc_trim``), at least :data:`AUTO_MIN_AGENTS` of them in
the process.

Examples:
    >>> import torch
    >>> heap_release_mode("auto", torch.device("cpu"), local_agents=100) == heap_release_available()
    True
    >>> heap_release_mode("auto", torch.device("cpu"), local_agents=5)  # (a few agents: not worth the time)
    False
    >>> heap_release_mode("auto", torch.device("cuda"), local_agents=100)  # (activations not on the heap)
    False
"""

from __future__ import annotations

import ctypes
import functools
import platform
from collections.abc import Callable
from typing import Any, Literal

import torch

ReleaseMemory = bool | Literal["auto"]

AUTO_MIN_AGENTS = 32
"""``release_memory="auto"`` hands memory back from this many agents in one process on: where the ~5 MiB
saved per agent (ResNet-20 ×1) is worth 11–14 % of training time (about 13 % of the process at 32 agents)."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on a platform without it (macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    function = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if function is None:
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def heap_release_available() -> bool:
    """Whether this process can hand freed heap memory back (glibc's ``malloc_trim``)."""
    return _malloc_trim() is not None


def check_release_memory(value: Any) -> ReleaseMemory:
    """``value`` if it is a valid ``release_memory`` option; else a ``ValueError`` saying what is."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(
            f"release_memory must be True, False or 'auto', got {value!r}: 'auto' releases freed heap memory "
            f"after each agent's backward when {AUTO_MIN_AGENTS} or more agents train on CPU in one process "
            "under glibc (Linux)."
        )
    if value is True and not heap_release_available():
        raise ValueError(
            f"release_memory=True needs glibc's malloc_trim, which this platform ({platform.system()}, "
            f"libc {platform.libc_ver()[0] or 'unknown'}) does not have; pass release_memory='auto' or False."
        )
    return value


def heap_release_mode(value: ReleaseMemory, device: torch.device, local_agents: int) -> bool:
    """Whether to release freed heap memory after each agent's backward: ``value`` if a bool, else
    (``"auto"``) when ``local_agents`` (at least :data:`AUTO_MIN_AGENTS`) train on CPU (``device``) and
    glibc's ``malloc_trim`` exists."""
    if value == "auto":
        return device.type == "cpu" and local_agents >= AUTO_MIN_AGENTS and heap_release_available()
    return bool(value)


def release_freed_heap() -> None:
    """Returns the heap's free pages to the operating system (glibc's ``malloc_trim(0)``)."""
    trim = _malloc_trim()
    if trim is None:
        raise RuntimeError("release_freed_heap needs glibc's malloc_trim, which this platform does not have.")
    trim(0)
