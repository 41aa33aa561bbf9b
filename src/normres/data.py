"""Datasets: fetch and verify the original files, prepare uint8 tensors, augment whole batches.

Three parts:

* **Preparation** (:func:`prepare_dataset`): the original files of CIFAR-10, MNIST or Fashion-MNIST
  are taken from ``root`` if already there and verified, else copied from a mirror folder (Debian's
  ``/usr/share/datasets`` is built in), else downloaded by torchvision with its integrity check.
  Every file is md5-checked against the lists below (torchvision's, plus the md5 of the decompressed
  idx files, since Debian recompressed its .gz files). torchvision's dataset classes then parse the
  files, and the images are saved once as uint8 ``(N, C, H, W)`` tensors (``data.pt``, see
  ``docs/architecture.md``).
* **Loading and splitting** (:func:`load_prepared`, :func:`split_indices`, :func:`batches`).
* **Augmentation on batches** in the airbench style: uint8 batches on the training device, one seeded
  ``torch.Generator``, tensor ops only (no PIL, no per-sample loops, no DataLoader workers).
  Random numbers are drawn on the generator's device and moved to the batch's device, so a CPU
  generator gives the same draws whether the batch lives on the CPU or a GPU.

Also :func:`read_pixel_csv` / :func:`write_pixel_csv` for images given as CSV rows of pixel values.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import logging
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from normres.io import save_torch

__all__ = [
    "AUGMENT_KEYS",
    "DATASETS",
    "DEFAULT_MIRRORS",
    "Augmentation",
    "DataError",
    "DatasetSpec",
    "PreparedData",
    "RawFile",
    "adjust_brightness_contrast",
    "augment",
    "batches",
    "color_jitter",
    "get_dataset",
    "load_prepared",
    "normalize",
    "prepare_dataset",
    "random_crop_flip",
    "random_rotation",
    "read_pixel_csv",
    "rotate",
    "split_indices",
    "write_pixel_csv",
]

_log = logging.getLogger(__name__)

# Folders searched for original files after the ones the caller names (config key `data.mirrors`).
# Debian's `dataset-fashion-mnist` package installs /usr/share/datasets/fashion-mnist/*.gz.
DEFAULT_MIRRORS: tuple[Path, ...] = (Path("/usr/share/datasets"),)

_CHUNK = 1 << 20


class DataError(ValueError):
    """A dataset file is missing, corrupt or not what was expected (the message names it)."""


# ---------------------------------------------------------------------------------------------
# Dataset specifications


@dataclass(frozen=True)
class RawFile:
    """One original file as torchvision stores it under ``root/<DatasetSpec.raw_dir>/``.

    ``md5`` is the checksum of the file as stored there (for idx files: decompressed);
    ``gz_md5`` that of the ``.gz`` that torchvision downloads (None where it downloads no .gz).
    """

    name: str
    md5: str
    gz_md5: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about one dataset."""

    name: str
    torchvision_class: str | type  # a torchvision.datasets class (or its name); parses the files
    channels: int
    height: int
    width: int
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of pixel/255 over the training set (input normalisation)
    std: tuple[float, ...]
    raw_dir: str  # where torchvision expects the files, relative to its root
    files: tuple[RawFile, ...]
    archive: RawFile | None = None  # a .tar.gz holding `raw_dir/<file>` for every file (CIFAR-10)
    mirror_dirs: tuple[str, ...] = ("",)  # subfolders of a mirror folder to look in ("" = itself)

    def __post_init__(self) -> None:
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({self.channels})")

    def dataset_class(self) -> type:
        """The torchvision dataset class, imported on use: ``torchvision.datasets`` pulls in
        ``torch._dynamo`` (~3 s), which training jobs never need."""
        if isinstance(self.torchvision_class, type):
            return self.torchvision_class
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_class)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.channels, self.height, self.width)


def _idx_files(md5s: Mapping[str, tuple[str, str]]) -> tuple[RawFile, ...]:
    return tuple(RawFile(name, md5, gz_md5) for name, (md5, gz_md5) in md5s.items())


