"""Networks (a registry YAML can name) and the generic image-classifier LightningModule."""

from lightning_dimat.models.classifier import ImageClassifier
from lightning_dimat.models.registry import MODELS, build_model, register_model
from lightning_dimat.models.resnet import BasicBlock, Bottleneck, ResNet, resnet20, resnet50
from lightning_dimat.models.small import mlp, small_cnn
from lightning_dimat.models.vgg import VGG, vgg16

__all__ = [
    "MODELS",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "ImageClassifier",
    "ResNet",
    "build_model",
    "mlp",
    "register_model",
    "resnet20",
    "resnet50",
    "small_cnn",
    "vgg16",
]
