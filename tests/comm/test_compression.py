"""Compressed exchanges (comm/compression.py, MergeRound.gather(compression=...), the callbacks' option):
round-trip error within the codec's step, integer buffers untouched, bytes counted as encoded, an agent's
own state exact, "none" bit for bit as before. W=2 ≡ W=1 with int8: tests/strategy/test_scaleout_methods.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from helpers import BlobsData, TinyNet, agent_states, make_trainer
from lightning.pytorch import Callback
from torch import Tensor, nn

from lightning_dimat import CDSGDCallback, DIMATStrategy, MergeCallback, SGPCallback
from lightning_dimat.comm.compression import COMPRESSIONS, resolve_compression
from lightning_dimat.comm.ledger import CommunicationLedger
from lightning_dimat.merge.state import state_bytes
from lightning_dimat.models import resnet20
from lightning_dimat.strategy import AgentHandle, MergeRound
from lightning_dimat.topology import build_topology

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _step(tensor: Tensor) -> float:
    """The int8 quantisation step of ``tensor``: max|x| / 127."""
    return float(tensor.double().abs().max()) / 127


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _random_state(dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv": (torch.randn(16, 3, 3, 3, generator=generator) * 0.2).to(dtype),
        "large": (torch.randn(300, generator=generator) * 1e3).to(dtype),
        "small": (torch.randn(50, generator=generator) * 1e-4).to(dtype),
        "skewed": torch.cat([torch.full((1,), 9.0), torch.rand(99, generator=generator)]).to(dtype),
        "steps": torch.tensor(12, dtype=torch.int64),
    }


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_int8_round_trip_error_is_within_the_quantisation_step(dtype: torch.dtype) -> None:
    codec = COMPRESSIONS.get("int8")
    state = _random_state(dtype)
    decoded = codec.decode(codec.encode(state))
    assert list(decoded) == list(state)
    for key, original in state.items():
        assert decoded[key].dtype == original.dtype and decoded[key].shape == original.shape, key
        if not original.is_floating_point():
            assert decoded[key] is original
            continue
        error = float((decoded[key].double() - original.double()).abs().max())
        # s/2 from rounding to the nearest code (q·s itself is rounded: up to 127·2⁻²⁴·s more in float32); a
        # 16-bit original adds its own rounding on the way back.
        bound = _step(original) * (0.5 + 1e-5 if original.element_size() >= 4 else 1.0)
        assert 0 < error <= bound, (key, error, bound)


def test_int8_zero_non_finite_and_one_element_tensors() -> None:
    codec = COMPRESSIONS.get("int8")
    state = {
        "zeros": torch.zeros(3, 4),
        "nan": torch.tensor([1.0, float("nan"), 2.0]),
        "inf": torch.tensor([1.0, float("-inf"), 2.0]),
        "scalar": torch.tensor(0.123456789),  # 4 bytes; as int8 it would be 1 + 4
    }
    payload = codec.encode(state)
    decoded = codec.decode(payload)
    assert torch.equal(decoded["zeros"], state["zeros"])
    assert decoded["nan"].isnan().all() and decoded["inf"].isnan().all()  # non-finite stays non-finite
    assert decoded["scalar"] is state["scalar"] and "scalar" in payload
    assert payload["zeros@float32"].dtype == torch.int8 and float(payload["zeros@float32@scale"]) == 0.0


@pytest.mark.parametrize(("name", "relative", "absolute"), [("bf16", 2**-8, 0.0), ("fp16", 2**-11, 2**-25)])
def test_casts_round_trip_within_their_precision(name: str, relative: float, absolute: float) -> None:
    codec = COMPRESSIONS.get(name)
    for dtype in (torch.float32, torch.float64):
        state = _random_state(dtype)
        decoded = codec.decode(codec.encode(state))
        for key, original in state.items():
            assert decoded[key].dtype == original.dtype, key
            error = (decoded[key].double() - original.double()).abs()
            assert (error <= relative * original.double().abs() + absolute).all(), key
    saturating = {"w": torch.tensor([1e5, -1e6, float("inf"), float("nan"), 0.5])}
    decoded = codec.decode(codec.encode(saturating))["w"]
    limit = torch.finfo(codec.dtype).max  # type: ignore[attr-defined]
    expected = torch.tensor([1e5, -1e6]).clamp(-limit, limit)  # fp16 saturates at ±65504, bf16 need not
    assert ((decoded[:2] - expected).abs() <= relative * expected.abs()).all()
    assert decoded[2] == float("inf") and decoded[3].isnan() and decoded[4] == 0.5


def test_nothing_is_encoded_that_would_not_shrink() -> None:
    state = {
        "bf16": torch.randn(8).to(torch.bfloat16),
        "fp16": torch.randn(8).to(torch.float16),
        "steps": torch.tensor(3),
        "mask": torch.tensor([True, False]),
    }
    for name in ("bf16", "fp16"):  # a 16-bit tensor is not re-cast (fp16 ↔ bf16 would only lose)
        payload = COMPRESSIONS.get(name).encode(state)
        assert all(payload[key] is value for key, value in state.items()), name
    payload = COMPRESSIONS.get("int8").encode(state)
    assert payload["steps"] is state["steps"] and payload["mask"] is state["mask"]
    assert payload["bf16@bfloat16"].dtype == torch.int8  # 16 bytes -> 8 + a 4-byte scale


@pytest.mark.parametrize("name", ["none", "bf16", "fp16", "int8"])
def test_integer_buffers_are_bit_identical_and_exact_entries_untouched(name: str) -> None:
    codec = COMPRESSIONS.get(name)
    state = _conv_net().state_dict()
    state["weight_of_push_sum"] = torch.tensor(0.3, dtype=torch.float64)
    payload = codec.encode(state, exact=("weight_of_push_sum", "0.weight"))
    decoded = codec.decode(payload)
    assert list(decoded) == list(state)
    for key, value in state.items():
        if not value.is_floating_point() or key in ("weight_of_push_sum", "0.weight"):
            assert decoded[key].dtype == value.dtype and torch.equal(decoded[key], value), key
    # The payload layout depends on the architecture only: any two agents' payloads can be exchanged.
    other = codec.encode(
        {key: value * 3 + 1 for key, value in state.items()}, exact=("weight_of_push_sum", "0.weight")
    )
    assert [(k, v.shape, v.dtype) for k, v in payload.items()] == [
        (k, v.shape, v.dtype) for k, v in other.items()
    ]
    assert COMPRESSIONS.get(name).lossless == (name == "none")


@pytest.mark.parametrize(
    "make", [lambda: _conv_net(), lambda: resnet20(num_classes=10)], ids=["conv_bn", "resnet20"]
)
def test_int8_cuts_the_bytes_of_float32_models_by_at_least_3_5x(make: Any) -> None:
    state = make().state_dict()
    for value in state.values():  # trained-looking statistics, not BatchNorm's ones and zeros
        if value.is_floating_point():
            value.copy_(torch.randn_like(value))
    ratios = {}
    for name, expected in (("bf16", 1.99), ("fp16", 1.99), ("int8", 3.5)):
        codec = COMPRESSIONS.get(name)
        payload = codec.encode(state)
        ratios[name] = state_bytes(state) / codec.payload_bytes(payload)
        assert ratios[name] >= expected, (name, ratios[name])
    payload = COMPRESSIONS.get("int8").encode(state)
    decoded = COMPRESSIONS.get("int8").decode(payload)
    worst = max(
        float((decoded[k] - v).abs().max()) / _step(v) for k, v in state.items() if v.is_floating_point()
    )
    assert worst <= 0.5 + 1e-5, worst


def test_unknown_compressions_and_tagged_keys_are_refused() -> None:
    message = r"compression must be 'bf16', 'fp16', 'int8' or 'none', got 'int4'\."
    for make in (MergeCallback, CDSGDCallback, SGPCallback, resolve_compression):
        with pytest.raises(ValueError, match=message):
            make(compression="int4")
    assert resolve_compression("INT8") is COMPRESSIONS.get("int8")
    with pytest.raises(ValueError, match=r"'a@b'.*must not contain '@'"):
        COMPRESSIONS.get("int8").encode({"a@b": torch.ones(4)})


def _round(states: dict[int, dict[str, Tensor]], ledger: CommunicationLedger) -> MergeRound:
    topology = build_topology("ring", len(states))
    handles = {
        g: AgentHandle(g, None, None, [], topology.weights(g), contextlib.nullcontext)  # type: ignore[arg-type]
        for g in states
    }
    return MergeRound(0, topology, handles, states, contextlib.nullcontext, lambda *_: ({}, 0), ledger)


def test_a_round_merges_decoded_neighbours_with_each_agents_own_exact_state() -> None:
    snapshot = {g: {"w": torch.randn(64) * (g + 1), "n": torch.tensor(g)} for g in range(3)}
    ledgers = {name: CommunicationLedger() for name in ("none", "int8")}
    plain = _round(snapshot, ledgers["none"]).gather()
    states = _round(snapshot, ledgers["int8"]).gather(compression="int8")
    for g in range(3):
        assert plain[g]["w"] is snapshot[g]["w"] and plain.seen_by(g)[g]["w"] is snapshot[g]["w"]
        assert states.seen_by(g)[g]["w"] is snapshot[g]["w"]  # its own state: never compressed
        error = float((states[g]["w"] - snapshot[g]["w"]).abs().max())
        assert 0 < error <= _step(snapshot[g]["w"]) * (0.5 + 1e-5)  # what its neighbours merge
        assert states[g]["n"] is snapshot[g]["n"]
    # Ring of 3: each agent sends to 2 neighbours; int8 payload = 64 codes + a float32 scale + the int64.
    assert ledgers["none"].bytes_sent == dict.fromkeys(range(3), 2 * (64 * 4 + 8))
    assert ledgers["int8"].bytes_sent == dict.fromkeys(range(3), 2 * (64 + 4 + 8))


class _PreMerge(Callback):
    """Keeps every agent's state right before the merge that ends the last epoch (runs before the merge)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.is_last_batch and trainer.current_epoch == trainer.max_epochs - 1:
            self.states = agent_states(trainer)


