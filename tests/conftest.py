"""pytest configuration: W&B offline, the shared helpers importable from every test folder, and a fixture that
runs a test in a fresh working directory."""

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


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
