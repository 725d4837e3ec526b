"""Time of one DIMAT merge (activation matching) against its forward-pass lower bound.

One agent of a fully connected graph of N=5 merges with its 4 neighbours: ResNet-20 ×8 (3×3 conv shortcuts,
the paper's variant) on 64×64 images, 100 of the agent's own images for the statistics. The merge is the
library's own ``merge_into_basis`` (matching, then permuting + the weighted sum) followed by BatchNorm
re-estimation; it is broken down into forward passes, statistics, linear assignments (LAPs), applying the
permutations + the weighted sum, and BatchNorm re-estimation. The lower bound is what any activation-based
merge must spend: (degree + 1) forward passes over the images, plus one BatchNorm pass — measured in the
same run. Prints and saves ``benchmarks/results/merge_speed.json`` (medians over repeats; goal: ratio <= 1.2).

    python benchmarks/merge_speed.py --repeats 3
    python benchmarks/merge_speed.py --smoke                 # seconds on a CPU: does it still run?
"""

from __future__ import annotations

import argparse
import importlib
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from common import RESULTS, output_path, parse_args, save_json

from lightning_dimat.merge import (
    ActivationMatcher,
    load_state_in_place,
    merge_into_basis,
    recompute_batchnorm,
    state_bytes,
)
from lightning_dimat.models import resnet20
from lightning_dimat.permutation import activation
from lightning_dimat.permutation.cache import spec_for

TINY_IMAGENET = Path(__file__).resolve().parents[1] / "data" / "tiny-imagenet-20.zip"  # as configs/cpu/
SMOKE = {
    "agents": 3,
    "width": 1,
    "image_size": 16,
    "images": 8,
    "batch_size": 4,
    "repeats": 1,
    "device": "cpu",
    "data": None,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Accumulates wall time and calls per label; wraps functions so their calls are timed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._running: set[str] = set()

    @contextmanager
    def time(self, label: str) -> Iterator[None]:
        if label in self._running:  # nested call under the same label: counted by the outer one
            yield
            return
        self._running.add(label)
        self.calls[label] += 1
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[label] += time.perf_counter() - start
            self._running.discard(label)

    def wrap(self, owner: Any, name: str, label: str) -> Callable[[], None]:
        """Times every call of ``owner.name`` under ``label``; returns the undo."""
        return patch(owner, name, self._timed(getattr(owner, name), label))

    def _timed(self, original: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.time(label):
                return original(*args, **kwargs)

        return timed


def patch(owner: Any, name: str, replacement: Any) -> Callable[[], None]:
    """Sets ``owner.name`` to ``replacement``; returns the undo (which also removes an attribute set on an
    instance, so that its class's method shows through again)."""
    had_own = isinstance(owner, ModuleType | type) or name in vars(owner)
    original = getattr(owner, name)
    setattr(owner, name, replacement)

    def undo() -> None:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)

    return undo


def solver_name() -> str:
    """What activation matching calls to solve its assignments: ``solve_assignments`` (all of a match,
    side by side, since the assignments moved off one core) or, in older commits, ``solve_assignment`` (one
    at a time). Timing the former gives the wall time of all of a match's assignments."""
    lookup = sys.modules[activation.match_activations.__module__]
    return "solve_assignments" if hasattr(lookup, "solve_assignments") else "solve_assignment"


def identity_solutions(name: str) -> Callable[..., Any]:
    """A stand-in for the solver ``name`` returning identities (the forward-pass bound solves nothing)."""
    if name == "solve_assignments":
        return lambda scores, *args, **kwargs: [torch.arange(score.shape[0]) for score in scores]
    return lambda score, *args, **kwargs: torch.arange(score.shape[0])


def solver_owners() -> list[ModuleType]:
    """The modules whose global :func:`solver_name` activation matching may call.

    ``match_activations`` looks the solver up in its own module's globals (where ``from ... import
    solve_assignments`` puts it, wherever it is defined); the solver's home module
    (``lightning_dimat.permutation.assignment`` once it moved there) is patched too, for code that calls it
    through that module. A wrapper that never fires is caught by :func:`check_lap_calls`.
    """
    owners = []
    name = solver_name()
    lookup = sys.modules[activation.match_activations.__module__]
    if hasattr(lookup, name):
        owners.append(lookup)
    try:
        home = importlib.import_module("lightning_dimat.permutation.assignment")
    except ModuleNotFoundError as error:
        if error.name != "lightning_dimat.permutation.assignment":
            raise
    else:
        if home is not lookup and hasattr(home, name):
            owners.append(home)
    if not owners:
        raise RuntimeError(
            f"Cannot find `{name}` where match_activations looks it up: update solver_owners()."
        )
    return owners


def check_lap_calls(clock: Clock) -> None:
    if clock.calls.get("lap", 0) == 0:
        raise RuntimeError(
            f"The merge solved no linear assignment through the wrapped `{solver_name()}`: the solver moved "
            "or is called differently; update solver_owners() so the LAP time is measured."
        )


def load_images(count: int, size: int, device: torch.device, path: Path | None) -> tuple[torch.Tensor, str]:
    """``count`` Tiny ImageNet training images (normalised), or random ones if ``path`` is ``None``."""
    if path is not None:
        from lightning_dimat.data import TinyImageNetDataModule

        data = TinyImageNetDataModule(str(path), image_size=size, augment=False, num_workers=0)
        data.setup("fit")
        generator = torch.Generator().manual_seed(0)
        indices = torch.randperm(len(data.train_set), generator=generator)[:count].tolist()
        images = torch.stack([data.train_set[i][0] for i in indices])
        return images.to(device), "tiny-imagenet-20"
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, size, size, generator=generator).to(device), "random"


