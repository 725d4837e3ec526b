"""CIFAR-10 and CIFAR-100 (32×32 RGB, 50,000 train / 10,000 test images) read with torchvision.

The files are torchvision's usual on-disk format (``cifar-10-batches-py/`` or ``cifar-100-python/`` under
``data_dir``). :meth:`~_CIFARDataModule.prepare_data` downloads them when ``download=True``;
:meth:`~_CIFARDataModule.setup` only reads and never touches the network.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.datasets.vision import StandardTransform

from lightning_dimat.data.splits import SplitDataModule, check_fraction

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class _CIFAR10NoMD5(CIFAR10):
    """torchvision's CIFAR-10 with the MD5 comparison on load switched off (files must still exist).

    torchvision hashes every file each time a dataset is built; with ``md5=None`` its own ``check_integrity``
    only checks that the file is there. The download itself is still verified against the archive's MD5.
    """

    train_list: ClassVar[list[list[Any]]] = [[name, None] for name, _ in CIFAR10.train_list]
    test_list: ClassVar[list[list[Any]]] = [[name, None] for name, _ in CIFAR10.test_list]
    meta: ClassVar[dict[str, Any]] = {**CIFAR10.meta, "md5": None}


class _CIFAR100NoMD5(CIFAR100):
    """torchvision's CIFAR-100 without the MD5 comparison on load; see :class:`_CIFAR10NoMD5`."""

    train_list: ClassVar[list[list[Any]]] = [[name, None] for name, _ in CIFAR100.train_list]
    test_list: ClassVar[list[list[Any]]] = [[name, None] for name, _ in CIFAR100.test_list]
    meta: ClassVar[dict[str, Any]] = {**CIFAR100.meta, "md5": None}


def _with_transform(dataset: Any, transform: Callable[[Any], Any] | None) -> Any:
    """A shallow copy of a torchvision dataset that applies ``transform`` instead (the images are shared)."""
    clone = copy.copy(dataset)
    clone.transform = transform
    if hasattr(clone, "transforms"):
        clone.transforms = StandardTransform(transform, getattr(dataset, "target_transform", None))
    return clone


