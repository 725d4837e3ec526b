"""Tiny ImageNet (64×64 RGB, 200 classes × 500 train / 50 val images) from a folder or straight from its zip.

The layout is the original ``tiny-imagenet-200`` one::

    wnids.txt                      class ids, one a line; the label of a class is its line number
    train/<wnid>/images/*.JPEG     training images (labelled by their folder)
    val/images/*.JPEG              held-out images, used here as the test set
    val/val_annotations.txt        file, wnid, box (tab separated)

``data_dir`` is that folder, or a ``.zip`` holding it under one top folder (``tiny-imagenet-200.zip`` as
downloaded, or a subset such as ``tiny-imagenet-20.zip``). A zip is never extracted: each item is read from it
on demand, and every process (each DataLoader worker) opens its own handle.
"""

from __future__ import annotations

import copy
import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from lightning_dimat.data.splits import SplitDataModule, check_fraction

__all__ = ["TinyImageNet", "TinyImageNetDataModule"]

# ImageNet channel statistics of images scaled to [0, 1], ToTensor's range. The official DIMAT code divides
# them by 255 by mistake (as if pixels were in [0, 255]), which multiplies the inputs by ~1,100 instead of
# standardizing them; here they are used as they are.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LAYOUT = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"


class _Tree:
    """Read-only access by relative path to the Tiny ImageNet tree in a folder or a zip (lazily opened).

    The zip handle belongs to the process that opened it: after a fork (DataLoader workers) the child opens
    its own, and pickling (spawned workers) drops it, so no file offset is ever shared between processes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.exists():
            raise FileNotFoundError(
                f"Tiny ImageNet not found at '{self.path}': expected a folder with {_LAYOUT}, or a .zip "
                "of such a folder, e.g. tiny-imagenet-200.zip as downloaded from "
                "http://cs231n.stanford.edu/tiny-imagenet-200.zip (read in place, never extracted)."
            )
        self.is_zip = self.path.is_file()
        self.prefix = ""
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        self._index: dict[str, list[str]] | None = None
        self._members: set[str] | None = None
        if self.is_zip:
            if not zipfile.is_zipfile(self.path):
                raise ValueError(
                    f"'{self.path}' is a file but not a zip archive: pass a folder with {_LAYOUT}, "
                    "or a .zip of one."
                )
            tops = sorted(name[: -len("wnids.txt")] for name in self._names() if _is_top_wnids(name))
            if not tops:
                raise FileNotFoundError(
                    f"'{self.path}' has no wnids.txt at its top or inside one top folder: expected the "
                    f"tiny-imagenet-200 layout ({_LAYOUT}) under a single top folder."
                )
            if len(tops) > 1:
                raise ValueError(
                    f"'{self.path}' holds several Tiny ImageNet trees ({', '.join(tops)}); keep one."
                )
            self.prefix = tops[0]
        elif not (self.path / "wnids.txt").is_file():
            nested = [child.name for child in self.path.iterdir() if (child / "wnids.txt").is_file()]
            hint = f" Did you mean '{self.path / nested[0]}'?" if len(nested) == 1 else ""
            raise FileNotFoundError(
                f"'{self.path}' has no wnids.txt: expected a Tiny ImageNet folder with {_LAYOUT}.{hint}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.path}')"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_zip=None, _pid=None, _index=None, _members=None)
        return state

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            # A handle inherited through fork shares its file offset with the parent: never reuse it.
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def _names(self) -> list[str]:
        return self._handle().namelist()

    def where(self, relative: str) -> str:
        """``relative`` as a path that an error message can point to."""
        return f"{self.path}!{self.prefix}{relative}" if self.is_zip else str(self.path / relative)

    def read_bytes(self, relative: str) -> bytes:
        if self.is_zip:
            try:
                return self._handle().read(self.prefix + relative)
            except KeyError:
                raise FileNotFoundError(f"'{self.where(relative)}' is not in the archive.") from None
        return (self.path / relative).read_bytes()

    def read_lines(self, relative: str) -> list[str]:
        """The non-empty lines of a text file (stripped)."""
        text = self.read_bytes(relative).decode("utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]

    def files(self, folder: str) -> list[str]:
        """Sorted names of the files directly inside ``folder`` (empty if it does not exist)."""
        if not self.is_zip:
            directory = self.path / folder
            if not directory.is_dir():
                return []
            return sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
        return sorted(self._zip_index()[0].get(folder.rstrip("/"), []))

    def exists(self, relative: str) -> bool:
        """Whether the file ``relative`` is there."""
        if self.is_zip:
            return relative in self._zip_index()[1]
        return (self.path / relative).is_file()

    def _zip_index(self) -> tuple[dict[str, list[str]], set[str]]:
        """The zip's files below the prefix: by folder, and as a set of relative paths (built once)."""
        if self._index is None or self._members is None:
            index: dict[str, list[str]] = {}
            members: set[str] = set()
            for name in self._names():
                if name.startswith(self.prefix) and not name.endswith("/"):
                    relative = name[len(self.prefix) :]
                    parent, _, base = relative.rpartition("/")
                    index.setdefault(parent, []).append(base)
                    members.add(relative)
            self._index, self._members = index, members
        return self._index, self._members


