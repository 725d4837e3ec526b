"""Argument checks that fail before any work, with a message naming the value and the fix.

Examples:
    >>> check_int("every_n_epochs", 2, minimum=1)
    2
    >>> check_int("every_n_epochs", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: every_n_epochs must be an integer >= 1, got 0.
    >>> check_choice("export", "consensus", ("consensus", "none"))
    'consensus'
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def check_int(name: str, value: Any, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) >= ``minimum``; else a ``ValueError``."""
    valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not valid or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        suffix = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be an integer{bound}{suffix}, got {value!r}.")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (not a string such as ``"no"``, which Python would take as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value


def check_instance(name: str, value: Any, kind: type, hint: str = "") -> Any:
    """``value`` if it is ``None`` or an instance of ``kind``; else a ``TypeError`` naming it."""
    if value is not None and not isinstance(value, kind):
        suffix = f" ({hint})" if hint else ""
        raise TypeError(f"{name} must be a {kind.__name__} or None{suffix}, got {value!r}.")
    return value


def check_index(name: str, value: Any, size: int, what: str = "agent") -> int:
    """``value`` as an ``int`` if it is an integer in ``0..size-1``; else ``ValueError``."""
    valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not valid or not 0 <= value < size:
        raise ValueError(f"{name} must be an {what} id in 0..{size - 1}, got {value!r}.")
    return int(value)


def check_real(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a ``float`` if it is a real number in ``[low, high]`` (``(low, high]``: ``low_open``)."""
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
    inside = valid and (low < value if low_open else low <= value) and value <= high
    if not inside:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}.")
    return float(value)


def check_choice(name: str, value: T, choices: Collection[Any]) -> T:
    """``value`` if it is one of ``choices``; else ``ValueError`` listing them."""
    if value not in choices:
        options = [repr(choice) for choice in choices]
        listed = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
        raise ValueError(f"{name} must be {listed}, got {value!r}.")
    return value


def check_options(
    kind: str, name: str, function: Callable[..., Any], options: Mapping[str, Any], skip: int
) -> None:
    """Refuses, before any work, ``options`` that ``function`` (the chosen ``kind`` named ``name``) does not
    take; its first ``skip`` parameters are filled by the caller.

    Examples:
        >>> def ring(num_agents, p=0.5): ...
        >>> check_options("topology", "ring", ring, {"q": 1}, skip=1)
        Traceback (most recent call last):
        ...
        ValueError: topology 'ring' takes no option(s) ['q']; its options are ['p'].
    """
    parameters = list(inspect.signature(function).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    known = {p.name for p in parameters}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"{kind} {name!r} takes no option(s) {unknown}; its options are {sorted(known) or 'none'}."
        )
