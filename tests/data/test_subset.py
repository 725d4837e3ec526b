"""``lightning-dimat data tiny-imagenet``: a K-class Tiny ImageNet zip in the original layout, reproducible.

The real-data tests cut the shared 20-class zip (skipped when it is absent); the others use a synthetic tree
of a few 4×4 JPEGs, written here as a folder and as a zip.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lightning_dimat.console import main as console_main
from lightning_dimat.data import TinyImageNet, TinyImageNetDataModule
from lightning_dimat.data import subset as subset_module
from lightning_dimat.data.subset import SubsetInfo, build_tiny_imagenet_subset, sha256_of

# Synthetic source: wnids.txt not in sorted order, words.txt with more ids than the classes (as the original's
# 82,115 lines), 3 train and 2 val images per class, an unlabelled test/ split that a subset leaves out.
WNIDS = ["n03000003", "n01000001", "n04000004", "n02000002"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 2


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


def _synthetic_files(words: bool = True) -> dict[str, bytes]:
    """Relative path → content of a small tree in the tiny-imagenet-200 layout."""
    files = {"wnids.txt": "".join(f"{wnid}\n" for wnid in WNIDS).encode()}
    if words:
        ids = sorted([*WNIDS, "n00000000", "n09999999"])
        files["words.txt"] = "".join(f"{wnid}\tname of {wnid}\n" for wnid in ids).encode()
    for number, wnid in enumerate(WNIDS):
        names = [f"{wnid}_{index}.JPEG" for index in range(TRAIN_PER_CLASS)]
        for index, name in enumerate(names):
            files[f"train/{wnid}/images/{name}"] = _jpeg(10 * number + index)
        files[f"train/{wnid}/{wnid}_boxes.txt"] = "".join(f"{name}\t0\t0\t3\t3\n" for name in names).encode()
    lines = []
    for index in range(VAL_PER_CLASS * len(WNIDS)):  # classes interleaved, as in the original
        name, wnid = f"val_{index}.JPEG", WNIDS[index % len(WNIDS)]
        files[f"val/images/{name}"] = _jpeg(100 + index)
        lines.append(f"{name}\t{wnid}\t0\t0\t3\t3\n")
    files["val/val_annotations.txt"] = "".join(lines).encode()
    files["test/images/test_0.JPEG"] = _jpeg(999)
    return files


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return root


def _write_zip(path: Path, files: dict[str, bytes], top: str = "tiny-imagenet-200/") -> Path:
    """A zip like the downloaded one: folder entries, members in no particular order, deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(top, b"")
        for relative in reversed(list(files)):
            archive.writestr(top + relative, files[relative])
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _write_folder(tmp_path / "tiny-imagenet-200", _synthetic_files())


@pytest.fixture
def synthetic_zip(tmp_path: Path) -> Path:
    return _write_zip(tmp_path / "tiny-imagenet-200.zip", _synthetic_files())


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# --------------------------------------------------------------------------- synthetic source
def test_subset_of_the_synthetic_tree_has_the_original_layout(synthetic_zip: Path, tmp_path: Path) -> None:
    info = build_tiny_imagenet_subset(synthetic_zip, tmp_path / "out" / "sub.zip", 2)
    top = "tiny-imagenet-2/"
    chosen = WNIDS[:2]
    members = _members(info.output)
    assert isinstance(info, SubsetInfo) and info.classes == tuple(chosen)
    assert (info.train_images, info.val_images) == (2 * TRAIN_PER_CLASS, 2 * VAL_PER_CLASS)
    assert all(name.startswith(top) for name in members)
    assert members[top + "wnids.txt"] == b"n03000003\nn01000001\n"
    assert members[top + "words.txt"] == b"n01000001\tname of n01000001\nn03000003\tname of n03000003\n"
    expected = {
        *(f"train/{wnid}/images/{wnid}_{index}.JPEG" for wnid in chosen for index in range(TRAIN_PER_CLASS)),
        *(f"train/{wnid}/{wnid}_boxes.txt" for wnid in chosen),
        *(f"val/images/val_{index}.JPEG" for index in (0, 1, 4, 5)),
        "wnids.txt",
        "words.txt",
        "val/val_annotations.txt",
    }
    assert {name[len(top) :] for name in members} == expected  # no test/, no other class
    source = _synthetic_files()
    for relative in expected - {"wnids.txt", "words.txt", "val/val_annotations.txt"}:
        assert members[top + relative] == source[relative]
    annotations = members[top + "val/val_annotations.txt"].decode().splitlines()
    assert [line.split("\t")[:2] for line in annotations] == [
        ["val_0.JPEG", "n03000003"],
        ["val_1.JPEG", "n01000001"],
        ["val_4.JPEG", "n03000003"],
        ["val_5.JPEG", "n01000001"],
    ]
    with zipfile.ZipFile(info.output) as archive:
        infos = archive.infolist()
    assert [entry.filename for entry in infos] == sorted(members)
    assert {(entry.date_time, entry.compress_type) for entry in infos} == {
        ((1980, 1, 1, 0, 0, 0), zipfile.ZIP_STORED)
    }
    assert info.source_sha256 == hashlib.sha256(synthetic_zip.read_bytes()).hexdigest()
    assert info.sha256 == hashlib.sha256(info.output.read_bytes()).hexdigest()


