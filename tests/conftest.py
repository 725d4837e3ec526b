"""pytest configuration: W&B offline, the shared helpers importable from every test folder, a fixture that
runs a test in a fresh working directory, the shared 20-class Tiny ImageNet zip, and the longest test files
collected first."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Test files live in folders that mirror the package (tests/permutation/, tests/strategy/, ...); they import
# the modules beside this file (helpers, permutation_helpers) by name.
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


# The files whose subprocesses take most of the suite's time start first: `make test` runs three workers, a
# file at a time each (handed out round-robin at the start), and a long file picked up last would leave the
# other workers idle at the end.
LONGEST_FILES = (
    "tests/strategy/test_scaleout.py",
    "tests/test_benchmarks.py",
    "tests/strategy/test_scaleout_methods.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # (stable: the order within a file is kept)


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_zip() -> Path:
    """The 20-class Tiny ImageNet subset (``../shared/data``); tests that need it are skipped without it."""
    from helpers import TINY_ZIP

    if not TINY_ZIP.is_file():
        pytest.skip(f"{TINY_ZIP} is absent (the 20-class Tiny ImageNet subset, see shared/data/README.md)")
    return TINY_ZIP
