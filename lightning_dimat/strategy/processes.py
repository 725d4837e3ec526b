"""The processes a DIMAT run spans: failed collectives as clear errors, gathers, a clean exit."""

from __future__ import annotations

import atexit
import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_dimat.comm.transport import ExchangeError, failure_cause


@contextlib.contextmanager
def failing_clearly(rank: int, what: str, timeout: timedelta | None) -> Iterator[None]:
    """Turns a failed collective (a process died, or hung past ``timeout``) into an :class:`ExchangeError`."""
    started = time.monotonic()
    try:
        yield
    except ExchangeError:
        raise
    except RuntimeError as error:  # gloo/nccl errors, including DistBackendError and timeouts
        raise ExchangeError(
            f"Rank {rank}: {what} failed {failure_cause(started, timeout)}. Nothing since the last "
            f"checkpoint is saved; resume from it with ckpt_path=... ({type(error).__name__}: {error})"
        ) from error


def all_gather_object(obj: Any, world_size: int, rank: int, timeout: timedelta | None) -> list[Any]:
    """``obj`` from every process, in rank order (``[obj]`` in one process)."""
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    with failing_clearly(rank, "gathering agent data", timeout):
        torch.distributed.all_gather_object(gathered, obj)
    return gathered


def close_process_group_at_exit() -> None:
    """Closes the process group before the interpreter's exit tears gloo's threads down mid-flight."""
    atexit.register(_close_process_group)


def _close_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) detached and on the CPU."""
    return apply_to_collection(value, torch.Tensor, lambda tensor: tensor.detach().cpu())
