"""Build a K-class subset of Tiny ImageNet as a zip in the original layout (``lightning-dimat data``).

The source is ``tiny-imagenet-200.zip`` as downloaded from http://cs231n.stanford.edu/tiny-imagenet-200.zip,
its extracted folder, or any zip or folder in the same layout (a subset built earlier). The output holds,
under one top folder ``tiny-imagenet-<K>/``, ``wnids.txt`` (the chosen ids), ``words.txt`` (their names, when
the source has one), ``train/<wnid>/images/*.JPEG`` and ``train/<wnid>/<wnid>_boxes.txt``,
``val/images/*.JPEG`` of the chosen classes and ``val/val_annotations.txt`` cut to them; the unlabelled test
split is left out.

The zip is reproducible: members in sorted order, fixed timestamps and permissions, no compression (JPEGs are
compressed already), so two builds from the same source have the same sha256. It is written to a temporary
file beside the output and renamed when complete, and its checksum goes to ``<output>.sha256``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_dimat.data.tiny_imagenet import _class_ids, _is_jpeg, _Tree

__all__ = ["SubsetInfo", "build_tiny_imagenet_subset", "main", "sha256_of"]

DOWNLOAD_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# Every member gets this timestamp (the earliest a zip can store) and these Unix permissions.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o100644
_UNIX = 3
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SubsetInfo:
    """What :func:`build_tiny_imagenet_subset` wrote.

    Attributes:
        output: the zip written.
        classes: its class ids, in ``wnids.txt`` order (a class's label is its position).
        train_images: number of training images (``train/<wnid>/images``), all classes together.
        val_images: number of validation images (``val/images``), all classes together.
        sha256: sha256 of the output zip (also in ``<output>.sha256``).
        source: the source zip or folder.
        source_sha256: sha256 of the source zip, or None when the source is a folder.
    """

    output: Path
    classes: tuple[str, ...]
    train_images: int
    val_images: int
    sha256: str
    source: Path
    source_sha256: str | None

    def summary(self) -> str:
        """One line: classes, image counts, output, checksums."""
        source = (
            f"source sha256 {self.source_sha256}" if self.source_sha256 else f"source folder {self.source}"
        )
        return (
            f"{len(self.classes)} classes, {self.train_images} train + {self.val_images} val images -> "
            f"{self.output} sha256 {self.sha256} ({source})"
        )


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file, as lowercase hex (read in 1 MiB blocks).

    Examples:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     file = pathlib.Path(folder) / "empty"
        ...     _ = file.write_bytes(b"")
        ...     sha256_of(file)
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_tiny_imagenet_subset(
    source: str | Path,
    output: str | Path,
    classes: int | Sequence[str] | None = 20,
    *,
    expected_sha256: str | None = None,
    overwrite: bool = False,
) -> SubsetInfo:
    """Write the Tiny ImageNet subset of ``classes`` from ``source`` to the zip ``output``.

    Args:
        source: ``tiny-imagenet-200.zip``, its extracted folder, or a zip/folder in the same layout.
        output: the zip to write (its folder is created); its checksum is written to ``<output>.sha256``.
        classes: K, to keep the first K class ids of the source's ``wnids.txt``; or the class ids to keep,
            in the order given (their labels in the subset); None for all.
        expected_sha256: if given, the source zip must have this sha256 (checked before anything is written).
        overwrite: replace ``output`` if it exists (otherwise an existing output is refused).

    Returns:
        The output path, class ids, image counts and both checksums.

    Raises:
        FileNotFoundError: ``source`` is missing, or lacks a file of the layout (``wnids.txt``, a class's
            training images, ``val/val_annotations.txt`` or an image it lists).
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        ValueError: ``source`` is not in the layout, ``classes`` is out of range or names unknown or
            repeated ids, ``expected_sha256`` is malformed or does not match.

    Examples:
        >>> info = build_tiny_imagenet_subset("tiny-imagenet-200.zip", "data/tiny-imagenet-20.zip", 20)
        ... # doctest: +SKIP
        >>> info.classes[:2], info.train_images, info.val_images  # doctest: +SKIP
        (('n02124075', 'n04067472'), 10000, 1000)
        >>> build_tiny_imagenet_subset("no/such.zip", "out.zip")
        Traceback (most recent call last):
        ...
        FileNotFoundError: Tiny ImageNet source 'no/such.zip' not found: ...
    """
    source = Path(os.path.expanduser(str(source)))
    output = Path(os.path.expanduser(str(output)))
    if not source.exists():
        raise FileNotFoundError(
            f"Tiny ImageNet source '{source}' not found: download {DOWNLOAD_URL} and pass the zip (or its "
            "extracted folder, or a subset built earlier)."
        )
    _check_output(source, output, overwrite)
    tree = _Tree(source)
    source_sha256 = _check_source_sha256(tree, expected_sha256)
    wnids = _chosen_classes(tree, classes)
    members, train_images, val_images = _members(tree, wnids)

    output.parent.mkdir(parents=True, exist_ok=True)
    top = f"tiny-imagenet-{len(wnids)}/"
    sha256 = _write_atomically(output, lambda path: _write_zip(path, tree, members, top))
    checksum = f"{sha256}  {output.name}\n"
    _write_atomically(Path(f"{output}.sha256"), lambda path: path.write_text(checksum))
    return SubsetInfo(output, tuple(wnids), train_images, val_images, sha256, source, source_sha256)


def _check_output(source: Path, output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise FileExistsError(f"output '{output}' is a folder: pass the path of the zip to write.")
    if output.exists() and source.is_file() and output.resolve() == source.resolve():
        raise ValueError(f"output '{output}' is the source itself: write the subset to another file.")
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"output '{output}' exists: pass overwrite=True (--overwrite) to replace it, or another output."
        )


def _check_source_sha256(tree: _Tree, expected: str | None) -> str | None:
    """The sha256 of a zip source (None for a folder), checked against ``expected`` if given."""
    if expected is not None:
        expected = expected.strip().lower()
        if not _HEX64.fullmatch(expected):
            raise ValueError(f"expected_sha256 must be 64 hexadecimal digits, got {expected!r}.")
        if not tree.is_zip:
            raise ValueError(
                f"expected_sha256 applies to a zip source, but '{tree.path}' is a folder: drop the checksum "
                "or pass the zip."
            )
    if not tree.is_zip:
        return None
    actual = sha256_of(tree.path)
    if expected is not None and actual != expected:
        raise ValueError(
            f"'{tree.path}' has sha256 {actual}, not the expected {expected}: the file is damaged or another "
            "one; download it again."
        )
    return actual


def _chosen_classes(tree: _Tree, classes: int | Sequence[str] | None) -> list[str]:
    if classes is None or isinstance(classes, int):
        return _class_ids(tree, classes)  # its error names the value and the range
    if isinstance(classes, str):
        raise ValueError(
            f"classes must be an integer K or a list of class ids, got the string {classes!r}: "
            f"pass {classes.split(',')!r} instead."
        )
    if not isinstance(classes, Sequence):
        raise ValueError(f"classes must be an integer K or a list of class ids, got {classes!r}.")
    chosen = [str(wnid).strip() for wnid in classes]
    if not chosen:
        raise ValueError("classes is an empty list: name at least one class id, or pass an integer K.")
    available = _class_ids(tree, None)
    known = set(available)
    unknown = [wnid for wnid in chosen if wnid not in known]
    if unknown:
        raise ValueError(
            f"class ids {unknown} are not in '{tree.where('wnids.txt')}' (it lists {len(available)}, e.g. "
            f"{available[0]}): check their spelling."
        )
    repeated = sorted({wnid for wnid in chosen if chosen.count(wnid) > 1})
    if repeated:
        raise ValueError(f"class ids {repeated} are given more than once in classes: name each once.")
    return chosen


def _members(tree: _Tree, wnids: list[str]) -> tuple[dict[str, str | bytes], int, int]:
    """The output's files (relative path below the top folder → source path, or content) and image counts."""
    members: dict[str, str | bytes] = {"wnids.txt": _text(wnids)}
    if tree.exists("words.txt"):
        chosen = set(wnids)
        lines = tree.read_lines("words.txt")
        members["words.txt"] = _text([line for line in lines if line.split("\t", 1)[0] in chosen])
    train_images = 0
    for wnid in wnids:
        folder = f"train/{wnid}/images"
        names = [name for name in tree.files(folder) if _is_jpeg(name)]
        if not names:
            raise FileNotFoundError(
                f"no training images for class {wnid} in '{tree.where(folder)}': the source is not in the "
                "tiny-imagenet-200 layout (train/<wnid>/images/*.JPEG)."
            )
        members.update({f"{folder}/{name}": f"{folder}/{name}" for name in names})
        train_images += len(names)
        boxes = f"train/{wnid}/{wnid}_boxes.txt"
        if tree.exists(boxes):
            members[boxes] = boxes

    annotations = "val/val_annotations.txt"
    if not tree.exists(annotations):
        raise FileNotFoundError(
            f"'{tree.where(annotations)}' is missing: the source is not in the tiny-imagenet-200 layout "
            "(val/images/*.JPEG labelled by val/val_annotations.txt)."
        )
    kept = []
    chosen = set(wnids)
    for number, line in enumerate(tree.read_lines(annotations), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(
                f"'{tree.where(annotations)}' line {number} is not 'file<TAB>wnid<TAB>box...': {line!r}."
            )
        if fields[1] in chosen:
            image = f"val/images/{fields[0]}"
            if not tree.exists(image):
                raise FileNotFoundError(
                    f"'{tree.where(image)}', listed in line {number} of {annotations}, is missing."
                )
            members[image] = image
            kept.append(line)
    members[annotations] = _text(kept)
    return members, train_images, len(kept)


def _text(lines: list[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def _write_zip(path: Path, tree: _Tree, members: dict[str, str | bytes], top: str) -> None:
    """The members under ``top``: sorted, stored, fixed date and mode, so the same bytes every time."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for relative in sorted(members):
            content = members[relative]
            data = content if isinstance(content, bytes) else tree.read_bytes(content)
            info = zipfile.ZipInfo(top + relative, date_time=_ZIP_EPOCH)
            info.create_system = _UNIX
            info.external_attr = _FILE_MODE << 16
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, data)


def _write_atomically(path: Path, write: Callable[[Path], object]) -> str:
    """Calls ``write(temporary path)`` for a file beside ``path``, then renames it to ``path``; its sha256.

    A failed or interrupted write leaves ``path`` as it was (absent, or the previous file).
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp makes it private
        sha256 = sha256_of(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return sha256


def _parse_classes(value: str) -> int | list[str]:
    value = value.strip()
    if value.isdigit():
        return int(value)
    wnids = [wnid.strip() for wnid in value.split(",") if wnid.strip()]
    if not wnids:
        raise argparse.ArgumentTypeError(f"expected K or comma-separated class ids, got {value!r}")
    return wnids


def main(argv: list[str]) -> None:
    """The ``lightning-dimat data`` command: builds a subset and prints one summary line.

    ``lightning-dimat data tiny-imagenet SOURCE [--classes K | --classes WNID,WNID,...] [--output ZIP]
    [--expected-sha256 HEX] [--overwrite]``; the default output is ``data/tiny-imagenet-<K>.zip``.

    Example (needs the real archive, so not run as a doctest)::

        main(["tiny-imagenet", "tiny-imagenet-200.zip", "--classes", "20"])
        20 classes, 10000 train + 1000 val images -> data/tiny-imagenet-20.zip sha256 ... (source sha256 ...)
    """
    parser = argparse.ArgumentParser(prog="lightning-dimat data", description="Build a dataset subset.")
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    tiny = datasets.add_parser(
        "tiny-imagenet",
        help="a K-class Tiny ImageNet zip in the original layout",
        description=(
            "Writes the first K classes of SOURCE's wnids.txt (or the class ids given) to a reproducible "
            "zip in the original layout under tiny-imagenet-<K>/, and its sha256 to <output>.sha256."
        ),
    )
    tiny.add_argument(
        "source",
        type=Path,
        metavar="SOURCE",
        help=f"tiny-imagenet-200.zip ({DOWNLOAD_URL}), its folder or a subset",
    )
    tiny.add_argument(
        "--classes",
        type=_parse_classes,
        default=20,
        metavar="K|WNID,...",
        help="K (the first K ids of wnids.txt) or comma-separated class ids, kept in that order (default 20)",
    )
    tiny.add_argument(
        "--output", type=Path, metavar="ZIP", help="the zip to write (default data/tiny-imagenet-<K>.zip)"
    )
    tiny.add_argument("--expected-sha256", metavar="HEX", help="refuse a source zip with another sha256")
    tiny.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    args = parser.parse_args(argv)

    count = args.classes if isinstance(args.classes, int) else len(args.classes)
    output = args.output or Path("data") / f"tiny-imagenet-{count}.zip"
    try:
        info = build_tiny_imagenet_subset(
            args.source,
            output,
            args.classes,
            expected_sha256=args.expected_sha256,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"{tiny.prog}: error: {error}") from error
    print(info.summary())