def test_builds_are_reproducible_and_checksummed(synthetic_zip: Path, tmp_path: Path) -> None:
    first = build_tiny_imagenet_subset(synthetic_zip, tmp_path / "a.zip", 3)
    second = build_tiny_imagenet_subset(synthetic_zip, tmp_path / "b" / "a.zip", 3)
    assert first.sha256 == second.sha256 == sha256_of(second.output)
    assert first.output.read_bytes() == second.output.read_bytes()
    assert Path(f"{first.output}.sha256").read_text() == f"{first.sha256}  a.zip\n"  # sha256sum format
    # A subset built earlier is a source in the same layout: cutting it to all its classes gives it back.
    again = build_tiny_imagenet_subset(first.output, tmp_path / "again.zip", 3)
    assert again.sha256 == first.sha256 and again.source_sha256 == first.sha256
    # Rebuilding over an existing output (overwrite=True) gives the same file and leaves no temporary file.
    rebuilt = build_tiny_imagenet_subset(synthetic_zip, first.output, 3, overwrite=True)
    assert rebuilt.sha256 == first.sha256
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_folder_source_gives_the_same_zip_as_the_zip_source(
    folder: Path, synthetic_zip: Path, tmp_path: Path
) -> None:
    from_folder = build_tiny_imagenet_subset(folder, tmp_path / "folder.zip", ["n04000004", "n01000001"])
    from_zip = build_tiny_imagenet_subset(synthetic_zip, tmp_path / "zip.zip", ["n04000004", "n01000001"])
    assert _members(from_folder.output) == _members(from_zip.output)
    assert from_folder.sha256 == from_zip.sha256
    assert from_folder.source_sha256 is None and from_zip.source_sha256 is not None
    assert "source folder" in from_folder.summary()


def test_wnids_by_list_keep_their_order_and_labels(folder: Path, tmp_path: Path) -> None:
    chosen = ["n02000002", "n03000003", "n01000001"]
    info = build_tiny_imagenet_subset(folder, tmp_path / "sub.zip", chosen)
    assert info.classes == tuple(chosen)
    val = TinyImageNet(info.output, "val")
    assert val.classes == chosen
    labels = {name.split("\t")[0]: name.split("\t")[1] for name in _synthetic_annotations()}
    for path, label in zip(val.samples, val.targets, strict=True):
        assert chosen[label] == labels[path.rsplit("/", 1)[1]]
    train = TinyImageNet(info.output, "train")
    assert Counter(train.targets) == dict.fromkeys(range(3), TRAIN_PER_CLASS)
    assert train[0][0].size == (4, 4)


def _synthetic_annotations() -> list[str]:
    return _synthetic_files()["val/val_annotations.txt"].decode().splitlines()


def test_source_without_words_txt(tmp_path: Path) -> None:
    source = _write_folder(tmp_path / "src", _synthetic_files(words=False))
    info = build_tiny_imagenet_subset(source, tmp_path / "sub.zip", 1)
    assert "tiny-imagenet-1/words.txt" not in _members(info.output)
    assert len(TinyImageNet(info.output, "val")) == VAL_PER_CLASS