def _is_top_wnids(name: str) -> bool:
    return name == "wnids.txt" or (name.endswith("/wnids.txt") and name.count("/") == 1)


def _is_jpeg(name: str) -> bool:
    return name.lower().endswith((".jpeg", ".jpg"))


def read_wnids(data_dir: str | Path, classes: int | None = None) -> list[str]:
    """The class ids in ``wnids.txt`` order, cut to the first ``classes`` if given.

    Raises:
        FileNotFoundError: ``data_dir`` does not exist or has no ``wnids.txt``.
        ValueError: ``classes`` is < 1 or more than ``wnids.txt`` lists.
    """
    return _class_ids(_Tree(data_dir), classes)


def _class_ids(tree: _Tree, classes: int | None) -> list[str]:
    wnids = tree.read_lines("wnids.txt")
    if not wnids:
        raise ValueError(f"'{tree.where('wnids.txt')}' lists no class ids.")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"'{tree.where('wnids.txt')}' lists some class ids twice.")
    if classes is None:
        return wnids
    if isinstance(classes, bool) or not 1 <= classes <= len(wnids):
        raise ValueError(
            f"classes must be an integer from 1 to {len(wnids)} (the class ids in "
            f"'{tree.where('wnids.txt')}'), or None for all; got {classes!r}."
        )
    return wnids[:classes]


class TinyImageNet(Dataset):
    """One split of Tiny ImageNet as ``(transform(RGB PIL image), label)`` pairs, read lazily item by item.

    Labels come from the folder names (train) or ``val/val_annotations.txt`` (val), never from the images, and
    are the classes' positions in ``wnids.txt``. ``targets`` holds them, one per item.

    Args:
        root: a folder with the tiny-imagenet-200 layout, or a zip of it (see the module docstring).
        split: ``"train"`` (``train/<wnid>/images``) or ``"val"`` (``val/images``, the usual test set).
        transform: applied to each RGB PIL image (grayscale images are converted to RGB).
        classes: keep only the first ``classes`` class ids of ``wnids.txt`` (None: all).
        per_class: keep only the first ``per_class`` images of each class, by file name (train split only;
            None: all) — for CPU-scale runs.

    Examples:
        >>> data = TinyImageNet("../shared/data/tiny-imagenet-20.zip", "val")  # doctest: +SKIP
        >>> len(data), data.classes[:2], data.targets[:3]  # doctest: +SKIP
        (1000, ['n02124075', 'n04067472'], [1, 13, 2])
        >>> TinyImageNet("no/such/folder")
        Traceback (most recent call last):
        ...
        FileNotFoundError: Tiny ImageNet not found at 'no/such/folder': expected a folder with wnids.txt, ...
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val"] = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        classes: int | None = None,
        per_class: int | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
        if per_class is not None and (isinstance(per_class, bool) or per_class < 1 or split != "train"):
            raise ValueError(
                f"per_class must be None or an integer >= 1 and applies to the train split only, got "
                f"per_class={per_class!r} with split={split!r}."
            )
        self.per_class = per_class
        self.tree = _Tree(root)
        self.split = split
        self.transform = transform
        self.classes: list[str] = _class_ids(self.tree, classes)
        self.class_to_idx = {wnid: label for label, wnid in enumerate(self.classes)}
        self.samples: list[str] = []
        self.targets: list[int] = []
        if split == "train":
            self._find_train()
        else:
            self._find_val()

    def _find_train(self) -> None:
        for label, wnid in enumerate(self.classes):
            folder = f"train/{wnid}/images"
            names = sorted(name for name in self.tree.files(folder) if _is_jpeg(name))[: self.per_class]
            if not names:
                raise FileNotFoundError(
                    f"No training images for class {wnid}: '{self.tree.where(folder)}/*.JPEG'."
                )
            self.samples += [f"{folder}/{name}" for name in names]
            self.targets += [label] * len(names)

    def _find_val(self) -> None:
        annotations = "val/val_annotations.txt"
        if not self.tree.exists(annotations):
            raise FileNotFoundError(
                f"'{self.tree.where(annotations)}' is missing: the val split needs it for its labels."
            )
        for number, line in enumerate(self.tree.read_lines(annotations), start=1):
            fields = line.split("\t")
            if len(fields) < 2:
                raise ValueError(
                    f"'{self.tree.where(annotations)}' line {number} is not "
                    f"'file<TAB>wnid<TAB>box...': {line!r}."
                )
            name, wnid = fields[0], fields[1]
            if wnid in self.class_to_idx:
                self.samples.append(f"val/images/{name}")
                self.targets.append(self.class_to_idx[wnid])
        missing = [path for path in self.samples if not self.tree.exists(path)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images listed in '{self.tree.where(annotations)}' are missing, e.g. "
                f"'{self.tree.where(missing[0])}'."
            )
        if not self.samples:
            raise ValueError(f"'{self.tree.where(annotations)}' lists no image of the selected classes.")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        with Image.open(io.BytesIO(self.tree.read_bytes(self.samples[index]))) as image:
            rgb = image.convert("RGB")
        return (rgb if self.transform is None else self.transform(rgb)), self.targets[index]

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> TinyImageNet:
        """The same items with another transform (a shallow copy: the file list and labels are shared)."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}('{self.tree.path}', split={self.split!r}, "
            f"{len(self.classes)} classes, {len(self)} images)"
        )


