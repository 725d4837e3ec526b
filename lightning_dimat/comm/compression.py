"""Codecs for the agent states that cross the wire: ``none``, ``bf16``, ``fp16`` and ``int8``.

A codec turns a ``state_dict`` into a *payload* — again a flat ``{name: tensor}`` dict, so the transport
moves it like any state (one buffer per dtype) — and a payload back into a state:

- ``none``: the state itself (the default; nothing changes, bit for bit).
- ``bf16`` / ``fp16``: every floating tensor wider than 16 bits is cast to bfloat16 / float16 and cast back
  on arrival. Finite values beyond the format's range saturate at its largest value (fp16: ±65504) instead
  of becoming infinite; NaN and ±inf stay what they are. Error per value: at most 2⁻⁸·|x| (bf16) or
  2⁻¹¹·|x| + 2⁻²⁵ (fp16, whose smallest numbers are subnormal) inside the range.
- ``int8``: every floating tensor is sent as int8 data with one symmetric per-tensor scale
  s = max|x| / 127 (float32; float64 for float64 tensors): q = round(x / s) in [-127, 127], decoded as
  q · s. Error per value: at most s / 2 (plus the rounding of a 16-bit original on the way back, below s / 2).
  An all-zero tensor decodes to zeros; a tensor holding NaN or ±inf decodes to all NaN, so a non-finite
  agent stays non-finite for its neighbours' checks.

Integer and boolean tensors (BatchNorm's ``num_batches_tracked``) are never touched, nor is a floating
tensor whose encoding would not be smaller (a one-element float32 costs 4 bytes; as int8 it would cost 1 + 4),
nor the entries named in ``exact``. Which entries are encoded depends on the architecture alone (keys, shapes,
dtypes), never on the values, so every agent's payload has the same layout and processes can exchange them.

A payload is self-describing: an encoded entry is stored as ``"<key>@<original dtype>"`` and its int8 scale
as ``"<key>@<original dtype>@scale"``, so :meth:`Codec.decode` needs nothing but the payload (keys of a
compressed state must not contain ``@``). :meth:`Codec.payload_bytes` is what the payload costs on the wire.

Codecs are kept in :data:`COMPRESSIONS`, so configs name them (``compression: int8``); add one with
``COMPRESSIONS.add("name", MyCodec())``.

Examples:
    >>> import torch
    >>> codec = COMPRESSIONS.get("int8")
    >>> state = {"w": torch.tensor([0.5, -1.27, 0.0]), "n": torch.tensor(7)}
    >>> payload = codec.encode(state)
    >>> {key: value.dtype for key, value in payload.items()}
    {'w@float32': torch.int8, 'w@float32@scale': torch.float32, 'n': torch.int64}
    >>> codec.decode(payload)["w"]
    tensor([ 0.5000, -1.2700,  0.0000])
    >>> codec.payload_bytes(payload), codec.payload_bytes(state)
    (15, 20)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from typing import ClassVar

import torch
from torch import Tensor

from lightning_dimat.merge.state import StateDict, state_bytes
from lightning_dimat.registry import Registry
from lightning_dimat.validation import check_choice

SEPARATOR = "@"
"""Joins a key and its original dtype in a payload (``"conv.weight@float32"``)."""
SCALE = "scale"
"""The suffix of an int8 entry's scale (``"conv.weight@float32@scale"``)."""
INT8_LEVELS = 127
"""int8 codes run over [-127, 127]: symmetric, so that 0 is exact and -x decodes to minus x's value."""


class Codec(ABC):
    """Turns a state into what crosses the wire (:meth:`encode`) and back (:meth:`decode`).

    Attributes:
        name: the name the codec is registered under.
        lossless: ``decode(encode(state))`` gives back ``state`` exactly.
    """

    name: str = ""
    lossless: ClassVar[bool] = False

    @abstractmethod
    def encode(self, state: Mapping[str, Tensor], exact: Collection[str] = ()) -> StateDict:
        """The payload of ``state``; the entries named in ``exact`` are sent as they are."""

    @abstractmethod
    def decode(self, payload: Mapping[str, Tensor]) -> StateDict:
        """The state that ``payload`` encodes: same keys in the same order, same dtypes and shapes."""

    def payload_bytes(self, payload: Mapping[str, Tensor]) -> int:
        """The bytes ``payload`` costs on the wire (every tensor at its own dtype)."""
        return state_bytes(payload)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class NoCompression(Codec):
    """The state as it is: ``encode`` and ``decode`` only copy the dict (the tensors are shared).

    Examples:
        >>> state = {"w": torch.ones(2)}
        >>> NoCompression().decode(NoCompression().encode(state))["w"] is state["w"]
        True
    """

    name = "none"
    lossless = True

    def encode(self, state: Mapping[str, Tensor], exact: Collection[str] = ()) -> StateDict:
        return dict(state)

    def decode(self, payload: Mapping[str, Tensor]) -> StateDict:
        return dict(payload)