def _bad_call(case: str, tmp_path: Path, source: Path) -> tuple[dict[str, Any], type[Exception], str]:
    """Arguments of one bad call, the error it must raise and a pattern of its message."""
    output = tmp_path / "out.zip"
    if case == "missing-source":
        return {"source": tmp_path / "nowhere.zip"}, FileNotFoundError, r"nowhere\.zip' not found.*download"
    if case == "not-a-zip":
        (tmp_path / "notes.zip").write_text("not a zip")
        return {"source": tmp_path / "notes.zip"}, ValueError, r"notes\.zip' is a file but not a zip"
    if case == "zip-without-wnids":
        bad = _write_zip(tmp_path / "other.zip", {"readme.txt": b"hello"})
        return {"source": bad}, FileNotFoundError, r"other\.zip' has no wnids\.txt"
    if case == "folder-without-train":
        files = {k: v for k, v in _synthetic_files().items() if not k.startswith("train/")}
        bad = _write_folder(tmp_path / "no-train", files)
        return {"source": bad}, FileNotFoundError, r"no training images for class n03000003.*layout"
    if case == "folder-without-val":
        files = {k: v for k, v in _synthetic_files().items() if not k.startswith("val/")}
        bad = _write_folder(tmp_path / "no-val", files)
        return {"source": bad}, FileNotFoundError, r"val_annotations\.txt' is missing.*layout"
    if case == "zero-classes":
        return {"classes": 0}, ValueError, r"classes must be an integer from 1 to 4 .*got 0"
    if case == "too-many-classes":
        return {"classes": 5}, ValueError, r"classes must be an integer from 1 to 4 .*got 5"
    if case == "unknown-wnid":
        return {"classes": ["n01000001", "n07777777"]}, ValueError, r"\['n07777777'\] are not in .*wnids\.txt"
    if case == "duplicate-wnid":
        chosen = ["n01000001", "n02000002", "n01000001"]
        return {"classes": chosen}, ValueError, r"\['n01000001'\] are given more than once"
    if case == "empty-list":
        return {"classes": []}, ValueError, "classes is an empty list"
    if case == "string-classes":
        return (
            {"classes": "n01000001,n02000002"},
            ValueError,
            r"got the string .*\['n01000001', 'n02000002'\]",
        )
    if case == "output-exists":
        output.write_bytes(b"keep me")
        return {}, FileExistsError, r"out\.zip' exists: pass overwrite=True"
    if case == "output-is-a-folder":
        output.mkdir()
        return {"overwrite": True}, FileExistsError, r"out\.zip' is a folder"
    if case == "output-is-the-source":
        return {"output": source, "overwrite": True}, ValueError, "is the source itself"
    if case == "sha256-mismatch":
        wrong = "0" * 64
        return {"expected_sha256": wrong}, ValueError, rf"has sha256 [0-9a-f]{{64}}, not the expected {wrong}"
    if case == "sha256-malformed":
        return (
            {"expected_sha256": "abc"},
            ValueError,
            "expected_sha256 must be 64 hexadecimal digits, got 'abc'",
        )
    raise AssertionError(case)


