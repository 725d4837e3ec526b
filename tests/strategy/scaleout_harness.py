"""Running one DIMAT run (tests/strategy/scaleout_run.py) on two processes as a subprocess, exactly as a user
starts one, and the same run on one process in the test's own process meanwhile (a subprocess would spend most
of its time importing torch and Lightning again). Used by test_scaleout.py and test_scaleout_methods.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import scaleout_run  # (beside this file: pytest puts its folder on sys.path)
import torch

SCRIPT = Path(__file__).parent / "scaleout_run.py"


class Started:
    """A run started in a subprocess (its output goes to files, so it never blocks on a full pipe)."""

    def __init__(
        self, tmp: Path, name: str, *args: str, expect_failure: bool = False, timeout: float = 240
    ) -> None:
        self.output, self.log = tmp / f"{name}.pt", tmp / f"{name}.log"
        self.expect_failure, self.timeout = expect_failure, timeout
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--output", str(self.output), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
            )

    def result(self) -> dict[str, Any]:
        """Waits for the run; what its rank 0 saved."""
        try:
            returncode = self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        if self.expect_failure:
            assert returncode != 0
        else:
            assert returncode == 0, self.log.read_text()[-4000:]
        return torch.load(self.output, weights_only=False)


def run_subprocess(tmp: Path, name: str, *args: str, **options: Any) -> dict[str, Any]:
    """Starts a run in a subprocess and waits for it (``options``: those of :class:`Started`)."""
    return Started(tmp, name, *args, **options).result()


def in_process(*args: str) -> dict[str, Any]:
    """A one-process run in this test's own process (no second import of torch and Lightning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = scaleout_run.run(scaleout_run.parse(["--devices", "1", *args]))
    finally:
        torch.set_num_threads(threads)
    assert result is not None
    return result


def one_and_two_processes(tmp: Path, *args: str, **two_only: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same run in one process (here) and in two (a subprocess), side by side; ``two_only``: extra
    ``--option value`` arguments of the two-process run (e.g. ``checkpoints=...``)."""
    extra = [item for key, value in two_only.items() for item in (f"--{key}", value)]
    two = Started(tmp, "two_processes", "--devices", "2", *args, *extra)
    try:
        one = in_process(*args)
    except BaseException:
        two.process.kill()  # (its rank 1 ends when rank 0's connection closes)
        raise
    return one, two.result()


def max_difference(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> float:
    """The largest absolute difference between two runs' ``{agent: state_dict}``."""
    assert sorted(a) == sorted(b)
    return max(float((a[g][k].double() - b[g][k].double()).abs().max()) for g in a for k in a[g])
