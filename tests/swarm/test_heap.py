"""DIMATStrategy(release_memory=...) (swarm/heap.py): freed heap memory is handed back after each agent's
backward when asked or when "auto" finds CPU + glibc, training is bit for bit the same, bad values are refused
when the strategy is built."""

from __future__ import annotations

import pytest
import torch
from helpers import BlobsData, TinyNet, agent_states, make_trainer
from lightning.pytorch import Trainer

import lightning_dimat.swarm.heap as heap
from lightning_dimat import DIMATStrategy

requires_glibc = pytest.mark.skipif(not heap.heap_release_available(), reason="needs glibc's malloc_trim")


def _fit(release_memory: bool | str, calls: list[int], monkeypatch: pytest.MonkeyPatch) -> Trainer:
    release = heap.release_freed_heap

    def counted() -> None:
        calls.append(1)
        release()

    monkeypatch.setattr(heap, "release_freed_heap", counted)
    trainer = make_trainer(
        strategy=DIMATStrategy(num_agents=3, release_memory=release_memory),
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
    )
    trainer.fit(TinyNet(), datamodule=BlobsData())
    return trainer


@requires_glibc
def test_auto_releases_after_every_agents_backward_and_training_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released: list[int] = []
    kept: list[int] = []
    with_release = agent_states(_fit("auto", released, monkeypatch))
    without = agent_states(_fit(False, kept, monkeypatch))
    assert len(released) == 3 * 4  # 3 agents × 4 batches
    assert kept == []
    for agent_id, state in without.items():
        for key, value in state.items():
            assert torch.equal(with_release[agent_id][key], value), (agent_id, key)


def test_auto_is_off_for_agents_on_a_gpu() -> None:
    assert heap.heap_release_mode("auto", torch.device("cuda", 0)) is False
    assert heap.heap_release_mode(True, torch.device("cuda", 0)) is True


@pytest.mark.parametrize("value", ["yes", 1, None, "True"])
def test_a_bad_value_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match=rf"release_memory must be True, False or 'auto', got {value!r}"):
        DIMATStrategy(num_agents=2, release_memory=value)  # type: ignore[arg-type]


def test_true_is_refused_where_the_platform_cannot_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "heap_release_available", lambda: False)
    with pytest.raises(ValueError, match=r"release_memory=True needs glibc's malloc_trim.*'auto' or False"):
        DIMATStrategy(num_agents=2, release_memory=True)
    assert DIMATStrategy(num_agents=2, release_memory="auto").release_memory == "auto"
    assert heap.heap_release_mode("auto", torch.device("cpu")) is False
