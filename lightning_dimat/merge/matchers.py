"""Matchers find the P_ij of x_i ← Σ_j π_ij P_ij x_j: one permutation per channel group and neighbour.

A matcher returns permutations, never permuted states, so that callers can apply them to weights
(:func:`~lightning_dimat.permutation.permute_state`), to optimizer state, compose or invert them. An empty
mapping is the identity. Matchers are small dataclasses whose fields are their options, registered by name
in :data:`MATCHERS` so that configs can name them (``method: activation``) or configure them
(``method: {class_path: lightning_dimat.merge.WeightMatcher, init_args: {max_iterations: 20}}``).

Examples:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> matcher = resolve_matcher("weight")
    >>> (found,) = matcher.match(net, [net.state_dict()], torch.randn(16, 4))
    >>> {group: p.tolist() == list(range(8)) for group, p in found.items()}
    {'0': True}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from lightning_dimat.merge.inputs import peek_inputs
from lightning_dimat.permutation.activation import match_activations
from lightning_dimat.permutation.cache import spec_for
from lightning_dimat.permutation.context import DEFAULT_PROBES, PROBE_PLACEMENTS
from lightning_dimat.permutation.spec import PermutationSpec
from lightning_dimat.permutation.weight import match_weights
from lightning_dimat.registry import Registry
from lightning_dimat.validation import check_choice

Permutations = dict[str, Tensor]
ForwardContext = Callable[[], AbstractContextManager[Any]]
MatcherT = TypeVar("MatcherT", bound="type[Matcher]")


class Matcher(ABC):
    """Expresses neighbour states in a reference model's basis by finding permutations.

    Subclasses are dataclasses (their fields are the options) and declare three facts the merge round needs:
    ``requires_data`` (reads the merging agent's batches), ``uses_spec`` (needs the permutation spec, derived
    and checked before training starts) and ``runs_neighbours`` (runs the agent's data through every
    neighbour's model: counted as extra forward passes).
    """

    requires_data: ClassVar[bool] = False
    uses_spec: ClassVar[bool] = False
    runs_neighbours: ClassVar[bool] = False
    probes: str = DEFAULT_PROBES
    """Where a derived spec observes each channel group (see ``PROBE_PLACEMENTS``); an option of
    :class:`ActivationMatcher`, the only matcher that reads activations."""

    @abstractmethod
    def match(
        self,
        reference: nn.Module,
        states: Sequence[Mapping[str, Tensor]],
        data: Iterable[Any] | Tensor | None = None,
        *,
        spec: PermutationSpec | None = None,
        forward_context: ForwardContext = nullcontext,
    ) -> list[Permutations]:
        """One permutation mapping per entry of ``states``, expressing it in ``reference``'s basis.

        Args:
            reference: the model whose basis the results are in (agent i itself; P_ii = I).
            states: the neighbours' ``state_dict``s (same architecture as ``reference``).
            data: batches of agent i's own data (used when ``requires_data``; else ignored).
            spec: the architecture's permutation spec (default: derived from ``reference`` and ``data``).
            forward_context: wraps forward passes (e.g. Lightning's autocast context).
        """


MATCHERS: Registry[type[Matcher]] = Registry("merge method")


def register_matcher(name: str, *aliases: str) -> Callable[[MatcherT], MatcherT]:
    """Class decorator registering a :class:`Matcher` subclass under ``name`` (and ``aliases``) for configs.

    Examples:
        >>> @register_matcher("identity_for_docs")
        ... @dataclass
        ... class IdentityMatcher(Matcher):
        ...     def match(self, reference, states, data=None, **_):
        ...         return [{} for _ in states]
        >>> resolve_matcher("identity_for_docs").match(None, [{}, {}])
        [{}, {}]
    """

    def decorator(cls: MatcherT) -> MatcherT:
        MATCHERS.add(name, cls, *aliases)
        return cls

    return decorator


def resolve_matcher(method: str | Matcher) -> Matcher:
    """The matcher named ``method`` with its default options, or ``method`` itself if it is a matcher."""
    if isinstance(method, Matcher):
        return method
    return MATCHERS.get(method)()


def matcher_spec(
    matcher: Matcher,
    reference: nn.Module,
    data: Any,
    spec: PermutationSpec | None = None,
    probes: str | None = None,
) -> PermutationSpec | None:
    """The spec ``matcher`` works with: ``None`` if it uses none, else ``spec`` if given, else the verified
    spec derived from ``reference`` on the first input of ``data`` with the ``probes`` placement (default:
    the matcher's own, see ``permutation_spec``)."""
    if not matcher.uses_spec or spec is not None:
        return spec
    if data is None:
        raise ValueError(
            f"{type(matcher).__name__} needs the model's permutation spec: pass spec=..., or data=... "
            "(batches of inputs) to derive it from."
        )
    first, _ = peek_inputs(reference, data)
    return spec_for(reference, first, None, matcher.probes if probes is None else probes)


@register_matcher("average", "wa")
@dataclass
class AverageMatcher(Matcher):
    """Plain weight averaging (the paper's WA): every P_ij is the identity."""

    def match(
        self,
        reference: nn.Module,
        states: Sequence[Mapping[str, Tensor]],
        data: Iterable[Any] | Tensor | None = None,
        *,
        spec: PermutationSpec | None = None,
        forward_context: ForwardContext = nullcontext,
    ) -> list[Permutations]:
        """The identity (an empty mapping) for every neighbour."""
        return [{} for _ in states]


@register_matcher("activation", "am", "dimat")
@dataclass
class ActivationMatcher(Matcher):
    """Activation matching (DIMAT): permutations from the correlation of hidden activations on the merging
    agent's own data.

    Args:
        identity_bias: λ added to the diagonal of each correlation matrix before the assignment: a unit
            moves only where that beats keeping it by more than λ (0: plain matching; large: the identity).
        probes: where each channel group's activations are observed, one of ``PROBE_PLACEMENTS``:
            ``"pre_activation"`` (every residual sum of a stream, else the normalisation output),
            ``"post_activation"`` (every nonlinearity output) or ``"stage_output"`` (the last nonlinearity
            output of each group: one probe per ResNet stage). Used when the spec is derived by tracing;
            a hand-written spec names its own probes. Units the data cannot tell apart (after a ReLU:
            zero on every input) are paired by how alike their weights are.

    Examples:
        >>> ActivationMatcher(probes="stage_output")
        ActivationMatcher(identity_bias=0.0, probes='stage_output')
    """

    requires_data: ClassVar[bool] = True
    uses_spec: ClassVar[bool] = True
    runs_neighbours: ClassVar[bool] = True
    identity_bias: float = 0.0
    probes: str = DEFAULT_PROBES

    def __post_init__(self) -> None:
        check_choice("probes", self.probes, tuple(PROBE_PLACEMENTS))

    def match(
        self,
        reference: nn.Module,
        states: Sequence[Mapping[str, Tensor]],
        data: Iterable[Any] | Tensor | None = None,
        *,
        spec: PermutationSpec | None = None,
        forward_context: ForwardContext = nullcontext,
    ) -> list[Permutations]:
        """Permutations from activation statistics of ``reference`` and each state on ``data``."""
        if data is None:
            raise ValueError("Activation matching needs data=... (batches of the merging agent's inputs).")
        first, inputs = peek_inputs(reference, data)
        spec = spec if spec is not None else spec_for(reference, first, None, self.probes)
        return match_activations(
            spec, reference, states, inputs, forward_context, identity_bias=self.identity_bias
        )


@register_matcher("weight", "wm")
@dataclass
class WeightMatcher(Matcher):
    """Weight matching (the paper's WM, Git Re-Basin): permutations from the weights alone.

    Args:
        max_iterations: coordinate-descent sweeps over the groups at most.
        seed: order in which groups are visited.
        identity_bias: λ favouring the identity in each assignment (see :class:`ActivationMatcher`).
    """

    uses_spec: ClassVar[bool] = True
    max_iterations: int = 100
    seed: int = 0
    identity_bias: float = 0.0

    def match(
        self,
        reference: nn.Module,
        states: Sequence[Mapping[str, Tensor]],
        data: Iterable[Any] | Tensor | None = None,
        *,
        spec: PermutationSpec | None = None,
        forward_context: ForwardContext = nullcontext,
    ) -> list[Permutations]:
        """Permutations maximising the inner products of ``reference``'s and each state's weights."""
        spec = matcher_spec(self, reference, data, spec)
        assert spec is not None
        own = reference.state_dict()
        return [
            match_weights(
                spec,
                own,
                state,
                max_iterations=self.max_iterations,
                seed=self.seed,
                identity_bias=self.identity_bias,
            )
            for state in states
        ]
