"""Prints the test accuracy of runs written by ``AgentReport`` side by side: the agents' mean, the
consensus (the model ``fit`` hands back), and each agent.

python examples/compare_runs.py outputs/quickstart outputs/quickstart_local

Each argument is a run's folder (holding ``accuracy_test.json``) or a logger's folder of versioned runs
(``outputs/quickstart``), of which the latest ``version_<N>`` is read.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def latest_run(directory: Path) -> Path:
    """``directory`` if it holds a test table, else its ``version_<N>`` with the highest N that does."""
    if (directory / "accuracy_test.json").exists():
        return directory
    versions = [
        (int(match.group(1)), path)
        for path in directory.glob("version_*")
        if (match := re.fullmatch(r"version_(\d+)", path.name)) and (path / "accuracy_test.json").exists()
    ]
    if not versions:
        sys.exit(f"No accuracy_test.json in {directory} or its version_<N> folders: run the config first.")
    return max(versions)[1]


def main(directories: list[str]) -> None:
    print(f"{'run':<34} {'agents mean':>11} {'consensus':>10}  per agent")
    for directory in directories:
        run = latest_run(Path(directory))
        record = json.loads((run / "accuracy_test.json").read_text())
        agents = " ".join(f"{value:.3f}" for value in record["agents"].values())
        consensus = record.get("consensus")
        shown = "—" if consensus is None else f"{consensus:.4f}"
        print(f"{run!s:<34} {record['mean']:>11.4f} {shown:>10}  [{agents}]")
        plot = run / "accuracy.png"
        if plot.exists():
            print(f"{'':<34} plot: {plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
