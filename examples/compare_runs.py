"""Prints the mean test accuracy of runs written by ``AgentReport`` side by side.

python examples/compare_runs.py outputs/quickstart outputs/quickstart_local
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(directories: list[str]) -> None:
    print(f"{'run':<32} {'mean test acc':>14} {'per agent'}")
    for directory in directories:
        path = Path(directory) / "accuracy_test.json"
        if not path.exists():
            sys.exit(f"{path} does not exist: run the config with test_after_fit: true first.")
        record = json.loads(path.read_text())
        agents = " ".join(f"{value:.3f}" for value in record["agents"].values())
        print(f"{directory:<32} {record['mean']:>14.4f} [{agents}]")


if __name__ == "__main__":
    main(sys.argv[1:])