class _CIFARDataModule(SplitDataModule):
    """Shared implementation of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes.
        download: let :meth:`prepare_data` fetch the dataset when it is not in ``data_dir`` (needs internet).
        val_fraction: if > 0, a stratified hold-out of this share of the training set (seeded by ``seed``,
            without augmentation) is the validation set; if 0, validation uses the test split.
        augment: random crop (padding 4) and horizontal flip on the training images.
        seed: seed of the validation hold-out.
        check_md5: compare each file with its published MD5 on every load (torchvision's default). False only
            checks that the files exist, e.g. for files in the same format that you wrote yourself.
    """

    name: ClassVar[str]
    num_classes: ClassVar[int]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    dataset_class: ClassVar[type[CIFAR10]]
    unchecked_dataset_class: ClassVar[type[CIFAR10]]

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = True,
        val_fraction: float = 0.0,
        augment: bool = True,
        seed: int = 0,
        check_md5: bool = True,
    ) -> None:
        super().__init__()
        check_fraction(val_fraction)
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.val_fraction = val_fraction
        self.augment = augment
        self.seed = seed
        self.check_md5 = check_md5

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    def eval_transform(self) -> T.Compose:
        """``ToTensor`` and ``Normalize`` with the dataset's per-channel statistics."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_transform(self) -> T.Compose:
        """Random crop with padding 4 and horizontal flip, then :meth:`eval_transform` (if ``augment``)."""
        if not self.augment:
            return self.eval_transform()
        return T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *self.eval_transform().transforms]
        )

    def _missing_files(self) -> list[str]:
        cls = self.dataset_class
        folder = self.root / cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [name for name in names if not (folder / name).is_file()]

    def missing_data(self) -> str | None:
        """What is missing for this data module to load (``None``: nothing, or it will be downloaded)."""
        missing = self._missing_files()
        if not missing or self.download:
            return None
        return (
            f"{self.dataset_class.__name__} files {missing} not found under '{self.root}' and download=False"
        )

    def prepare_data(self) -> None:
        """Downloads and extracts the dataset into ``data_dir`` if it is missing and ``download=True``."""
        if self.download and self._missing_files():
            cls = self.dataset_class
            download_and_extract_archive(cls.url, str(self.root), filename=cls.filename, md5=cls.tgz_md5)

    def _load(self, train: bool, transform: Callable[[Any], Any]) -> CIFAR10:
        cls = self.dataset_class if self.check_md5 else self.unchecked_dataset_class
        try:
            return cls(str(self.root), train=train, transform=transform, download=False)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.name} files in '{self.root / cls.base_folder}' do not match the published MD5 "
                f"checksums ({error}). Delete that folder and download again (download=True), or pass "
                "check_md5=False if you wrote files in this format yourself."
            ) from error

    def setup(self, stage: str | None = None) -> None:
        """Reads both splits (never downloads) and builds ``train_set``, ``val_set`` and ``test_set``."""
        if hasattr(self, "train_set"):
            return
        missing = self._missing_files()
        if missing:
            folder = self.root / self.dataset_class.base_folder
            hint = (
                "download=True is set but prepare_data() has not fetched it yet: call prepare_data() first "
                "(Trainer does)"
                if self.download
                else "pass download=True to fetch it"
            )
            raise FileNotFoundError(
                f"{self.name} not found in '{self.root}': '{folder}' lacks {', '.join(missing)}. "
                f"Either {hint}, or place the extracted python version of {self.name} "
                f"('{self.dataset_class.base_folder}/' from {self.dataset_class.filename}) in '{self.root}'."
            )
        eval_transform = self.eval_transform()
        train = self._load(True, self.train_transform())
        test = self._load(False, eval_transform)
        self.assign_splits(train, _with_transform(train, eval_transform), test, np.asarray(train.targets))


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 as normalized ``(3, 32, 32)`` float tensors with labels 0-9.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py/``.
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes.
        download: let :meth:`prepare_data` fetch the dataset when it is not in ``data_dir`` (needs internet).
        val_fraction: if > 0, a stratified hold-out of this share of the training set (seeded by ``seed``,
            without augmentation) is the validation set; if 0, validation uses the test split.
        augment: random crop (padding 4) and horizontal flip on the training images.
        seed: seed of the validation hold-out.
        check_md5: compare each file with its published MD5 on every load (torchvision's default). False only
            checks that the files exist, e.g. for files in the same format that you wrote yourself.

    Examples:
        >>> CIFAR10DataModule.num_classes
        10
        >>> data = CIFAR10DataModule(data_dir="data", val_fraction=0.1)
        >>> data.prepare_data()  # downloads ~170 MB once  # doctest: +SKIP
        >>> data.setup("fit")  # doctest: +SKIP
        >>> len(data.train_set), len(data.val_set)  # doctest: +SKIP
        (45000, 5000)
    """

    name = "CIFAR-10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    dataset_class = CIFAR10
    unchecked_dataset_class = _CIFAR10NoMD5


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 as normalized ``(3, 32, 32)`` float tensors with the 100 fine labels 0-99.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-100-python/``.
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes.
        download: let :meth:`prepare_data` fetch the dataset when it is not in ``data_dir`` (needs internet).
        val_fraction: if > 0, a stratified hold-out of this share of the training set (seeded by ``seed``,
            without augmentation) is the validation set; if 0, validation uses the test split.
        augment: random crop (padding 4) and horizontal flip on the training images.
        seed: seed of the validation hold-out.
        check_md5: compare each file with its published MD5 on every load (torchvision's default). False only
            checks that the files exist, e.g. for files in the same format that you wrote yourself.

    Examples:
        >>> CIFAR100DataModule.num_classes
        100
        >>> data = CIFAR100DataModule(data_dir="data")
        >>> data.prepare_data()  # downloads ~160 MB once  # doctest: +SKIP
        >>> data.setup("fit")  # doctest: +SKIP
        >>> data.train_set[0][0].shape  # doctest: +SKIP
        torch.Size([3, 32, 32])
    """

    name = "CIFAR-100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    dataset_class = CIFAR100
    unchecked_dataset_class = _CIFAR100NoMD5
