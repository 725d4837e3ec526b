"""The Makefile's install path: the pinned PyTorch by default, CPU-only wheels when asked (dry runs only)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup_commands(*variables: str) -> str:
    """What ``make setup`` would run (``-n``: printed, not run; ``-B``: as on a fresh clone)."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed; the README's two commands need it")
    done = subprocess.run(
        ["make", "-n", "-B", "setup", *variables], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_the_default_install_is_the_pinned_build() -> None:
    (torch_line,) = [line for line in setup_commands().splitlines() if "torch" in line and "pip" in line]
    assert "torch==2.14.1 torchvision==0.29.1" in torch_line and "--index-url" not in torch_line


def test_a_cpu_only_install_takes_the_wheel_index_and_packages_given() -> None:
    commands = setup_commands(
        "TORCH_INDEX=https://download.pytorch.org/whl/cpu", "TORCH_PACKAGES=torch torchvision"
    )
    (torch_line,) = [line for line in commands.splitlines() if "index-url" in line]
    assert torch_line.endswith("--index-url https://download.pytorch.org/whl/cpu torch torchvision")