def _fit(*callbacks: Callback, max_epochs: int = 1) -> Any:
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, topology="ring", partition="by_class"),
        callbacks=list(callbacks),
        max_epochs=max_epochs,
    )
    trainer.fit(TinyNet(momentum=0.9), datamodule=BlobsData())
    return trainer


def test_compression_none_is_the_default_bit_for_bit() -> None:
    default = _fit(MergeCallback(every_n_epochs=1, num_batches=2))
    none = _fit(MergeCallback(every_n_epochs=1, num_batches=2, compression="none"))
    a, b = agent_states(default), agent_states(none)
    assert all(torch.equal(a[g][k], b[g][k]) for g in a for k in a[g])
    assert default.callback_metrics["comm/bytes_sent"] == none.callback_metrics["comm/bytes_sent"]


def test_an_int8_merge_moves_each_agent_by_at_most_its_neighbours_half_steps() -> None:
    # Plain averaging without BatchNorm re-estimation after the last epoch: the runs are identical up to
    # the merge, and then x_i^int8 − x_i = Σ_{j≠i} π_ij (x̃_j − x_j) with |x̃_j − x_j| ≤ s_j / 2 per tensor.
    runs = {}
    for name in ("none", "int8"):
        recorder = _PreMerge()
        merge = MergeCallback(every_n_epochs=1, method="average", recompute_batchnorm=False, compression=name)
        trainer = _fit(recorder, merge)
        runs[name] = (recorder.states, agent_states(trainer), trainer)
    before, exact, trainer = runs["none"]
    assert all(torch.equal(before[g][k], runs["int8"][0][g][k]) for g in before for k in before[g])
    compressed = runs["int8"][1]
    topology = trainer.strategy.topology
    moved = 0.0
    for i in exact:
        for key, value in exact[i].items():
            difference = float((compressed[i][key].double() - value.double()).abs().max())
            if not value.is_floating_point():
                assert difference == 0.0, key
                continue
            bound = sum(w * _step(before[j][key]) / 2 for j, w in topology.weights(i).items() if j != i)
            assert difference <= bound * (1 + 1e-4) + 1e-7, (i, key, difference, bound)
            moved = max(moved, difference)
    assert moved > 0
    # comm/bytes_sent counts the encoded states: ring of 3, 2 receivers per agent, one merge.
    codec = COMPRESSIONS.get("int8")
    payload_bytes = codec.payload_bytes(codec.encode(before[0]))
    assert float(runs["int8"][2].callback_metrics["comm/bytes_sent"]) == 3 * 2 * payload_bytes
    assert float(trainer.callback_metrics["comm/bytes_sent"]) == 3 * 2 * state_bytes(before[0])


def test_gossip_sends_compressed_states_but_the_exact_push_sum_weight() -> None:
    plain, compressed = SGPCallback(), SGPCallback(compression="bf16")
    _fit(plain)
    _fit(compressed)
    assert compressed.push_weights == plain.push_weights  # bit for bit: weights never compressed
    numerator = plain.numerators[0]
    assert any(not torch.equal(numerator[k], compressed.numerators[0][k]) for k in numerator)
    assert compressed.ledger.bytes_sent[0] < 0.55 * plain.ledger.bytes_sent[0]
    cdsgd = CDSGDCallback(compression="int8")
    trainer = _fit(cdsgd)
    assert all(torch.isfinite(v).all() for state in agent_states(trainer).values() for v in state.values())
    codec = COMPRESSIONS.get("int8")
    payload_bytes = codec.payload_bytes(codec.encode(agent_states(trainer)[0]))
    assert cdsgd.ledger.bytes_sent[0] == cdsgd.steps * 2 * payload_bytes  # ring: 2 receivers per step
