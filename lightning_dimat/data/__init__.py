"""DataModules: scikit-learn's digits (offline, the quick-start default), CIFAR-10/100 and Tiny ImageNet."""

from lightning_dimat.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_dimat.data.digits import DigitsDataModule
from lightning_dimat.data.tiny_imagenet import TinyImageNet, TinyImageNetDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "TinyImageNet",
    "TinyImageNetDataModule",
]