# md5 of the decompressed idx files, then torchvision's md5 of the original .gz (mnist.py `resources`).
_MNIST_MD5 = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c"),
}
_FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", "bb300cfdad3c16e7a12a480ee83cd310"),
}
# torchvision cifar.py: train_list, test_list, meta, tgz_md5.
_CIFAR10_FILES = (
    RawFile("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    RawFile("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    RawFile("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    RawFile("data_batch_4", "634d18415352ddfa80567beed471001a"),
    RawFile("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    RawFile("test_batch", "40351d587109b95175f43aff81a1287e"),
    RawFile("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
)

DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        torchvision_class="CIFAR10",
        channels=3,
        height=32,
        width=32,
        num_classes=10,
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),  # of all training pixels (not the often-copied 0.2023, 0.1994, 0.2010)
        raw_dir="cifar-10-batches-py",
        files=_CIFAR10_FILES,
        archive=RawFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        mirror_dirs=("", "cifar-10-batches-py", "cifar10", "cifar-10", "CIFAR10", "cifar10/cifar-10-batches-py"),
    ),
    "mnist": DatasetSpec(
        name="mnist",
        torchvision_class="MNIST",
        channels=1,
        height=28,
        width=28,
        num_classes=10,
        classes=("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),  # torchvision says "0 - zero", ...
        mean=(0.1307,),
        std=(0.3081,),
        raw_dir="MNIST/raw",
        files=_idx_files(_MNIST_MD5),
        mirror_dirs=("", "mnist", "MNIST", "MNIST/raw"),
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        torchvision_class="FashionMNIST",
        channels=1,
        height=28,
        width=28,
        num_classes=10,
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        mean=(0.2860,),
        std=(0.3530,),
        raw_dir="FashionMNIST/raw",
        files=_idx_files(_FASHION_MNIST_MD5),
        mirror_dirs=("", "fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw"),
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """The spec called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r} (choose from: {', '.join(sorted(DATASETS))})") from None


# ---------------------------------------------------------------------------------------------
# Fetching and verifying the original files


@dataclass
class _Staging:
    """Verified copies waiting beside their destination; moved into place only when all are ready."""

    ready: dict[Path, Path] = field(default_factory=dict)  # destination -> temp file
    created_dirs: list[Path] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)  # temp files to remove in any case

    def makedirs(self, path: Path) -> None:
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            d.mkdir()
            self.created_dirs.append(d)

    def commit(self) -> None:
        for dest, tmp in self.ready.items():
            os.replace(tmp, dest)
        self.ready.clear()
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        for tmp in self.scratch:
            tmp.unlink(missing_ok=True)
        self.scratch.clear()

    def abort(self) -> None:
        for tmp in self.ready.values():
            tmp.unlink(missing_ok=True)
        self.ready.clear()
        self._remove_scratch()
        for d in reversed(self.created_dirs):  # deepest first; keep any the caller filled meanwhile
            try:
                d.rmdir()
            except OSError:
                pass


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _temp_file(dest_dir: Path, name: str) -> tuple[int, str]:
    """A new hidden temp file beside its destination, with the permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")  # mode 0600
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def _copy_hashing(src: IO[bytes], dest_dir: Path, name: str) -> tuple[Path, str]:
    """Stream ``src`` into a new temp file in ``dest_dir``; returns (temp path, md5 of the bytes)."""
    h = hashlib.md5(usedforsecurity=False)
    fd, tmp = _temp_file(dest_dir, name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), h.hexdigest()


class _Mismatch(Exception):
    """A candidate copy exists but is not the expected file (message: what and why)."""


class _Search:
    """Looks for verified copies of a dataset's files in mirror folders."""

    def __init__(self, spec: DatasetSpec, dest_dir: Path, staging: _Staging, log: Callable[[str], None]) -> None:
        self.spec = spec
        self.log = log
        self.dest_dir = dest_dir
        self.staging = staging
        self.archives: dict[Path, dict[str, tuple[Path, str]] | str] = {}  # unpacked files, or the problem
        self.problems: dict[str, list[str]] = {}  # file name -> rejected candidates

    def folders(self, mirror: Path) -> list[Path]:
        out = []
        for sub in self.spec.mirror_dirs:
            d = mirror / sub if sub else mirror
            if d.is_dir() and d not in out:
                out.append(d)
        return out

    def find(self, file: RawFile, mirrors: Sequence[Path]) -> Path | None:
        """Stage a verified copy of ``file`` from the mirrors; None if none has one.

        Mirrors are tried in order, single files (plain, then .gz) before archives.
        """
        candidates = [c for m in mirrors for folder in self.folders(m) for c in self._candidates(file, folder)]
        candidates.sort(key=lambda c: c[1] == "archive")  # stable sort
        for source, kind in dict.fromkeys(candidates):  # nested mirror folders can overlap
            try:
                tmp = self._stage(file, source, kind)
            except _Mismatch as e:
                self.log(f"skipping {e}")
                self.problems.setdefault(file.name, []).append(str(e))
                continue
            self.staging.ready[self.dest_dir / file.name] = tmp
            return source
        return None

    def _candidates(self, file: RawFile, folder: Path) -> Iterator[tuple[Path, str]]:
        if (folder / file.name).is_file():
            yield folder / file.name, "plain"
        if (folder / f"{file.name}.gz").is_file():
            yield folder / f"{file.name}.gz", "gzip"
        if self.spec.archive is not None and (folder / self.spec.archive.name).is_file():
            yield folder / self.spec.archive.name, "archive"

    def _stage(self, file: RawFile, source: Path, kind: str) -> Path:
        if kind == "plain":
            with open(source, "rb") as f:
                tmp, got = _copy_hashing(f, self.dest_dir, file.name)
            return self._check(tmp, got, file, f"{source}: md5 {got}, expected {file.md5}")
        if kind == "gzip":
            try:
                with gzip.open(source, "rb") as f:
                    tmp, got = _copy_hashing(f, self.dest_dir, file.name)
            except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or not gzip at all
                raise _Mismatch(f"{source}: not a complete gzip file ({e})") from None
            expected = f"expected decompressed md5 {file.md5}"
            if file.gz_md5:
                expected += f" (the original .gz has md5 {file.gz_md5}, this one {_md5_file(source)})"
            return self._check(tmp, got, file, f"{source}: decompressed md5 {got}, {expected}")
        return self._stage_from_archive(file, source)

    def _stage_from_archive(self, file: RawFile, archive: Path) -> Path:
        if archive not in self.archives:
            self.archives[archive] = self._unpack(archive)
        unpacked = self.archives[archive]
        if isinstance(unpacked, str):
            raise _Mismatch(unpacked)
        member = f"{self.spec.raw_dir}/{file.name}"
        if file.name not in unpacked:
            raise _Mismatch(f"{archive}: has no file {member}")
        tmp, got = unpacked.pop(file.name)
        return self._check(tmp, got, file, f"{archive}!{member}: md5 {got}, expected {file.md5}")

    def _unpack(self, archive: Path) -> dict[str, tuple[Path, str]] | str:
        """Verify the archive, then copy out all of the spec's files in one pass (or say what is wrong)."""
        assert self.spec.archive is not None
        if (got := _md5_file(archive)) != self.spec.archive.md5:
            return f"{archive}: md5 {got}, expected {self.spec.archive.md5} (truncated or corrupt archive?)"
        wanted = {f"{self.spec.raw_dir}/{f.name}": f.name for f in self.spec.files}
        unpacked: dict[str, tuple[Path, str]] = {}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for info in tar:  # streams: the .tar.gz is decompressed once
                    name = wanted.get(info.name)
                    src = tar.extractfile(info) if name and info.isfile() else None
                    if src is not None:
                        with src:
                            tmp, md5 = _copy_hashing(src, self.dest_dir, name)
                        self.staging.scratch.append(tmp)
                        unpacked[name] = (tmp, md5)
        except (tarfile.TarError, OSError, EOFError) as e:
            return f"{archive}: cannot be read ({e})"
        return unpacked

    @staticmethod
    def _check(tmp: Path, got: str, file: RawFile, problem: str) -> Path:
        if got != file.md5:
            tmp.unlink(missing_ok=True)
            raise _Mismatch(problem)
        return tmp


def _describe_mirrors(spec: DatasetSpec, mirrors: Sequence[Path]) -> str:
    subs = ", ".join(s for s in spec.mirror_dirs if s)
    lines = [f"  {m}{'' if m.is_dir() else '  (does not exist)'}" for m in mirrors] or ["  (none)"]
    return "\n".join(lines) + f"\n(each folder itself and its subfolders {subs})"


def _fetch_originals(
    spec: DatasetSpec, root: Path, mirrors: Sequence[Path], download: bool, log: Callable[[str], None]
) -> None:
    """Make ``root/spec.raw_dir/`` hold every file of ``spec`` with the right md5, or raise DataError."""
    dest_dir = root / spec.raw_dir
    missing = []
    for file in spec.files:
        path = dest_dir / file.name
        if path.is_file() and _md5_file(path) == file.md5:
            continue
        if path.exists():
            log(f"{path} does not match its md5 {file.md5}; fetching it again")
        missing.append(file)
    if not missing:
        log(f"{spec.name}: original files present and verified in {dest_dir}")
        return

    staging = _Staging()
    try:
        staging.makedirs(dest_dir)
        search = _Search(spec, dest_dir, staging, log)
        not_found = []
        for file in missing:
            source = search.find(file, mirrors)
            if source is not None:
                log(f"{spec.name}: {file.name} <- {source} (md5 verified)")
            else:
                not_found.append(file)
        if rejected := [p for f in not_found for p in search.problems.get(f.name, [])]:
            # A mirror holding a wrong copy is an error, not a reason to download: it should be noticed.
            raise DataError(
                f"{spec.name}: no mirror holds a correct copy of "
                f"{', '.join(f.name for f in not_found)}; rejected:\n  " + "\n  ".join(rejected)
            )
        if not_found:
            _download(spec, root, not_found, search, mirrors, download, log)
        staging.commit()
    except BaseException:
        staging.abort()
        raise


def _download(
    spec: DatasetSpec,
    root: Path,
    not_found: list[RawFile],
    search: _Search,
    mirrors: Sequence[Path],
    download: bool,
    log: Callable[[str], None],
) -> None:
    """Download with torchvision into a temp folder in ``root``, then stage from it like a mirror."""
    names = ", ".join(f.name for f in not_found)
    help_text = (
        f"Searched these mirror folders:\n{_describe_mirrors(spec, mirrors)}\n"
        f"Put the original files in one of them, or add a folder holding them to the config key "
        f"`data.mirrors` (command line: --mirror)."
    )
    if not download:
        raise DataError(f"{spec.name}: {names} not found and downloading is off.\n{help_text}")
    tmp_root = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
    try:
        log(f"{spec.name}: downloading {names} with torchvision.datasets.{spec.dataset_class().__name__}")
        try:
            spec.dataset_class()(str(tmp_root), train=True, download=True)
        except Exception as e:  # no network, HTTP errors, torchvision's own md5 check
            raise DataError(
                f"{spec.name}: {names} not found in any mirror, and downloading failed "
                f"({type(e).__name__}: {str(e).strip()}).\n{help_text}"
            ) from e
        still_missing = [f.name for f in not_found if search.find(f, [tmp_root]) is None]
        if still_missing:
            raise DataError(
                f"{spec.name}: torchvision's download did not provide verified {', '.join(still_missing)}"
                + "".join(f"\n  {p}" for f in still_missing for p in search.problems.get(f, []))
            )
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Preparing and loading the tensors


@dataclass
class PreparedData:
    """The contents of a prepared ``data.pt``."""

    name: str
    classes: list[str]
    train_x: Tensor  # (N, C, H, W) uint8
    train_y: Tensor  # (N,) int64
    test_x: Tensor  # (M, C, H, W) uint8
    test_y: Tensor  # (M,) int64

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _as_nchw(data: Any, spec: DatasetSpec, what: str) -> Tensor:
    x = torch.as_tensor(data)
    if x.ndim == 3:  # MNIST-like: (N, H, W)
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[-1] == spec.channels:  # CIFAR: numpy (N, H, W, C)
        x = x.permute(0, 3, 1, 2)
    x = x.contiguous()
    if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != spec.shape:
        raise DataError(f"{what}: expected uint8 images of shape (N, {', '.join(map(str, spec.shape))}), "
                        f"got {x.dtype} {tuple(x.shape)}")  # fmt: skip
    return x


def _as_labels(targets: Any, n: int, spec: DatasetSpec, what: str) -> Tensor:
    y = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
    if len(y) != n:
        raise DataError(f"{what}: {len(y)} labels for {n} images")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise DataError(f"{what}: labels outside 0..{spec.num_classes - 1}")
    return y


def prepare_dataset(
    name: str,
    root: str | Path,
    out: str | Path,
    mirrors: Sequence[str | Path] | None = (),
    download: bool = True,
    log: Callable[[str], None] = _log.info,
) -> Path:
    """Fetch, verify and convert dataset ``name``; write the tensors to ``out`` and return it.

    Original files end up in ``root/<torchvision layout>`` (e.g. ``root/FashionMNIST/raw/``),
    taken from there if present and verified, else from ``mirrors`` then :data:`DEFAULT_MIRRORS`
    (plain or ``.gz`` idx files; CIFAR-10's batch files or its ``cifar-10-python.tar.gz``), else
    downloaded by torchvision when ``download``. Nothing unverified is left in ``root``.
    Raises :class:`DataError` naming the file and the expected checksum when a copy is wrong, and
    listing the folders searched when no copy is found. Progress goes to ``log``.
    """
    spec = get_dataset(name)
    root, out = Path(root), Path(out)
    search = list(dict.fromkeys(Path(m).expanduser() for m in [*(mirrors or ()), *DEFAULT_MIRRORS]))
    _fetch_originals(spec, root, search, download, log)

    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = spec.dataset_class()(str(root), train=train, download=False)
        except Exception as e:
            raise DataError(f"{spec.name}: torchvision cannot read {root / spec.raw_dir} ({e})") from e
        what = f"{spec.name} {split} split in {root / spec.raw_dir}"
        x = _as_nchw(ds.data, spec, what)  # (N, C, H, W) uint8
        splits[f"{split}_x"] = x
        splits[f"{split}_y"] = _as_labels(ds.targets, len(x), spec, what)
    save_torch({"name": spec.name, "classes": list(spec.classes), **splits}, out)
    log(f"{spec.name}: wrote {out} ({len(splits['train_x'])} train, {len(splits['test_x'])} test images)")
    return out


def load_prepared(path: str | Path) -> PreparedData:
    """Read a file written by :func:`prepare_dataset`; :class:`DataError` if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared dataset not found (run prepare_dataset / 'normres prepare')")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: not a readable prepared dataset ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict):
        raise DataError(f"{path}: expected a dict, got {type(blob).__name__}")
    keys = [f.name for f in fields(PreparedData)]
    if missing := [k for k in keys if k not in blob]:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
    if not isinstance(blob["name"], str):
        raise DataError(f"{path}: 'name' must be a str, got {type(blob['name']).__name__}")
    classes = blob["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'classes' must be a non-empty list of str")
    shape = None
    for split in ("train", "test"):
        x, y = blob[f"{split}_x"], blob[f"{split}_y"]
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
            raise DataError(f"{path}: '{split}_x' must be a uint8 tensor (N, C, H, W), got {_describe(x)}")
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (len(x),):
            raise DataError(f"{path}: '{split}_y' must be an int64 tensor ({len(x)},), got {_describe(y)}")
        if shape is not None and x.shape[1:] != shape:
            raise DataError(f"{path}: train images are {tuple(shape)}, test images {tuple(x.shape[1:])}")
        shape = x.shape[1:]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise DataError(f"{path}: '{split}_y' has labels outside 0..{len(classes) - 1}")
    return PreparedData(**{k: blob[k] for k in keys})


def _describe(v: Any) -> str:
    return f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


# ---------------------------------------------------------------------------------------------
# Splits and batches


def split_indices(n: int, val_size: int, seed: int, subset: int | None = None) -> tuple[Tensor, Tensor]:
    """Seeded train/validation split of ``range(n)``: returns (train indices, val indices), sorted.

    ``subset`` keeps only the first ``subset`` training indices of the seeded permutation (a random
    subset, for small demos); the validation indices do not depend on it.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    if subset is not None and not 1 <= subset <= n - val_size:
        raise ValueError(f"subset must be in [1, {n - val_size}] (training images left), got {subset}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train = perm[val_size:] if subset is None else perm[val_size : val_size + subset]
    return train.sort().values, perm[:val_size].sort().values


def batches(
    n: int,
    batch_size: int,
    generator: torch.Generator | None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[Tensor]:
    """Index tensors covering ``range(n)`` in batches (on the generator's device when shuffling)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if shuffle:
        device = generator.device if generator is not None else None
        order = torch.randperm(n, generator=generator, device=device)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


# ---------------------------------------------------------------------------------------------
# Augmentation on whole batches


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` uniform [0, 1) floats drawn on the generator's device, returned on ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gdev).to(device, non_blocking=True)


def _check_batch(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")


def _restore_dtype(y: Tensor, dtype: torch.dtype) -> Tensor:
    return y.round_().clamp_(0, 255).to(dtype) if dtype == torch.uint8 else y.to(dtype)


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator | None, flip: bool = True) -> Tensor:
    """Zero-pad by ``pad``, crop back to H x W at a random offset per image, mirror with p = 0.5.

    One ``gather`` on the padded batch does crop and flip together; dtype and shape are kept.
    """
    _check_batch(x)
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, c, h, w = x.shape
    dev = x.device
    if pad == 0 and not flip:
        return x.clone()
    hp, wp = h + 2 * pad, w + 2 * pad
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x  # (N, C, H+2p, W+2p)
    u = _rand(3 * n, generator, dev).view(3, n)
    top = (u[0] * (2 * pad + 1)).long().clamp_(max=2 * pad)  # (N,)
    left = (u[1] * (2 * pad + 1)).long().clamp_(max=2 * pad)
    rows = top[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)  # (N, W)
    if flip:
        cols = torch.where((u[2] < 0.5)[:, None], cols.flip(1), cols)
    cols = left[:, None] + cols
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w)  # (N, 1, H*W) into the padded image
    out = xp.reshape(n, c, hp * wp).gather(2, index.expand(n, c, h * w))
    return out.view(n, c, h, w)


def rotate(x: Tensor, angles: Tensor | float) -> Tensor:
    """Rotate each image counter-clockwise about its centre by ``angles`` degrees (bilinear, zero fill).

    Same convention as ``torchvision.transforms.v2.functional.rotate``; dtype is kept (uint8 rounds).
    """
    _check_batch(x)
    n, c, h, w = x.shape
    xf = x if x.is_floating_point() else x.float()
    a = torch.as_tensor(angles, dtype=xf.dtype, device=x.device).expand(n) * (math.pi / 180)
    cos, sin = a.cos(), a.sin()
    zero = torch.zeros_like(a)
    # affine_grid maps output to input positions in [-1, 1] coordinates; the H/W factors keep
    # non-square images from shearing.
    theta = torch.stack([cos, -sin * (h / w), zero, sin * (w / h), cos, zero], 1).view(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)  # (N, H, W, 2)
    y = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _restore_dtype(y, x.dtype)


def random_rotation(x: Tensor, degrees: float, generator: torch.Generator | None) -> Tensor:
    """Rotate each image by an angle drawn uniformly from [-degrees, degrees]."""
    if degrees < 0:
        raise ValueError(f"degrees must be >= 0, got {degrees}")
    angles = (_rand(len(x), generator, x.device) * 2 - 1) * degrees
    return rotate(x, angles)


def adjust_brightness_contrast(x: Tensor, brightness: Tensor | float, contrast: Tensor | float) -> Tensor:
    """torchvision's ``adjust_brightness`` then ``adjust_contrast`` with per-image factors.

    Brightness multiplies; contrast blends with the mean of the image's grayscale version
    (0.2989 R + 0.587 G + 0.114 B). Floats are taken to lie in [0, 1] and clamped there; uint8 in 0..255.
    """
    _check_batch(x)
    n, c = x.shape[:2]
    if c not in (1, 3):
        raise ValueError(f"colour jitter needs 1 or 3 channels, got {c}")
    xf = x.float().div(255) if x.dtype == torch.uint8 else x
    b = torch.as_tensor(brightness, dtype=xf.dtype, device=x.device).expand(n).view(n, 1, 1, 1)
    k = torch.as_tensor(contrast, dtype=xf.dtype, device=x.device).expand(n).view(n, 1, 1, 1)
    y = (xf * b).clamp_(0, 1)
    gray = y if c == 1 else (0.2989 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3])  # (N, 1, H, W)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    y = (k * y + (1 - k) * mean).clamp_(0, 1)
    return _restore_dtype(y * 255, x.dtype) if x.dtype == torch.uint8 else y.to(x.dtype)


def color_jitter(x: Tensor, brightness: float, contrast: float, generator: torch.Generator | None) -> Tensor:
    """Per-image factors uniform in [1 - brightness, 1 + brightness] and [1 - contrast, 1 + contrast]."""
    for label, v in (("brightness", brightness), ("contrast", contrast)):
        if not 0 <= v <= 1:
            raise ValueError(f"{label} must be in [0, 1], got {v}")
    u = _rand(2 * len(x), generator, x.device).view(2, len(x)) * 2 - 1
    return adjust_brightness_contrast(x, 1 + u[0] * brightness, 1 + u[1] * contrast)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel for uint8 ``x``; a float ``x`` is taken to be x / 255."""
    _check_batch(x)
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {x.shape[1]} channels")
    unit = 255.0 if x.dtype == torch.uint8 else 1.0
    scale = tuple(1.0 / (unit * sd) for sd in std)
    shift = tuple(-mu / sd for mu, sd in zip(mean, std))
    params = _affine_params(scale, shift, x.device)
    return torch.addcmul(params[1], x.float(), params[0])  # one pass; never writes into x


@functools.lru_cache(maxsize=16)
def _affine_params(scale: tuple[float, ...], shift: tuple[float, ...], device: torch.device) -> Tensor:
    """(2, 1, C, 1, 1) per-channel scale and shift on ``device``, built once: on a GPU a new
    host-to-device copy for every batch would be wasted work on the training path. Made outside
    inference mode, since evaluation may be the first to ask and training uses it after."""
    with torch.inference_mode(False):
        return torch.tensor([scale, shift], dtype=torch.float32).view(2, 1, -1, 1, 1).to(device)


AUGMENT_KEYS = ("crop_pad", "flip", "rotation", "brightness", "contrast")


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation plus input normalisation; all off by default."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pad: int = 0
    flip: bool = False
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, int) or self.crop_pad < 0:
            raise ValueError(f"crop_pad must be an integer >= 0, got {self.crop_pad!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be true or false, got {self.flip!r}")
        if not 0 <= self.rotation <= 180:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {self.rotation!r}")
        for label in ("brightness", "contrast"):
            if not 0 <= getattr(self, label) <= 1:
                raise ValueError(f"{label} must be in [0, 1], got {getattr(self, label)!r}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values, std {len(self.std)}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], dataset: DatasetSpec | None = None) -> Augmentation:
        """Build from a config mapping (keys :data:`AUGMENT_KEYS`, plus ``mean``/``std`` if no dataset)."""
        valid = AUGMENT_KEYS + ("mean", "std")
        if unknown := sorted(set(options) - set(valid)):
            raise ValueError(f"unknown augmentation option(s) {', '.join(unknown)} (choose from: {', '.join(valid)})")
        stats = {"mean": dataset.mean, "std": dataset.std} if dataset is not None else {}
        stats.update({k: tuple(options[k]) for k in ("mean", "std") if k in options})
        if len(stats) < 2:
            raise ValueError("augmentation needs mean and std (give a dataset or both keys)")
        return cls(**stats, **{k: options[k] for k in AUGMENT_KEYS if k in options})

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Augmented, normalised float32 batch from a uint8 (or [0, 1] float) batch (N, C, H, W)."""
        if self.crop_pad or self.flip:
            x = random_crop_flip(x, self.crop_pad, generator, flip=self.flip)  # still uint8: cheaper
        if self.rotation or self.brightness or self.contrast:
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()  # (N, C, H, W) in [0, 1]
            if self.rotation:
                x = random_rotation(x, self.rotation, generator)
            if self.brightness or self.contrast:
                x = color_jitter(x, self.brightness, self.contrast, generator)
        return normalize(x, self.mean, self.std)


def augment(
    x: Tensor,
    options: Mapping[str, Any] | Augmentation,
    dataset: DatasetSpec | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Augment and normalise a uint8 batch per ``options`` (see :class:`Augmentation`); float32 out."""
    aug = options if isinstance(options, Augmentation) else Augmentation.from_options(options, dataset)
    return aug(x, generator)


# ---------------------------------------------------------------------------------------------
# Images as CSV rows of pixel values


def read_pixel_csv(path: str | Path, spec: DatasetSpec) -> Tensor:
    """Images from a CSV file, one per row, C*H*W integers 0-255 in CHW order; uint8 (N, C, H, W).

    A first row that is not all numbers is a header. :class:`DataError` names the line of any bad row.
    """
    path = Path(path)
    n_values = spec.channels * spec.height * spec.width
    shape_text = " x ".join(map(str, spec.shape))
    rows: list[list[int]] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            try:
                values = [int(cell) for cell in row]
            except ValueError:
                if not rows and line == 1:
                    if len(row) != n_values:
                        raise DataError(f"{path}, line 1 (header): expected {n_values} columns, "
                                        f"got {len(row)}") from None  # fmt: skip
                    continue
                bad = next(cell for cell in row if not _is_int(cell))
                col = row.index(bad) + 1
                raise DataError(f"{path}, line {line}, column {col}: {bad!r} is not an integer 0-255") from None
            if len(values) != n_values:
                raise DataError(
                    f"{path}, line {line}: expected {n_values} values ({spec.name}: {shape_text}), got {len(values)}"
                )
            if (lo := min(values)) < 0 or (hi := max(values)) > 255:
                col = values.index(lo if lo < 0 else hi) + 1
                raise DataError(f"{path}, line {line}, column {col}: {lo if lo < 0 else hi} is outside 0-255")
            rows.append(values)
    if not rows:
        raise DataError(f"{path}: no image rows")
    return torch.tensor(rows, dtype=torch.uint8).view(len(rows), *spec.shape)


def _is_int(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return True


def write_pixel_csv(path: str | Path, x: Tensor) -> Path:
    """Write a uint8 batch (N, C, H, W) as CSV rows with a header ``p0,p1,...`` (see read_pixel_csv)."""
    _check_batch(x)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    path = Path(path)
    flat = x.reshape(len(x), -1).tolist()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"p{i}" for i in range(x[0].numel() if len(x) else 0)])
        writer.writerows(flat)
    return path
