"""Name → object registries that YAML configs can name (registry.py): aliases, normalised names, errors."""

from __future__ import annotations

import pytest

from lightning_dimat.registry import Registry


def test_registry_lookup_aliases_and_errors() -> None:
    registry: Registry[int] = Registry("thing")
    registry.add("one-thing", 1, "uno")
    assert registry.get("ONE_thing") == 1 and registry.get("uno") == 1
    assert "one_thing" in registry and registry.names() == ["one_thing"]
    with pytest.raises(ValueError, match="already registered"):
        registry.add("uno", 2)
    with pytest.raises(ValueError, match=r"Unknown thing 'two'\. Known: one_thing"):
        registry.get("two")
    with pytest.raises(TypeError, match="named by a string"):
        registry.get(3)  # type: ignore[arg-type]
