"""DIMATStrategy(release_memory=...) (swarm/heap.py): freed heap memory is handed back after each agent's
backward when asked, or when "auto" finds enough agents on CPU under glibc; training is bit for bit the same;
bad values are refused when the strategy is built."""

from __future__ import annotations

import pytest
import torch
from helpers import BlobsData, TinyNet, agent_states, make_trainer
from lightning.pytorch import Trainer

import lightning_dimat.swarm.heap as heap
from lightning_dimat import DIMATStrategy

REAL_RELEASE = heap.release_freed_heap
requires_glibc = pytest.mark.skipif(not heap.heap_release_available(), reason="needs glibc's malloc_trim")


def _fit(
    release_memory: bool | str, monkeypatch: pytest.MonkeyPatch, num_agents: int = 3, batches: int = 4
) -> tuple[Trainer, list[int]]:
    calls: list[int] = []

    def counted() -> None:
        calls.append(1)
        REAL_RELEASE()

    monkeypatch.setattr(heap, "release_freed_heap", counted)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=num_agents, release_memory=release_memory),
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
    )
    trainer.fit(TinyNet(), datamodule=BlobsData())
    return trainer, calls


@requires_glibc
def test_releases_after_every_agents_backward_and_training_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released, calls = _fit(True, monkeypatch)
    kept, no_calls = _fit(False, monkeypatch)
    assert len(calls) == 3 * 4 and no_calls == []  # 3 agents × 4 batches
    kept_states = agent_states(kept)
    for agent_id, state in agent_states(released).items():
        for key, value in state.items():
            assert torch.equal(kept_states[agent_id][key], value), (agent_id, key)


@requires_glibc
def test_auto_releases_from_the_agent_count_on(monkeypatch: pytest.MonkeyPatch) -> None:
    few, few_calls = _fit("auto", monkeypatch, num_agents=3, batches=1)
    many, many_calls = _fit("auto", monkeypatch, num_agents=heap.AUTO_MIN_AGENTS, batches=1)
    assert few.strategy.swarm.release_heap_after_backward is False and few_calls == []
    assert many.strategy.swarm.release_heap_after_backward is True
    assert len(many_calls) == heap.AUTO_MIN_AGENTS  # (one batch each)


def test_auto_is_off_for_agents_on_a_gpu() -> None:
    assert heap.heap_release_mode("auto", torch.device("cuda", 0), local_agents=1000) is False
    assert heap.heap_release_mode(True, torch.device("cuda", 0), local_agents=2) is True


@pytest.mark.parametrize("value", ["yes", 1, None, "True"])
def test_a_bad_value_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match=rf"release_memory must be True, False or 'auto', got {value!r}"):
        DIMATStrategy(num_agents=2, release_memory=value)  # type: ignore[arg-type]


def test_true_is_refused_where_the_platform_cannot_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "heap_release_available", lambda: False)
    with pytest.raises(ValueError, match=r"release_memory=True needs glibc's malloc_trim.*'auto' or False"):
        DIMATStrategy(num_agents=2, release_memory=True)
    assert DIMATStrategy(num_agents=2, release_memory="auto").release_memory == "auto"
    assert heap.heap_release_mode("auto", torch.device("cpu"), local_agents=1000) is False


def test_yaml_names_the_option() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DIMATStrategy, "strategy")
    for text, value in (("auto", "auto"), ("true", True), ("false", False)):
        assert parser.parse_args(["--strategy.release_memory", text]).strategy.release_memory == value
