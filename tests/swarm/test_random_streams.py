"""One random stream per agent (swarm/random_streams.py): independent of the global stream and of each
other, saved and restored with checkpoints, and numpy/python randomness tracked on request."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from helpers import BlobsData, TinyNet, make_trainer
from lightning.pytorch import Callback

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.swarm import AgentRandomStreams


def test_random_streams_are_per_agent_and_leave_the_global_stream_alone() -> None:
    every = ("torch", "numpy", "python")
    streams = AgentRandomStreams(seed=5, agent_ids=[0, 1], libraries=every)
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    with streams.activate(0):
        a0 = (torch.rand(2), np.random.rand(), random.random())
    with streams.activate(1):
        b0 = torch.rand(2)
    with streams.activate(0):
        a1 = torch.rand(2)
        with streams.activate(0):  # re-entrant: continues the same stream
            a2 = torch.rand(2)
    assert torch.equal(torch.rand(3), expected_global)
    assert not torch.equal(a0[0], b0) and not torch.equal(a0[0], a1) and not torch.equal(a1, a2)
    replay = AgentRandomStreams(seed=5, agent_ids=[0, 1], libraries=every)
    with replay.activate(0):
        assert torch.equal(torch.rand(2), a0[0])
        assert np.random.rand() == a0[1] and random.random() == a0[2]


def test_random_streams_round_trip_through_state_dict() -> None:
    streams = AgentRandomStreams(seed=0, agent_ids=[3, 4])
    with streams.activate(3):
        torch.rand(5)
    saved = streams.state_dict()
    with streams.activate(3):
        expected = torch.rand(4)
    restored = AgentRandomStreams(seed=99, agent_ids=[3, 4])
    restored.load_state_dict(saved)
    with restored.activate(3):
        assert torch.equal(torch.rand(4), expected)
    with pytest.raises(KeyError, match="agent 7"):
        AgentRandomStreams(seed=0, agent_ids=[7]).load_state_dict(saved)


def test_a_cpu_checkpoint_resumed_on_a_gpu_keeps_each_agents_own_cuda_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stand-in CUDA generator (this suite runs without a GPU): its state is the last seed it was given.
    generator = {"state": torch.tensor([0])}
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: generator.update(state=torch.tensor([seed])))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: generator["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: generator.update(state=state))
    on_gpu = AgentRandomStreams(seed=0, agent_ids=[0, 1], device=torch.device("cuda", 0))
    seeded = {g: state["cuda"] for g, state in on_gpu.state_dict().items()}
    assert not torch.equal(seeded[0], seeded[1])
    on_gpu.load_state_dict(AgentRandomStreams(seed=0, agent_ids=[0, 1]).state_dict())  # (no "cuda" in it)
    for g, state in on_gpu.state_dict().items():
        assert torch.equal(state["cuda"], seeded[g]), g


class _NoisyTransfer(TinyNet):
    """Random augmentation in a transfer hook: it runs in the agent's random stream."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x + torch.rand_like(x), y


class _StreamsAtTrainStart(Callback):
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.streams = trainer.strategy.swarm.streams.state_dict()


def test_the_example_batch_that_derives_the_spec_draws_nothing_from_an_agents_stream() -> None:
    def streams_at_start(callbacks: list[Callback]) -> dict[int, dict[str, Any]]:
        recorder = _StreamsAtTrainStart()
        trainer = make_trainer(strategy=DIMATStrategy(num_agents=2), callbacks=[*callbacks, recorder])
        trainer.fit(_NoisyTransfer(), datamodule=BlobsData())
        return recorder.streams

    # MergeCallback's on_train_start draws one prepared batch of agent 0 (through its transfer hooks).
    with_example = streams_at_start([MergeCallback(every_n_epochs=1, method="activation")])
    without = streams_at_start([])
    for g in (0, 1):
        assert torch.equal(with_example[g]["torch"], without[g]["torch"]), g


class _NumpyNoise(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        noisy = x + torch.from_numpy(np.random.randn(*x.shape).astype("float32"))
        return super().training_step((noisy, y), batch_idx)


def test_untracked_numpy_randomness_warns_and_tracking_it_keeps_agents_independent() -> None:
    with pytest.warns(UserWarning, match=r"random_streams=\('torch', 'numpy', 'python'\)"):
        make_trainer(strategy=DIMATStrategy(num_agents=2), max_epochs=1).fit(
            _NumpyNoise(), datamodule=BlobsData()
        )

    def agent_one(num_agents: int) -> torch.Tensor:
        strategy = DIMATStrategy(num_agents=num_agents, random_streams=("torch", "numpy"), partition="iid")
        trainer = make_trainer(strategy=strategy, max_epochs=1)
        trainer.fit(_NumpyNoise(), datamodule=BlobsData())
        return trainer.strategy.swarm.agent(1).net[0].weight.detach().clone()

    # Agent 1's numpy draws come from its own stream, not from the global one.
    np.random.seed(0)
    first = agent_one(2)
    np.random.seed(1)
    assert torch.equal(first, agent_one(2))


def test_random_streams_option_is_validated() -> None:
    with pytest.raises(ValueError, match="random_streams must include 'torch'"):
        DIMATStrategy(random_streams=("numpy",))
    with pytest.raises(ValueError, match="random_streams must include 'torch'"):
        DIMATStrategy(random_streams=("torch", "jax"))
