"""Registered networks: output shapes, fx traceability, parameter counts, shortcuts, re-initialisation."""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.fx import symbolic_trace

from lightning_dimat.models import MODELS, VGG, ResNet, build_model
from lightning_dimat.models.resnet import BasicBlock

RESNET20_1X1_PARAMS = 272_474
RESNET20_3X3_PARAMS = 292_954
VGG16_BN_32_PARAMS = 15_253_578

# (name, options, input size): the cheap networks, each at 32×32 and 64×64.
LIGHT_CASES: list[tuple[str, dict[str, Any], int]] = [
    *(
        ("resnet20", {"width": width, "shortcut": shortcut}, size)
        for width in (1, 2)
        for shortcut in ("conv1x1", "conv3x3")
        for size in (32, 64)
    ),
    ("vgg16", {"input_size": 32}, 32),
    ("vgg16_bn", {"input_size": 64, "num_classes": 7}, 64),
    ("vgg16", {"input_size": 32, "batch_norm": False}, 32),
]


# What the permutation engine understands: no padding, slicing, concatenation or custom functions.
ALLOWED_MODULES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.BatchNorm1d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Linear,
    nn.Dropout,
)
ALLOWED_FUNCTIONS = {torch.flatten, operator.add}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_forward_and_trace(model: nn.Module, size: int, num_classes: int) -> None:
    """The model maps a 2-image batch to (2, num_classes) logits, and its fx trace agrees in eval mode."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    model.eval()
    traced = symbolic_trace(model)
    for node in traced.graph.nodes:
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            assert isinstance(module, ALLOWED_MODULES), f"{node.target}: {type(module).__name__}"
            assert not isinstance(module, nn.Conv2d) or module.groups == 1
        elif node.op in ("call_function", "call_method"):
            assert node.op == "call_function" and node.target in ALLOWED_FUNCTIONS, node.format_node()
    with torch.no_grad():
        expected = model(x)
        got = traced(x)
    assert expected.shape == (2, num_classes)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected)


def test_registered_names() -> None:
    for name in ("resnet20", "resnet50", "vgg16", "vgg16_bn"):
        assert name in MODELS
    assert MODELS.get("vgg16_bn") is MODELS.get("vgg16")


@pytest.mark.parametrize(("name", "options", "size"), LIGHT_CASES)
def test_light_models_forward_and_trace(name: str, options: dict[str, Any], size: int) -> None:
    model = build_model(name, **options)
    assert isinstance(model, ResNet if name.startswith("resnet") else VGG)
    _check_forward_and_trace(model, size, options.get("num_classes", 10))


@pytest.mark.parametrize(("stem", "size"), [("cifar", 32), ("imagenet", 64)])
def test_resnet50_forward_and_trace(stem: str, size: int) -> None:
    model = build_model("resnet50", stem=stem, width=1, num_classes=5)
    assert isinstance(model, ResNet)
    assert isinstance(model.stem[-1], nn.MaxPool2d) == (stem == "imagenet")
    _check_forward_and_trace(model, size, 5)


def test_resnet20_parameter_count() -> None:
    count = _params(build_model("resnet20", width=1, num_classes=10, shortcut="conv1x1"))
    assert count == RESNET20_1X1_PARAMS
    assert abs(count - 272_474) / 272_474 <= 0.02
    assert _params(build_model("resnet20", shortcut="conv3x3")) == RESNET20_3X3_PARAMS


def test_vgg16_bn_parameter_count() -> None:
    assert _params(build_model("vgg16", num_classes=10, input_size=32)) == VGG16_BN_32_PARAMS


def test_resnet50_imagenet_matches_torchvision_count() -> None:
    ours = build_model("resnet50", num_classes=1000, stem="imagenet")
    assert _params(ours) == _params(torchvision.models.resnet50(num_classes=1000))


@pytest.mark.parametrize(("shortcut", "kernel"), [("conv1x1", (1, 1)), ("conv3x3", (3, 3))])
def test_resnet20_shortcut_kernels(shortcut: str, kernel: tuple[int, int]) -> None:
    model = build_model("resnet20", width=1, shortcut=shortcut)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    projections = [block.shortcut for block in blocks if block.shortcut is not None]
    assert len(projections) == 2  # the first block of stages 2 and 3
    for projection in projections:
        conv, bn = projection
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.kernel_size == kernel
        assert conv.stride == (2, 2)


def test_vgg16_rejects_input_size_not_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="48"):
        build_model("vgg16", input_size=48)


def test_kaiming_init_applied() -> None:
    model = build_model("resnet20")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    conv = model.stem[0]
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.3)


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [
        ("resnet20", {"width": 1, "shortcut": "conv3x3"}, 32),
        ("vgg16", {"input_size": 64}, 64),
    ],
)
def test_reset_parameters_keeps_model_working(name: str, options: dict[str, Any], size: int) -> None:
    model = build_model(name, **options)
    reset = 0
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            reset += 1
    assert reset > 0
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_torchvision_resnet18_traces() -> None:
    assert isinstance(symbolic_trace(torchvision.models.resnet18(num_classes=10)), torch.fx.GraphModule)
