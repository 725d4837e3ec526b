"""CIFAR-10/100 and Tiny ImageNet DataModules: parsing, labels, transforms, splits and errors (offline)."""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T

from lightning_dimat.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    TinyImageNet,
    TinyImageNetDataModule,
)
from lightning_dimat.partition import dataset_labels

# ../shared/data beside the checkout; TINY_IMAGENET_ZIP overrides it (.ci/run sets it for a fresh clone).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- CIFAR files, written by hand
def py2_pickle(obj: Any) -> bytes:
    """A protocol-2 pickle in which ``bytes`` are Python 2 ``str`` (SHORT_BINSTRING/BINSTRING opcodes).

    That is how the CIFAR "python version" files were written: loaded with ``encoding="bytes"`` their keys are
    ``b"data"``, ``b"labels"``..., with ``encoding="latin1"`` (as torchvision does) they are ``"data"``...
    Python 3's pickler cannot write a Python 2 ``str``, so the opcodes are emitted here; numpy arrays are
    spliced in from ``pickle.dumps(array, protocol=2)`` (no other part of the pickle uses the memo).
    """
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    return bytes(out + b".")


def _emit(obj: Any, out: bytearray) -> None:
    if isinstance(obj, np.ndarray):
        out += pickle.dumps(obj, protocol=2)[2:-1]
    elif isinstance(obj, bytes):
        out += b"U" + bytes([len(obj)]) + obj if len(obj) < 256 else b"T" + struct.pack("<i", len(obj)) + obj
    elif isinstance(obj, int):
        out += b"J" + struct.pack("<i", obj)
    elif isinstance(obj, list):
        out += b"](" + b"".join(_emitted(item) for item in obj) + b"e"
    elif isinstance(obj, dict):
        out += b"}(" + b"".join(_emitted(k) + _emitted(v) for k, v in obj.items()) + b"u"
    else:
        raise TypeError(type(obj))


def _emitted(obj: Any) -> bytes:
    out = bytearray()
    _emit(obj, out)
    return bytes(out)


def cifar_images(count: int, seed: int) -> np.ndarray:
    """``count`` random images as CIFAR rows: uint8, 1024 red, 1024 green, 1024 blue values, row-major."""
    return np.random.default_rng(seed).integers(0, 256, (count, 3072), dtype=np.uint8)


def set_pixel(rows: np.ndarray, index: int, y: int, x: int, rgb: tuple[int, int, int]) -> None:
    for channel, value in enumerate(rgb):
        rows[index, channel * 1024 + y * 32 + x] = value


def write_cifar10(root: Path) -> dict[str, np.ndarray]:
    """5 train batches of 4 images (labels 0-9, twice each) and a test batch of 6, in cifar-10-batches-py/."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for batch in range(5):
        rows = cifar_images(4, seed=batch)
        labels = [(4 * batch + i) % 10 for i in range(4)]
        if batch == 0:
            set_pixel(rows, 0, 0, 0, (255, 0, 128))
            set_pixel(rows, 0, 5, 7, (10, 20, 30))
        entry = {
            b"batch_label": f"training batch {batch + 1} of 5".encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"img_{batch}_{i}.png".encode() for i in range(4)],
        }
        (folder / f"data_batch_{batch + 1}").write_bytes(py2_pickle(entry))
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = cifar_images(6, seed=10), [5, 4, 3, 2, 1, 0]
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test_rows}
    (folder / "test_batch").write_bytes(py2_pickle(test))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    meta = {b"num_cases_per_batch": 4, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return {
        "train": np.concatenate(train_rows),
        "train_labels": np.array(train_labels),
        "test": test_rows,
        "test_labels": np.array(test_labels),
    }


def write_cifar100(root: Path) -> dict[str, np.ndarray]:
    """20 train and 5 test images with fine and coarse labels, in cifar-100-python/."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_train = [99, 0, 17, 42, 5] * 4
    fine_test = [3, 99, 0, 17, 64]
    train_rows, test_rows = cifar_images(20, seed=1), cifar_images(5, seed=2)
    set_pixel(train_rows, 0, 31, 0, (0, 255, 51))
    for name, rows, fine in (("train", train_rows, fine_train), ("test", test_rows, fine_test)):
        entry = {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(fine))],
            b"batch_label": name.encode(),
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
            b"data": rows,
        }
        (folder / name).write_bytes(py2_pickle(entry))
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(py2_pickle(meta))
    return {"train": train_rows, "train_labels": np.array(fine_train), "test_labels": np.array(fine_test)}


def normalized(value: int, mean: float, std: float) -> float:
    return (value / 255 - mean) / std