def build_agents(
    args: argparse.Namespace, device: torch.device, images: torch.Tensor
) -> list[torch.nn.Module]:
    agents = []
    for seed in range(args.agents):
        torch.manual_seed(seed)
        model = resnet20(width=args.width, num_classes=20, shortcut="conv3x3").to(device)
        recompute_batchnorm(model, images.split(args.batch_size))  # realistic (non-default) BN statistics
        agents.append(model.eval())
    return agents


def forward_bound(
    agent: torch.nn.Module,
    states: list[dict],
    batches: list[torch.Tensor],
    matcher: ActivationMatcher,
    spec: Any,
    clock: Clock,
) -> float:
    """(degree + 1) forward passes over the batches + one train-mode BatchNorm pass.

    The forward passes are those of the merge itself — the matcher's ``match`` with the statistics and the
    assignments switched off — so that they run in the same conditions (memory reuse in particular).
    """
    undo = [
        patch(activation, "_accumulate", lambda *args, **kwargs: None),
        patch(
            activation,
            "_units_last",
            lambda value, axis, *args, **kwargs: value.new_zeros(1, value.shape[axis]),
        ),
        patch(activation.Moments, "update", lambda self, x: setattr(self, "count", self.count + 1)),
    ]
    undo += [patch(owner, solver_name(), identity_solutions(solver_name())) for owner in solver_owners()]
    try:
        with clock.time("bound"):
            matcher.match(agent, states, batches, spec=spec)
    finally:
        for step in reversed(undo):
            step()
    with clock.time("bound"):
        recompute_batchnorm(agent, batches)
    return clock.seconds.pop("bound")


