"""Models the permutation and merge tests share: every supported architecture with an input shape, warmed-up
copies with exact BatchNorm statistics, randomly permuted copies, and checks on found permutations."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from lightning_dimat import recompute_batchnorm
from lightning_dimat.models import resnet20, resnet50, vgg16
from lightning_dimat.permutation import PermutationSpec, invert, permute_state, random_permutations


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(48, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 24),
        nn.ReLU(),
        nn.Linear(24, 5),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 5),
    )  # fmt: skip


# name → (builder, shape of one input): MLP, plain CNN, ResNet-20, VGG16, ResNet-50, torchvision's resnet18.
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (3, 4, 4)),
    "cnn": (cnn, (3, 8, 8)),
    "resnet20": (lambda: resnet20(width=1, num_classes=5), (3, 16, 16)),
    "resnet20x8_conv3x3": (lambda: resnet20(width=8, num_classes=5, shortcut="conv3x3"), (3, 8, 8)),
    "vgg16_bn_64": (lambda: vgg16(num_classes=5, input_size=64, hidden=64), (3, 64, 64)),
    "resnet50": (lambda: resnet50(num_classes=5), (3, 8, 8)),
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=5), (3, 64, 64)),
}
HEAVY = {"resnet20x8_conv3x3", "resnet50", "vgg16_bn_64"}


def warm_model(name: str) -> tuple[nn.Module, Tensor]:
    """A model with non-trivial BatchNorm statistics, in eval mode, and a batch of inputs."""
    build, shape = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build()
    samples = 6 if name in HEAVY else 24
    x = torch.randn(samples, *shape)
    recompute_batchnorm(model, [x])  # exact statistics: activations stay normalised through the depth
    return model.eval(), x


def permuted_copy(
    model: nn.Module, spec: PermutationSpec, seed: int = 1
) -> tuple[nn.Module, dict[str, Tensor]]:
    """A copy of ``model`` permuted by random permutations, and those permutations."""
    truth = random_permutations(spec, torch.Generator().manual_seed(seed))
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_state(model.state_dict(), spec, truth))
    return permuted, truth


def assert_recovers(found: dict[str, Tensor], truth: dict[str, Tensor]) -> None:
    # permuted = original[truth]; aligning it back needs invert(truth).
    for group, permutation in truth.items():
        assert torch.equal(found[group], invert(permutation)), group


def assert_same_permutations(found: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert found.keys() == expected.keys()
    for group, permutation in expected.items():
        assert torch.equal(found[group], permutation), group


def small_net(seed: int) -> nn.Sequential:
    """Linear → BatchNorm → ReLU → Linear on 4 features, 3 outputs, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