def as_tensor(row: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The expected evaluation tensor of one CIFAR row."""
    image = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255)
    return (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def has(transform: Any, kind: type) -> bool:
    return any(isinstance(t, kind) for t in transform.transforms)


def test_fake_cifar_files_are_in_the_real_format(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (4, 3072)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"][0] == "airplane"


def test_cifar10_parses_labels_and_normalizes(tmp_path: Path) -> None:
    raw = write_cifar10(tmp_path)
    data = CIFAR10DataModule(str(tmp_path), batch_size=4, num_workers=0, augment=False, check_md5=False)
    data.setup("fit")
    assert data.num_classes == 10
    assert len(data.train_set) == 20 and len(data.test_set) == 6 and data.val_set is data.test_set
    assert data.train_set.targets == raw["train_labels"].tolist()
    assert dataset_labels(data.test_set).tolist() == raw["test_labels"].tolist()
    image, label = data.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    expected = [normalized(v, m, s) for v, m, s in zip((255, 0, 128), CIFAR10_MEAN, CIFAR10_STD, strict=True)]
    torch.testing.assert_close(image[:, 0, 0], torch.tensor(expected))
    expected = [normalized(v, m, s) for v, m, s in zip((10, 20, 30), CIFAR10_MEAN, CIFAR10_STD, strict=True)]
    torch.testing.assert_close(image[:, 5, 7], torch.tensor(expected))  # row 5, column 7
    for index in (0, 7, 19):
        torch.testing.assert_close(
            data.train_set[index][0], as_tensor(raw["train"][index], CIFAR10_MEAN, CIFAR10_STD)
        )
    torch.testing.assert_close(data.test_set[2][0], as_tensor(raw["test"][2], CIFAR10_MEAN, CIFAR10_STD))
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long


def test_cifar10_val_fraction_holds_out_unaugmented_stratified_split(tmp_path: Path) -> None:
    raw = write_cifar10(tmp_path)
    data = CIFAR10DataModule(str(tmp_path), num_workers=0, val_fraction=0.5, seed=3, check_md5=False)
    data.setup("fit")
    train, val = data.train_set, data.val_set
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert len(train) == 10 and len(val) == 10 and len(data.test_set) == 6
    assert sorted(train.indices + val.indices) == list(range(20))
    assert sorted(dataset_labels(val).tolist()) == list(range(10))  # one image of each class
    assert sorted(dataset_labels(train).tolist()) == list(range(10))
    assert has(train.dataset.transform, T.RandomCrop) and has(train.dataset.transform, T.RandomHorizontalFlip)
    assert not has(val.dataset.transform, T.RandomCrop) and not has(
        val.dataset.transform, T.RandomHorizontalFlip
    )
    assert val.dataset.data is train.dataset.data  # one copy of the images
    for position in range(3):
        image, label = val[position]
        index = val.indices[position]
        assert label == raw["train_labels"][index]
        torch.testing.assert_close(image, as_tensor(raw["train"][index], CIFAR10_MEAN, CIFAR10_STD))
    again = CIFAR10DataModule(str(tmp_path), num_workers=0, val_fraction=0.5, seed=3, check_md5=False)
    again.setup("fit")
    assert again.val_set.indices == val.indices


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    raw = write_cifar100(tmp_path)
    data = CIFAR100DataModule(str(tmp_path), num_workers=0, augment=False, check_md5=False)
    data.setup()
    assert data.num_classes == 100
    assert data.train_set.targets == raw["train_labels"].tolist()
    assert data.test_set.targets == raw["test_labels"].tolist()
    image, label = data.train_set[0]
    assert image.shape == (3, 32, 32) and label == 99
    expected = [
        normalized(v, m, s) for v, m, s in zip((0, 255, 51), CIFAR100_MEAN, CIFAR100_STD, strict=True)
    ]
    torch.testing.assert_close(image[:, 31, 0], torch.tensor(expected))
    torch.testing.assert_close(image, as_tensor(raw["train"][0], CIFAR100_MEAN, CIFAR100_STD))


def test_cifar_missing_data_errors(tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    data = CIFAR10DataModule(str(empty), download=False)
    data.prepare_data()  # nothing to do, nothing downloaded
    with pytest.raises(FileNotFoundError, match=r"(?s)nothing.*download=True.*place"):
        data.setup()
    # setup() never downloads, even with download=True: it says to run prepare_data().
    with pytest.raises(FileNotFoundError, match=r"prepare_data\(\)"):
        CIFAR100DataModule(str(empty), download=True).setup()
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(str(tmp_path), download=False, check_md5=False).setup()
    with pytest.raises(ValueError, match="val_fraction"):
        CIFAR10DataModule(val_fraction=1.0)


def test_cifar_md5_check_is_on_by_default(tmp_path: Path) -> None:
    """torchvision compares every file with the published MD5 on load; files written here cannot match."""
    write_cifar10(tmp_path)
    with pytest.raises(RuntimeError, match=r"(?s)MD5.*check_md5=False"):
        CIFAR10DataModule(str(tmp_path), download=False).setup()


# --------------------------------------------------------------------------- Tiny ImageNet: the 20-class zip
@pytest.fixture(scope="module")
def tiny20(tiny_zip: Path) -> TinyImageNetDataModule:
    data = TinyImageNetDataModule(str(tiny_zip), batch_size=8, num_workers=2)
    data.setup("fit")
    return data


def test_tiny_imagenet_zip_sizes_and_labels(tiny_zip: Path, tiny20: TinyImageNetDataModule) -> None:
    with zipfile.ZipFile(tiny_zip) as archive:
        wnids = archive.read("tiny-imagenet-20/wnids.txt").decode().split()
        annotations = archive.read("tiny-imagenet-20/val/val_annotations.txt").decode().splitlines()
    truth = {line.split("\t")[0]: line.split("\t")[1] for line in annotations if line}
    train, test = tiny20.train_set, tiny20.test_set
    assert tiny20.num_classes == 20 and train.classes == wnids
    assert len(train) == 10_000 and len(test) == 1_000 and tiny20.val_set is test
    assert Counter(train.targets) == dict.fromkeys(range(20), 500)
    assert Counter(test.targets) == dict.fromkeys(range(20), 50)
    assert len(set(train.samples)) == 10_000
    for path, label in zip(train.samples, train.targets, strict=True):
        assert path.split("/")[1] == wnids[label]  # train/<wnid>/images/<file>
    for path, label in zip(test.samples, test.targets, strict=True):
        assert truth[path.rsplit("/", 1)[1]] == wnids[label]
    assert test.samples[0] == "val/images/val_1.JPEG" and test.targets[0] == wnids.index("n04067472")
    assert dataset_labels(train).tolist() == train.targets


def test_tiny_imagenet_zip_images(tiny_zip: Path, tiny20: TinyImageNetDataModule) -> None:
    image, label = tiny20.test_set[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and isinstance(label, int)
    assert tiny20.train_set[1234][0].shape == (3, 64, 64)
    small = TinyImageNetDataModule(str(tiny_zip), image_size=32, classes=5)
    small.setup()
    assert small.num_classes == 5
    assert len(small.train_set) == 2_500 and len(small.test_set) == 250
    assert set(small.test_set.targets) == set(range(5))
    assert small.train_set[0][0].shape == (3, 32, 32) and small.test_set[0][0].shape == (3, 32, 32)
    assert small.train_transform().transforms[1].padding == 4  # RandomCrop(32, padding=32 // 8)


def test_tiny_imagenet_zip_in_worker_processes(tiny20: TinyImageNetDataModule) -> None:
    dataset = tiny20.test_set
    first = dataset[0][0]  # opens the zip in this process before the workers fork
    images, labels = next(iter(tiny20.train_dataloader()))
    assert images.shape == (8, 3, 64, 64) and labels.shape == (8,)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    images, labels = next(iter(loader))
    torch.testing.assert_close(images[0], first)
    assert labels.tolist() == dataset.targets[:4]
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives: no open handle
    assert copy.tree._zip is None
    torch.testing.assert_close(copy[0][0], first)


def test_tiny_imagenet_val_fraction(tiny_zip: Path) -> None:
    data = TinyImageNetDataModule(str(tiny_zip), val_fraction=0.1, image_size=32)
    data.setup()
    assert len(data.train_set) == 9_000 and len(data.val_set) == 1_000 and len(data.test_set) == 1_000
    assert Counter(dataset_labels(data.val_set).tolist()) == dict.fromkeys(range(20), 50)
    assert not set(data.train_set.indices) & set(data.val_set.indices)
    assert has(data.train_set.dataset.transform, T.RandomCrop)
    assert not has(data.val_set.dataset.transform, T.RandomCrop)
    assert not has(data.val_set.dataset.transform, T.RandomHorizontalFlip)
    torch.testing.assert_close(data.val_set[0][0], data.val_set[0][0])  # deterministic: no augmentation


def test_tiny_imagenet_train_per_class_keeps_the_first_images_of_each_class(tiny_zip: Path) -> None:
    data = TinyImageNetDataModule(str(tiny_zip), image_size=32, train_per_class=7, num_workers=0)
    data.setup("fit")
    assert len(data.train_set) == 20 * 7 and len(data.test_set) == 1000
    assert all(data.train_set.targets[i] == i // 7 for i in range(140))
    with pytest.raises(ValueError, match="train_per_class must be None \\(all\\) or an integer >= 1, got 0"):
        TinyImageNetDataModule(str(tiny_zip), train_per_class=0)


# --------------------------------------------------------------------------- Tiny ImageNet: a fake tree
FAKE_WNIDS = ["n003", "n001", "n002"]  # not sorted: labels follow wnids.txt order
FAKE_VAL = [("val_0.JPEG", "n002"), ("val_1.JPEG", "n003"), ("val_2.JPEG", "n001"), ("val_3.JPEG", "n002")]


def write_jpeg(path: Path, color: tuple[int, int, int], gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (16, 16), color)
    image.paste((255 - color[0], color[2], color[1]), (4, 4, 12, 8))
    (image.convert("L") if gray else image).save(path, format="JPEG")


def write_fake_tiny(root: Path) -> Path:
    """3 classes × 2 training images (one grayscale), 4 val images; then the same tree zipped."""
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(FAKE_WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in FAKE_WNIDS))
    for k, wnid in enumerate(FAKE_WNIDS):
        for i in range(2):
            write_jpeg(
                root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (80 * k, 40 * i, 200), gray=k == i == 1
            )
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t15\t15\n")
    for i, (name, _) in enumerate(FAKE_VAL):
        write_jpeg(root / "val" / "images" / name, (30 * i, 250, 60))
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{n}\t{w}\t1\t2\t14\t15\n" for n, w in FAKE_VAL)
    )
    archive = root.parent / f"{root.name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):  # with folder entries, like the original zip
            zf.write(path, f"{root.name}/{path.relative_to(root).as_posix()}")
    return archive


def test_fake_tiny_imagenet_folder_and_zip_agree(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-fake"
    archive = write_fake_tiny(folder)
    for split, targets in (("train", [0, 0, 1, 1, 2, 2]), ("val", [2, 0, 1, 2])):
        from_folder = TinyImageNet(folder, split, transform=T.ToTensor())
        from_zip = TinyImageNet(archive, split, transform=T.ToTensor())
        assert from_folder.classes == from_zip.classes == FAKE_WNIDS
        assert from_folder.samples == from_zip.samples and from_folder.targets == from_zip.targets == targets
        for index in range(len(from_zip)):
            assert torch.equal(from_folder[index][0], from_zip[index][0])
    gray, label = TinyImageNet(archive, "train")[3]  # n001_1.JPEG, saved as grayscale
    assert gray.mode == "RGB" and label == 1
    pixels = np.asarray(gray)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    data = TinyImageNetDataModule(str(archive), batch_size=3, num_workers=0, image_size=16, augment=False)
    data.setup()
    image = data.test_set[0][0]
    raw = T.ToTensor()(TinyImageNet(folder, "val")[0][0])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(image, (raw - mean) / std)  # ImageNet statistics, not divided by 255
    big = TinyImageNetDataModule(str(folder), image_size=64, classes=2)
    big.setup()
    assert big.num_classes == 2 and big.train_set[0][0].shape == (3, 64, 64)
    assert big.train_set.targets == [0, 0, 1, 1] and big.test_set.targets == [0, 1]


def test_fake_tiny_imagenet_errors(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-fake"
    archive = write_fake_tiny(folder)
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        TinyImageNetDataModule(str(missing)).setup()
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        _ = TinyImageNetDataModule(str(missing)).num_classes
    with pytest.raises(FileNotFoundError, match=r"(?s)has no wnids.txt.*Did you mean .*tiny-fake"):
        TinyImageNet(tmp_path)  # the parent of the tree
    no_wnids = tmp_path / "no-wnids.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(no_wnids, "w") as dst:
        for name in src.namelist():
            if not name.endswith("wnids.txt"):
                dst.writestr(name, src.read(name))
    with pytest.raises(FileNotFoundError, match=r"no-wnids\.zip.*wnids\.txt"):
        TinyImageNet(no_wnids)
    not_zip = tmp_path / "images.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a zip"):
        TinyImageNet(not_zip)
    with pytest.raises(ValueError, match=r"classes must be an integer from 1 to 3"):
        TinyImageNetDataModule(str(archive), classes=4).setup()
    with pytest.raises(ValueError, match=r"from 1 to 3"):
        _ = TinyImageNetDataModule(str(folder), classes=4).num_classes
    with pytest.raises(ValueError, match="classes"):
        TinyImageNetDataModule(str(archive), classes=0)
    with pytest.raises(ValueError, match="classes"):
        TinyImageNet(folder, classes=0)
    with pytest.raises(ValueError, match="split"):
        TinyImageNet(folder, "test")  # type: ignore[arg-type]
    (folder / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"val_2\.JPEG"):
        TinyImageNet(folder, "val")


def test_tiny_imagenet_reads_the_zip_without_extracting(tmp_path: Path) -> None:
    archive = write_fake_tiny(tmp_path / "tiny-fake")
    moved = tmp_path / "elsewhere" / "t.zip"
    moved.parent.mkdir()
    archive.rename(moved)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    dataset = TinyImageNet(moved, "val")
    assert len(dataset) == 4 and all(dataset[i][0].size == (16, 16) for i in range(4))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