class TinyImageNetDataModule(SplitDataModule):
    """Tiny ImageNet as ImageNet-normalized ``(3, image_size, image_size)`` tensors, from a folder or a zip.

    Test set: the original ``val/`` split. Validation: the test set, or a stratified hold-out of the
    training set if ``val_fraction > 0``. Nothing is downloaded.

    Args:
        data_dir: a folder with the tiny-imagenet-200 layout (``wnids.txt``, ``train/``, ``val/``) or a
            ``.zip`` with that layout under one top folder; a zip is read in place, never extracted.
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes (each opens the zip itself).
        image_size: images are resized to ``image_size × image_size`` (64 is native; 32 for CPU-scale runs).
        augment: random crop (padding ``image_size // 8``) and horizontal flip on the training images.
        classes: keep only the first ``classes`` class ids of ``wnids.txt`` (None: all of them).
        val_fraction: if > 0, a stratified hold-out of this share of the training set (seeded by ``seed``,
            without augmentation) is the validation set; if 0, validation uses the test split.
        seed: seed of the validation hold-out.
        train_per_class: keep only the first ``train_per_class`` training images of each class (None: all
            500) — a smaller training set for CPU-scale runs; the test set is never cut.

    Examples:
        >>> zip_path = "../shared/data/tiny-imagenet-20.zip"
        >>> data = TinyImageNetDataModule(zip_path, image_size=32)  # doctest: +SKIP
        >>> data.setup("fit")  # doctest: +SKIP
        >>> data.num_classes, len(data.train_set), data.train_set[0][0].shape  # doctest: +SKIP
        (20, 10000, torch.Size([3, 32, 32]))
    """

    def __init__(
        self,
        data_dir: str = "data/tiny-imagenet-200",
        batch_size: int = 128,
        num_workers: int = 4,
        image_size: int = 64,
        augment: bool = True,
        classes: int | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
        train_per_class: int | None = None,
    ) -> None:
        super().__init__()
        check_fraction(val_fraction)
        if train_per_class is not None and (isinstance(train_per_class, bool) or train_per_class < 1):
            raise ValueError(
                f"train_per_class must be None (all) or an integer >= 1, got {train_per_class!r}."
            )
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}.")
        if classes is not None and (isinstance(classes, bool) or classes < 1):
            raise ValueError(f"classes must be None (all) or an integer >= 1, got {classes!r}.")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.augment = augment
        self.classes = classes
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_per_class = train_per_class
        self._num_classes: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes: ``classes``, or every class id in ``wnids.txt`` (read on first use)."""
        if self._num_classes is None:
            self._num_classes = len(read_wnids(self.data_dir, self.classes))
        return self._num_classes

    def eval_transform(self) -> T.Compose:
        """Resize to ``image_size``, ``ToTensor`` and ``Normalize`` with the ImageNet statistics."""
        return T.Compose(
            [
                T.Resize((self.image_size, self.image_size), antialias=True),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def train_transform(self) -> T.Compose:
        """Resize, random crop with padding ``image_size // 8``, horizontal flip, ToTensor, Normalize."""
        if not self.augment:
            return self.eval_transform()
        resize, *to_tensor_and_normalize = self.eval_transform().transforms
        size = self.image_size
        crop = [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
        return T.Compose([resize, *crop, *to_tensor_and_normalize])

    def missing_data(self) -> str | None:
        """What is missing for this data module to load (``None``: nothing), without reading any image."""
        path = Path(os.path.expanduser(self.data_dir))
        if path.exists():
            return None
        return (
            f"Tiny ImageNet not found at '{path}' (expected a folder or .zip): download "
            "tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) and set data_dir to "
            "it, or build a subset of its first N classes there: `lightning-dimat data tiny-imagenet "
            f"tiny-imagenet-200.zip --classes N --output {path}`"
        )

    def setup(self, stage: str | None = None) -> None:
        """Indexes both splits (labels only; images are read per item) and builds the three sets."""
        if hasattr(self, "train_set"):
            return
        train = TinyImageNet(
            self.data_dir, "train", self.train_transform(), self.classes, self.train_per_class
        )
        test = TinyImageNet(self.data_dir, "val", self.eval_transform(), self.classes)
        self._num_classes = len(train.classes)
        self.assign_splits(
            train, train.with_transform(self.eval_transform()), test, np.asarray(train.targets)
        )