def one_merge(
    agent: torch.nn.Module,
    states: list[dict],
    batches: list[torch.Tensor],
    matcher: ActivationMatcher,
    spec: Any,
    clock: Clock,
) -> None:
    """The merge as every caller runs it: ``merge_into_basis`` (match → permute + weighted sum), the merged
    state written into the agent, BatchNorm re-estimated on its batches."""
    weights = [1.0 / (len(states) + 1)] * (len(states) + 1)
    with clock.time("total"):
        with clock.time("merge_into_basis"):
            merged, _ = merge_into_basis(
                agent, agent.state_dict(), states, weights, matcher, batches, spec=spec
            )
        with clock.time("load"):
            load_state_in_place(agent, merged)
        with clock.time("batchnorm"):
            recompute_batchnorm(agent, batches)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--data", default=str(TINY_IMAGENET), help="tiny-imagenet-20.zip, or 'random' for random images"
    )
    args = parse_args(parser, SMOKE)
    args.data = None if args.data in (None, "random") else Path(args.data)
    if args.data is not None and not args.data.exists():
        parser.error(
            f"--data {args.data} does not exist: build it with `lightning-dimat data tiny-imagenet "
            "tiny-imagenet-200.zip --classes 20` (docs/experiments.md), or pass --data random"
        )
    output = output_path(args, RESULTS / "merge_speed.json", "merge_speed")
    device = torch.device(args.device)
    images, source = load_images(args.images, args.image_size, device, args.data)
    batches = list(images.split(args.batch_size))
    agents = build_agents(args, device, images)
    reference, neighbours = agents[0], agents[1:]
    states = [{k: v.detach().clone() for k, v in n.state_dict().items()} for n in neighbours]
    spec = spec_for(reference, batches[0])  # derive + verify the spec once (cached; not part of a merge)
    matcher = ActivationMatcher()

    rows = []
    for repeat in range(args.repeats):
        original = {k: v.clone() for k, v in reference.state_dict().items()}
        clock = Clock(device)
        # Alternate which runs first, so that warm-up effects on either side cancel out in the median.
        if repeat % 2 == 0:
            bound = forward_bound(reference, states, batches, matcher, spec, clock)
            load_state_in_place(reference, original)
        restore = [clock.wrap(owner, solver_name(), "lap") for owner in solver_owners()]
        restore += [
            clock.wrap(matcher, "match", "match"),
            clock.wrap(activation, "_accumulate", "statistics"),
            clock.wrap(activation.Moments, "update", "statistics"),
            clock.wrap(activation, "_units_last", "statistics"),
        ]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            one_merge(reference, states, batches, matcher, spec, clock)
        finally:
            for undo in reversed(restore):
                undo()
        check_lap_calls(clock)
        load_state_in_place(reference, original)
        if repeat % 2 == 1:
            bound = forward_bound(reference, states, batches, matcher, spec, clock)
            load_state_in_place(reference, original)
        seconds = dict(clock.seconds)
        statistics_s, lap_s = seconds.get("statistics", 0.0), seconds.get("lap", 0.0)
        row = {
            "total_s": seconds["total"],
            "forward_s": seconds["match"] - statistics_s - lap_s,
            "statistics_s": statistics_s,
            "lap_s": lap_s,
            "lap_calls": clock.calls["lap"],
            # permuting + the weighted sum (merge_into_basis beyond matching) + writing the result in place
            "apply_s": seconds["merge_into_basis"] - seconds["match"] + seconds["load"],
            "batchnorm_s": seconds["batchnorm"],
            "lower_bound_s": bound,
            "ratio": seconds["total"] / bound,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_increase_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
        }
        if device.type == "cuda":
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        template = (
            "merge {total_s:7.2f} s = forward {forward_s:.2f} + statistics {statistics_s:.2f}"
            " + LAP {lap_s:.3f} ({lap_calls}) + apply {apply_s:.3f} + BN {batchnorm_s:.2f}"
            " | bound {lower_bound_s:.2f} s | ratio {ratio:.3f}"
        )
        print(template.format(**row), flush=True)
    model_mb = state_bytes(reference.state_dict()) / 2**20
    result = {
        "benchmark": "merge_speed",
        "smoke": args.smoke,
        "setting": f"1 agent + {len(states)} neighbours (N={args.agents}, fully connected)",
        "model": f"resnet20 width {args.width}, conv3x3 shortcuts",
        "model_mb": model_mb,
        "images": args.images,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "data": source,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": rows,
        "median": {key: statistics.median(row[key] for row in rows) for key in rows[0]},
    }
    median = result["median"]
    print(
        f"median: merge {median['total_s']:.2f} s, lower bound {median['lower_bound_s']:.2f} s, "
        f"ratio {median['ratio']:.3f} (goal <= 1.2); peak RSS {median['peak_rss_mb']:.0f} MB"
    )
    save_json(result, output)


if __name__ == "__main__":
    main()
