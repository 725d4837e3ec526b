"""Merge quality: two ResNet-20s trained independently (different seeds) on Tiny ImageNet (20 classes) at
32×32, then test accuracy and loss along the interpolation path θ(α) = (1 − α) θ_A + α P θ_B for
α = 0, .25, .5, .75, 1, with P from plain averaging (P = I), weight matching and activation matching,
each with and without BatchNorm re-estimation at every α. P is found once per method by the library's
matcher; every θ(α) is then the library's ``combine`` (permute + weighted sum). Saves JSON and PNG in
``benchmarks/results/`` (or at ``--output`` and beside it).

    python benchmarks/merge_quality.py --width 1 --epochs 30          # CPU, ~30 min here
    python benchmarks/merge_quality.py --width 4 --epochs 40 --device cuda
    python benchmarks/merge_quality.py --smoke      # seconds: random 8×8 images, 1 epoch, meaningless numbers

With ``--agents N`` it also trains N agents independently on N shards (IID and by-class non-IID) and runs
one merge round on a fully connected graph and a ring, for plain averaging, DIMAT in each agent's own basis
(the paper) and DIMAT in a shared basis with identity biases λ: the agents' mean test accuracy after the
merge and the accuracy of their consensus (all merged agents averaged in one basis, BatchNorm on every
agent's data). ``--skip-pairwise`` runs only that part.

    python benchmarks/merge_quality.py --agents 5 --epochs 20 --skip-pairwise --tag agents_cpu_w1

``--probes`` compares where activation matching observes each channel space (issue 10, item 4: residual
sums before the ReLU, every block output after it, or one probe per ResNet stage); ``--model vgg16``
repeats it on a network without residual streams (``--channels 0.25``: its conv widths scaled to 16-128, about
half ResNet-20's training cost per image on a CPU); ``--partitions`` picks the data splits.

    python benchmarks/merge_quality.py --agents 5 --epochs 6 --skip-pairwise --partitions by_class \
        --probes pre_activation,post_activation,stage_output --tag probes_cpu_w1
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import RESULTS, output_path, parse_args, save_json

from lightning_dimat.data import TinyImageNetDataModule
from lightning_dimat.merge import (
    ActivationMatcher,
    combine,
    load_state_in_place,
    matcher_spec,
    merge_into_basis,
    recompute_batchnorm,
    resolve_matcher,
)
from lightning_dimat.models import resnet20
from lightning_dimat.models.vgg import VGG, VGG16_CONFIG
from lightning_dimat.partition import partition
from lightning_dimat.permutation import permute_state
from lightning_dimat.permutation.context import PROBE_PLACEMENTS
from lightning_dimat.permutation.shared_basis import basis_permutations, moved_fraction
from lightning_dimat.topology import build_topology

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "tiny-imagenet-20.zip"  # as configs/cpu/
METHODS = ("average", "weight", "activation")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SMOKE = {
    "data": None,
    "width": 1,
    "epochs": 1,
    "batch_size": 16,
    "image_size": 8,
    "calibration_images": 16,
    "device": "cpu",
    "train_images": 48,
    "test_images": 16,
    "agents": 3,
    "partitions": "by_class",  # (the IID split runs the same code on other shards)
}
AGENT_SETTINGS = (  # (label, matcher name, basis, identity bias λ)
    ("WA (average)", "average", "own", 0.0),
    ("DIMAT own basis (paper)", "activation", "own", 0.0),
    ("DIMAT shared, λ=0", "activation", "shared", 0.0),
    ("DIMAT shared, λ=0.05", "activation", "shared", 0.05),
    ("DIMAT shared, λ=0.2", "activation", "shared", 0.2),
    ("shared basis, then average (λ=∞)", "activation", "shared", 1e9),
)


def load_split(path: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as one normalised tensor (decoded once; augmentation happens on tensors)."""
    data = TinyImageNetDataModule(str(path), image_size=size, augment=False, num_workers=0)
    data.setup("fit")
    dataset = data.train_set if split == "train" else data.test_set
    loader = torch.utils.data.DataLoader(dataset, batch_size=500, num_workers=2)
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def random_split(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random images with random labels of the 20 classes (for ``--smoke``: nothing to learn)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, size, size, generator=generator)
    return images, torch.randint(20, (count,), generator=generator)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip, per image, in one gather."""
    n, channels, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    device = images.device
    dy = torch.randint(0, 9, (n,), generator=generator).to(device)
    dx = torch.randint(0, 9, (n,), generator=generator).to(device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    columns = torch.arange(w, device=device)
    columns = torch.where(flip[:, None], w - 1 - columns[None, :], columns[None, :]) + dx[:, None]
    rows = torch.arange(h, device=device)[None, :] + dy[:, None]
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


def build(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "vgg16":  # (VGG-16's own config at --channels 1)
        config = tuple(item if item == "M" else round(int(item) * args.channels) for item in VGG16_CONFIG)
        return VGG(config, num_classes=20, input_size=args.image_size, hidden=args.width * 64)
    return resnet20(width=args.width, num_classes=20)


def describe(args: argparse.Namespace) -> str:
    if args.model == "vgg16":
        scaled = "" if args.channels == 1.0 else f", conv channels x{args.channels:g}"
        return f"vgg16 with batch norm{scaled}, classifier hidden {args.width * 64}"
    return f"resnet20 width {args.width} (1x1 conv shortcuts)"


def train(seed: int, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build(args).to(args.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    steps = args.epochs * math.ceil(len(images) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=generator)
        started, total = time.perf_counter(), 0.0
        for start in range(0, len(images), args.batch_size):
            index = order[start : start + args.batch_size]
            index = index.to(images.device)
            loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        print(f"seed {seed} epoch {epoch + 1}/{args.epochs} loss {total / len(images):.3f} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip
    return model.eval()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str
) -> dict[str, float]:
    model.eval()
    correct, loss = 0, 0.0
    for x, y in zip(images.split(500), labels.split(500), strict=True):
        logits = model(x.to(device))
        loss += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
        correct += int((logits.argmax(-1).cpu() == y).sum())
    return {"accuracy": correct / len(labels), "loss": loss / len(labels)}


def interpolation_curves(a, b, train_images, test_images, test_labels, args) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    calibration = [(x.to(args.device), None) for x in train_images[: args.calibration_images].split(250)]
    states = [a.state_dict(), b.state_dict()]
    curves: dict[str, Any] = {}
    for method in METHODS:
        started = time.perf_counter()
        matcher = resolve_matcher(method)
        spec = matcher_spec(matcher, a, calibration)
        permutations = matcher.match(a, states[1:], calibration, spec=spec)  # P for B, in A's basis
        align_seconds = time.perf_counter() - started
        for reset in (False, True):
            points = []
            for alpha in ALPHAS:
                model = copy.deepcopy(a)
                load_state_in_place(model, combine(states, [1 - alpha, alpha], permutations, spec))
                if reset:
                    recompute_batchnorm(model, calibration)
                points.append({"alpha": alpha, **evaluate(model, test_images, test_labels, args.device)})
            label = f"{method}{' + BN reset' if reset else ''}"
            curves[label] = {
                "method": method,
                "bn_reset": reset,
                "align_seconds": align_seconds,
                "points": points,
            }
            middle = points[len(points) // 2]
            print(f"{label:24s} acc@0.5 {middle['accuracy']:.3f}  loss@0.5 {middle['loss']:.3f}", flush=True)
    return curves


def _with_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    copied = copy.deepcopy(model)
    load_state_in_place(copied, state)
    return copied


def one_round(models, calibration, topology, matcher, basis, spec) -> tuple[list[torch.nn.Module], float]:  # type: ignore[no-untyped-def]
    """One synchronous merge of every agent with its neighbours (the library's rule), optionally after
    bringing all agents into agent 0's basis along a spanning tree; BatchNorm re-estimated on own data."""
    states = [model.state_dict() for model in models]
    if basis == "shared" and matcher.uses_spec:
        parents = topology.spanning_tree(0)
        pairwise = {}
        for agent, parent in parents.items():
            if parent is not None:
                reference = _with_state(models[agent], states[parent])
                (pairwise[agent],) = ActivationMatcher().match(
                    reference, [states[agent]], calibration[agent], spec=spec
                )
        paths = basis_permutations(parents, pairwise)
        states = [
            permute_state(state, spec, paths[g]) if paths[g] else state for g, state in enumerate(states)
        ]
    merged, moved = [], []
    for agent, state in enumerate(states):
        order = [agent, *topology.neighbors(agent)]
        weights = topology.weights(agent)
        reference = _with_state(models[agent], state)
        new_state, found = merge_into_basis(
            reference,
            state,
            [states[j] for j in order[1:]],
            [weights[j] for j in order],
            matcher,
            calibration[agent],
            spec=spec,
        )
        moved.extend(moved_fraction(permutations) for permutations in found)
        model = _with_state(models[agent], new_state)
        recompute_batchnorm(model, calibration[agent])
        merged.append(model)
    return merged, sum(moved) / len(moved)


def agent_merges(train_images, train_labels, test_images, test_labels, args) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """``--agents N``: one merge round of N independently trained agents (see the module docstring)."""
    results: dict[str, Any] = {}
    for scheme in args.partitions.split(","):
        shards = partition(train_labels.cpu().numpy(), args.agents, scheme, seed=0)
        models = [
            trained(100 + g, train_images[shard], train_labels[shard], args, f"{scheme}-agent{g}")
            for g, shard in enumerate(shards)
        ]
        per_agent = max(1, args.calibration_images // args.agents)
        calibration = [[(x, None) for x in train_images[shard[:per_agent]].split(250)] for shard in shards]
        specs = {
            probes: matcher_spec(resolve_matcher("activation"), models[0], calibration[0], probes=probes)
            for probes in args.probes.split(",")
        }
        before = [evaluate(model, test_images, test_labels, args.device)["accuracy"] for model in models]
        results[scheme] = {"agents_before": before, "rounds": {}}
        print(f"{scheme}: agents before merging {sum(before) / len(before):.3f}", flush=True)
        for topology_name in ("fully_connected", "ring"):
            topology = build_topology(topology_name, args.agents)
            for label, method, basis, bias, probes in _settings(
                args.probes.split(","), args.settings.split(";") if args.settings else None
            ):
                matcher = resolve_matcher(method)
                if bias:
                    matcher = ActivationMatcher(identity_bias=bias)
                spec = specs[probes]
                merged, moved = one_round(models, calibration, topology, matcher, basis, spec)
                after = [
                    evaluate(model, test_images, test_labels, args.device)["accuracy"] for model in merged
                ]
                consensus_state, _ = merge_into_basis(
                    merged[0],
                    merged[0].state_dict(),
                    [model.state_dict() for model in merged[1:]],
                    [1 / len(merged)] * len(merged),
                    matcher,
                    calibration[0],
                    spec=spec,
                )
                consensus = _with_state(merged[0], consensus_state)
                recompute_batchnorm(consensus, [batch for own in calibration for batch in own])
                entry = {
                    "agents_after": after,
                    "mean_after": sum(after) / len(after),
                    "consensus": evaluate(consensus, test_images, test_labels, args.device)["accuracy"],
                    "permuted_fraction": moved,
                }
                results[scheme]["rounds"][f"{topology_name} | {label}"] = entry
                print(
                    f"{scheme:8s} {topology_name:15s} {label:50s} agents {entry['mean_after']:.3f} "
                    f"consensus {entry['consensus']:.3f} moved {moved:.2f}",
                    flush=True,
                )
    return results


def trained(
    seed: int, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, name: str
) -> torch.nn.Module:
    """:func:`train`, or its result from ``--cache`` (keyed by the training options) when there."""
    if args.cache is None:
        return train(seed, images, labels, args)
    key = f"{args.model}-w{args.width}-e{args.epochs}-lr{args.lr}-b{args.batch_size}-s{args.image_size}"
    key += f"-c{args.channels:g}" if args.channels != 1.0 else ""
    key += f"-n{len(images)}"
    path = args.cache / f"{name}-{key}.pt"
    if path.is_file():
        model = build(args).to(args.device)
        model.load_state_dict(torch.load(path, map_location=args.device, weights_only=True))
        return model.eval()
    model = train(seed, images, labels, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def _settings(placements: list[str], only: list[str] | None) -> list[tuple[str, str, str, float, str]]:
    """AGENT_SETTINGS (those labelled as in ``only``, if given) with each probe placement (labelled when
    there is more than one; WA needs none)."""
    settings = []
    chosen = [s for s in AGENT_SETTINGS if only is None or s[0] in only]
    for label, method, basis, bias in chosen:
        for probes in placements[:1] if method == "average" else placements:
            suffix = f" [{probes}]" if len(placements) > 1 and method != "average" else ""
            settings.append((label + suffix, method, basis, bias, probes))
    return settings


def plot(curves: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"average": "tab:grey", "weight": "tab:blue", "activation": "tab:red"}
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, curve in curves.items():
        alphas = [p["alpha"] for p in curve["points"]]
        style = {
            "color": colours[curve["method"]],
            "linestyle": "-" if curve["bn_reset"] else "--",
            "marker": "o",
        }
        accuracy_axes.plot(alphas, [p["accuracy"] for p in curve["points"]], label=label, **style)
        loss_axes.plot(alphas, [p["loss"] for p in curve["points"]], label=label, **style)
    for axes, name in ((accuracy_axes, "test accuracy"), (loss_axes, "test loss")):
        axes.set_xlabel("α  (0: model A, 1: model B aligned to A)")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
    accuracy_axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--calibration-images", type=int, default=2000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tag", default=None, help="suffix of the output files (default: cpu/gpu + width)")
    parser.add_argument("--train-images", type=int, default=0, help="first n training images (0: all)")
    parser.add_argument("--test-images", type=int, default=0, help="first n test images (0: all)")
    parser.add_argument("--agents", type=int, default=0, help="also merge N independently trained agents")
    parser.add_argument("--skip-pairwise", action="store_true", help="only the --agents part")
    parser.add_argument("--model", choices=("resnet20", "vgg16"), default="resnet20")
    parser.add_argument(
        "--channels", type=float, default=1.0, help="vgg16 only: scale of its conv widths (0.25: 16-128)"
    )
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping the trained agents")
    parser.add_argument(
        "--settings", default="", help="';'-separated labels of the merges to run (default: all)"
    )
    parser.add_argument("--partitions", default="iid,by_class", help="comma-separated: iid, by_class")
    parser.add_argument(
        "--probes", default="pre_activation", help=f"comma-separated, of {', '.join(PROBE_PLACEMENTS)}"
    )
    args = parse_args(parser, SMOKE)
    if args.channels <= 0 or (args.channels != 1.0 and args.model != "vgg16"):
        parser.error(f"--channels {args.channels:g}: a positive scale of vgg16's conv widths (--model vgg16)")
    for option, given, allowed in (
        ("--partitions", args.partitions, ("iid", "by_class")),
        ("--probes", args.probes, tuple(PROBE_PLACEMENTS)),
    ):
        unknown = [name for name in given.split(",") if name not in allowed]
        if unknown:
            parser.error(f"{option}: unknown {unknown}; choose from {', '.join(allowed)} (comma-separated)")
    tag = args.tag or f"{'gpu' if args.device.startswith('cuda') else 'cpu'}_w{args.width}"
    output = output_path(args, RESULTS / f"merge_quality_{tag}.json", "merge_quality")
    started = time.perf_counter()
    if args.data is None:  # (--smoke) random images stand in for Tiny ImageNet
        train_images, train_labels = random_split(args.train_images or 32, args.image_size, seed=0)
        test_images, test_labels = random_split(args.test_images or 16, args.image_size, seed=1)
        source = "random images and labels (smoke run)"
    elif args.data.exists():
        train_images, train_labels = load_split(args.data, "train", args.image_size)
        test_images, test_labels = load_split(args.data, "val", args.image_size)
        source = "tiny-imagenet-20 (10,000 train / 1,000 test images, 20 classes)"
    else:
        raise SystemExit(
            f"{args.data} does not exist: build it with `lightning-dimat data tiny-imagenet "
            "tiny-imagenet-200.zip --classes 20` (docs/experiments.md) or pass --data path/to/it"
        )
    if args.train_images:
        train_images, train_labels = train_images[: args.train_images], train_labels[: args.train_images]
    if args.test_images:
        test_images, test_labels = test_images[: args.test_images], test_labels[: args.test_images]
    train_images, train_labels = train_images.to(args.device), train_labels.to(args.device)
    curves: dict[str, Any] = {}
    if not args.skip_pairwise:
        a = train(0, train_images, train_labels, args)
        b = train(1, train_images, train_labels, args)
        curves = interpolation_curves(a, b, train_images, test_images, test_labels, args)
    agents = agent_merges(train_images, train_labels, test_images, test_labels, args) if args.agents else {}
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result = {
        "benchmark": "merge_quality",
        "smoke": args.smoke,
        "data": source,
        "train_images": len(train_images),
        "test_images": len(test_images),
        "image_size": args.image_size,
        "model": describe(args),
        "probes": args.probes,
        "epochs": args.epochs,
        "device": device_name,
        "torch": torch.__version__,
        "calibration_images": args.calibration_images,
        "seconds": time.perf_counter() - started,
        "curves": curves,
        "agents": args.agents,
        "agent_merges": agents,
    }
    save_json(result, output)
    if not curves:
        return
    picture = output.with_suffix(".png")
    data_name = "random images" if args.data is None else "Tiny ImageNet-20"
    size = f"{args.image_size}×{args.image_size}"
    plot(curves, picture, f"{describe(args)}, {data_name} at {size} ({device_name})")
    print(f"saved {picture}")


if __name__ == "__main__":
    main()