class PerTensorCodec(Codec):
    """A codec that encodes each floating tensor on its own into data and an optional scale.

    Subclasses say which tensors shrink (:meth:`shrinks`), and how one tensor is encoded
    (:meth:`encode_tensor`) and decoded (:meth:`decode_tensor`); the payload layout is shared.
    """

    @abstractmethod
    def shrinks(self, tensor: Tensor) -> bool:
        """Whether encoding ``tensor`` makes it smaller (only then is it encoded)."""

    @abstractmethod
    def encode_tensor(self, tensor: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(data, scale or None)`` for one floating tensor."""

    @abstractmethod
    def decode_tensor(self, data: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The tensor of dtype ``dtype`` that :meth:`encode_tensor` turned into ``data`` and ``scale``."""

    def encode(self, state: Mapping[str, Tensor], exact: Collection[str] = ()) -> StateDict:
        payload: StateDict = {}
        for key, tensor in state.items():
            if SEPARATOR in key:
                raise ValueError(
                    f"compression={self.name!r} cannot send the state entry {key!r}: keys of a compressed "
                    f"state must not contain {SEPARATOR!r} (it tags encoded entries). Rename the module or "
                    "buffer, or use compression='none'."
                )
            if key in exact or not self.shrinks(tensor):
                payload[key] = tensor
                continue
            tag = f"{key}{SEPARATOR}{_dtype_name(tensor.dtype)}"
            data, scale = self.encode_tensor(tensor.detach())
            payload[tag] = data
            if scale is not None:
                payload[f"{tag}{SEPARATOR}{SCALE}"] = scale
        return payload

    def decode(self, payload: Mapping[str, Tensor]) -> StateDict:
        state: StateDict = {}
        for tag, data in payload.items():
            key, _, dtype_name = tag.partition(SEPARATOR)
            if not dtype_name:
                state[key] = data
            elif not dtype_name.endswith(f"{SEPARATOR}{SCALE}"):
                scale = payload.get(f"{tag}{SEPARATOR}{SCALE}")
                state[key] = self.decode_tensor(data, scale, _dtype(dtype_name))
        return state


class CastCodec(PerTensorCodec):
    """Floating tensors wider than ``dtype`` are sent as ``dtype`` (finite values saturate at its range).

    Examples:
        >>> codec = CastCodec(torch.float16, "fp16")
        >>> codec.decode(codec.encode({"w": torch.tensor([1e5, -float("inf"), 0.1])}))["w"]
        tensor([6.5504e+04,       -inf, 9.9976e-02])
    """

    def __init__(self, dtype: torch.dtype, name: str) -> None:
        self.dtype = dtype
        self.name = name

    def shrinks(self, tensor: Tensor) -> bool:
        return tensor.is_floating_point() and tensor.element_size() > _element_size(self.dtype)

    def encode_tensor(self, tensor: Tensor) -> tuple[Tensor, Tensor | None]:
        limit = torch.finfo(self.dtype).max
        saturated = torch.where(tensor.isfinite(), tensor.clamp(-limit, limit), tensor)
        return saturated.to(self.dtype), None

    def decode_tensor(self, data: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
        return data.to(dtype)


class Int8Codec(PerTensorCodec):
    """Symmetric per-tensor int8: q = round(x / s), s = max|x| / 127, decoded as q · s (|error| ≤ s / 2).

    Examples:
        >>> codec = Int8Codec()
        >>> payload = codec.encode({"w": torch.tensor([1.0, -0.5, 0.25])})
        >>> payload["w@float32"], payload["w@float32@scale"] * 127
        (tensor([127, -64,  32], dtype=torch.int8), tensor(1.))
        >>> codec.decode(codec.encode({"w": torch.tensor([0.0, float("nan")])}))["w"]
        tensor([nan, nan])
    """

    name = "int8"

    def shrinks(self, tensor: Tensor) -> bool:
        if not tensor.is_floating_point():
            return False
        encoded = tensor.numel() + _element_size(_scale_dtype(tensor.dtype))
        return encoded < tensor.numel() * tensor.element_size()

    def encode_tensor(self, tensor: Tensor) -> tuple[Tensor, Tensor | None]:
        values = tensor.to(_scale_dtype(tensor.dtype))
        largest = values.abs().amax()
        finite = largest.isfinite()
        scale = torch.where(finite, largest / INT8_LEVELS, torch.full_like(largest, float("nan")))
        divisor = torch.where(finite & (largest > 0), scale, torch.ones_like(scale))
        codes = torch.round(values / divisor).clamp_(-INT8_LEVELS, INT8_LEVELS)
        codes = torch.where(finite, codes, torch.zeros_like(codes))  # a NaN has no int8 code
        return codes.to(torch.int8), scale

    def decode_tensor(self, data: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
        if scale is None:
            raise ValueError("An int8 payload entry arrived without its scale: the payload is corrupt.")
        return (data.to(scale.dtype) * scale).to(dtype)


COMPRESSIONS: Registry[Codec] = Registry("compression")
"""The codecs configs can name: ``none``, ``bf16``, ``fp16``, ``int8``."""
COMPRESSIONS.add("none", NoCompression())
COMPRESSIONS.add("bf16", CastCodec(torch.bfloat16, "bf16"), "bfloat16")
COMPRESSIONS.add("fp16", CastCodec(torch.float16, "fp16"), "float16")
COMPRESSIONS.add("int8", Int8Codec())


def check_compression(compression: str) -> str:
    """``compression`` if it names a codec in :data:`COMPRESSIONS`; else a ``ValueError`` listing them.

    Examples:
        >>> check_compression("int8")
        'int8'
        >>> check_compression("int4")
        Traceback (most recent call last):
        ...
        ValueError: compression must be 'bf16', 'fp16', 'int8' or 'none', got 'int4'.
    """
    if compression not in COMPRESSIONS:
        check_choice("compression", compression, COMPRESSIONS.names())
    return compression


def resolve_compression(compression: str | Codec) -> Codec:
    """The codec named ``compression`` (see :func:`check_compression`), or ``compression`` if it is one."""
    if isinstance(compression, Codec):
        return compression
    return COMPRESSIONS.get(check_compression(compression))


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 tensors keep a float64 scale (their range and precision); every other one gets float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"A payload entry names {name!r}, which is not a floating dtype: the payload is corrupt."
        )
    return dtype