BAD_CASES = [
    "missing-source",
    "not-a-zip",
    "zip-without-wnids",
    "folder-without-train",
    "folder-without-val",
    "zero-classes",
    "too-many-classes",
    "unknown-wnid",
    "duplicate-wnid",
    "empty-list",
    "string-classes",
    "output-exists",
    "output-is-a-folder",
    "output-is-the-source",
    "sha256-mismatch",
    "sha256-malformed",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_naming_it(case: str, synthetic_zip: Path, tmp_path: Path) -> None:
    changes, error, message = _bad_call(case, tmp_path, synthetic_zip)
    arguments: dict[str, Any] = {"source": synthetic_zip, "output": tmp_path / "out.zip", "classes": 2}
    before = sorted(tmp_path.iterdir())
    with pytest.raises(error, match=message):
        build_tiny_imagenet_subset(**{**arguments, **changes})
    assert sorted(tmp_path.iterdir()) == before  # nothing written, not even a temporary file
    if case == "output-exists":
        assert (tmp_path / "out.zip").read_bytes() == b"keep me"


def test_failed_write_leaves_no_partial_zip(
    synthetic_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_half(path: Path, *args: Any) -> None:
        path.write_bytes(b"PK half")
        raise OSError("disk full")

    output = tmp_path / "data" / "sub.zip"
    output.parent.mkdir()
    output.write_bytes(b"previous build")
    monkeypatch.setattr(subset_module, "_write_zip", write_half)
    with pytest.raises(OSError, match="disk full"):
        build_tiny_imagenet_subset(synthetic_zip, output, 2, overwrite=True)
    assert [path.name for path in output.parent.iterdir()] == ["sub.zip"]  # the temporary file is gone
    assert output.read_bytes() == b"previous build"


def test_cli_builds_into_data_by_default(
    synthetic_zip: Path, tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    console_main(["data", "tiny-imagenet", str(synthetic_zip), "--classes", "2"])
    line = capsys.readouterr().out.strip()
    output = Path("data/tiny-imagenet-2.zip")
    sha256 = sha256_of(output)
    source_sha256 = sha256_of(synthetic_zip)
    assert line == (
        f"2 classes, 6 train + 4 val images -> {output} sha256 {sha256} (source sha256 {source_sha256})"
    )
    assert Path("data/tiny-imagenet-2.zip.sha256").read_text() == f"{sha256}  tiny-imagenet-2.zip\n"
    # Class ids as a comma-separated list, an explicit output, the source's checksum checked.
    console_main(
        [
            "data",
            "tiny-imagenet",
            str(synthetic_zip),
            "--classes",
            "n02000002,n04000004",
            "--output",
            "picked.zip",
            "--expected-sha256",
            source_sha256.upper(),
        ]
    )
    assert "2 classes" in capsys.readouterr().out
    assert TinyImageNet("picked.zip", "val").classes == ["n02000002", "n04000004"]


def test_cli_errors(synthetic_zip: Path, tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["data", "tiny-imagenet", str(synthetic_zip), "--classes", "1", "--output", "one.zip"]
    console_main(arguments)
    with pytest.raises(SystemExit, match=r"lightning-dimat data tiny-imagenet: error: .*one\.zip' exists"):
        console_main(arguments)
    console_main([*arguments, "--overwrite"])
    with pytest.raises(SystemExit, match=r"error: .*got 9"):
        console_main([*arguments[:4], "9", "--output", "nine.zip"])
    with pytest.raises(SystemExit) as exit_info:
        console_main(["data", "tiny-imagenet", str(synthetic_zip), "--classes", ","])
    assert exit_info.value.code == 2 and "expected K or comma-separated class ids" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        console_main(["data"])
    assert exit_info.value.code == 2 and "DATASET" in capsys.readouterr().err


# --------------------------------------------------------------------------- the shared 20-class zip
@pytest.fixture(scope="module")
def three(tiny_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> SubsetInfo:
    return build_tiny_imagenet_subset(tiny_zip, tmp_path_factory.mktemp("subset") / "tiny-imagenet-3.zip", 3)


def test_three_classes_of_the_real_zip(tiny_zip: Path, three: SubsetInfo) -> None:
    with zipfile.ZipFile(tiny_zip) as archive:
        wnids = archive.read("tiny-imagenet-20/wnids.txt").decode().split()
    assert three.classes == tuple(wnids[:3]) and (three.train_images, three.val_images) == (1500, 150)
    names = set(_members(three.output))
    assert {
        f"tiny-imagenet-3/{name}" for name in ("wnids.txt", "words.txt", "val/val_annotations.txt")
    } <= names
    assert all(f"tiny-imagenet-3/train/{wnid}/{wnid}_boxes.txt" in names for wnid in three.classes)
    assert len(names) == 1500 + 150 + 3 + 3
    data = TinyImageNetDataModule(str(three.output), image_size=16, num_workers=0)
    data.setup("fit")
    assert data.num_classes == 3 and data.train_set.classes == wnids[:3]
    assert Counter(data.train_set.targets) == dict.fromkeys(range(3), 500)
    assert Counter(data.test_set.targets) == dict.fromkeys(range(3), 50)
    assert data.test_set[0][0].shape == (3, 16, 16)
    whole = TinyImageNet(tiny_zip, "val", classes=3)  # the same images and labels as cut from the 20 classes
    assert (data.test_set.samples, data.test_set.targets) == (whole.samples, whole.targets)
    sample = whole.samples[7]
    assert data.test_set.tree.read_bytes(sample) == whole.tree.read_bytes(sample)


def test_real_wnids_by_list_and_reproducible(tiny_zip: Path, three: SubsetInfo, tmp_path: Path) -> None:
    again = build_tiny_imagenet_subset(tiny_zip, tmp_path / "again.zip", 3)
    assert again.sha256 == three.sha256 == sha256_of(three.output)
    assert Path(f"{three.output}.sha256").read_text() == f"{three.sha256}  tiny-imagenet-3.zip\n"
    chosen = [three.classes[2], three.classes[0]]
    picked = build_tiny_imagenet_subset(tiny_zip, tmp_path / "picked.zip", chosen)
    val = TinyImageNet(picked.output, "val")
    assert val.classes == chosen and Counter(val.targets) == {0: 50, 1: 50}
    assert picked.train_images == 1000
