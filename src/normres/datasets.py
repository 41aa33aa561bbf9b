"""Datasets: fetch and verify the original files, prepare uint8 tensors, split and batch them.

* **Preparation** (:func:`prepare_dataset`): the original files of a registry dataset are taken from
  ``root`` if already there and verified, else copied from a mirror folder (Debian's
  ``/usr/share/datasets`` is built in), else downloaded by torchvision with its integrity check.
  The checksums are torchvision's own (its dataset classes' tables), plus the md5 of the decompressed
  idx files (:attr:`normres.registry.DatasetDef.idx_md5`), since Debian recompressed its .gz files
  and torchvision can only verify the originals. Verified copies are staged beside their destination
  and moved into place only when all are there (what torchvision does not do: mirrors, recompressed
  .gz, atomic staging). torchvision's dataset classes then parse the files, and the images are saved
  once as uint8 ``(N, C, H, W)`` tensors (``data.pt``, see ``docs/architecture.md``).
* **Loading, splitting and batching** (:func:`load_prepared`, :func:`split_indices`, :func:`batches`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from normres import registry as R
from normres.errors import DataError
from normres.io import save_torch

__all__ = [
    "DEFAULT_MIRRORS",
    "DataError",
    "DatasetFiles",
    "PreparedData",
    "RawFile",
    "batches",
    "dataset_files",
    "load_prepared",
    "prepare_dataset",
    "split_indices",
]

_log = logging.getLogger(__name__)

# Folders searched for original files after the ones the caller names (config key `data.mirrors`).
# Debian's `dataset-fashion-mnist` package installs /usr/share/datasets/fashion-mnist/*.gz.
DEFAULT_MIRRORS: tuple[Path, ...] = (Path("/usr/share/datasets"),)

_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# The files of a dataset, from torchvision's checksum tables


@dataclass(frozen=True)
class RawFile:
    """One original file as torchvision stores it under ``root/<raw_dir>/``.

    ``md5`` is the checksum of the file as stored there (for idx files: decompressed);
    ``gz_md5`` that of the ``.gz`` that torchvision downloads (None where it downloads no .gz).
    """

    name: str
    md5: str
    gz_md5: str | None = None


@dataclass(frozen=True)
class DatasetFiles:
    """A registry dataset with the files torchvision keeps for it."""

    dataset: R.DatasetDef
    files: tuple[RawFile, ...]
    archive: RawFile | None = None  # a .tar.gz holding `raw_dir/<file>` for every file (CIFAR-10)
    parser: type | None = None  # the torchvision class, if not the registry's (tests: tiny files)

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def raw_dir(self) -> str:
        return self.dataset.raw_dir

    @property
    def mirror_dirs(self) -> tuple[str, ...]:
        return self.dataset.mirror_dirs

    @property
    def torchvision_class(self) -> type:
        """The torchvision dataset class, imported on use: ``torchvision.datasets`` pulls in
        ``torch._dynamo`` (~3 s), which training jobs never need."""
        if self.parser is not None:
            return self.parser
        import torchvision.datasets

        return getattr(torchvision.datasets, self.dataset.torchvision_class)


def dataset_files(name: str) -> DatasetFiles:
    """The files of dataset ``name`` and their md5s, read from its torchvision class's tables:
    ``resources`` (MNIST-like: the .gz files) or ``train_list``/``test_list``/``meta``/``tgz_md5``
    (CIFAR)."""
    dataset = R.get_dataset(name)
    cls = DatasetFiles(dataset, ()).torchvision_class
    if hasattr(cls, "resources"):  # MNIST, FashionMNIST: .gz downloads, stored decompressed
        files = []
        for url, gz_md5 in cls.resources:
            raw = Path(url).name.removesuffix(".gz")
            files.append(RawFile(raw, dataset.idx_md5[raw], gz_md5))
        return DatasetFiles(dataset, tuple(files))
    lists = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]  # CIFAR
    return DatasetFiles(dataset, tuple(RawFile(n, md5) for n, md5 in lists), RawFile(cls.filename, cls.tgz_md5))


# ---------------------------------------------------------------------------------------------
# Fetching and verifying the original files


@functools.cache
def _tv() -> Any:
    """torchvision.datasets.utils (calculate_md5, check_integrity, extract_archive), imported only
    when a dataset is prepared: it imports all of torchvision, which training jobs never need."""
    from torchvision.datasets import utils

    return utils


@dataclass
class _Staging:
    """Verified copies waiting beside their destination; moved into place only when all are ready."""

    ready: dict[Path, Path] = field(default_factory=dict)  # destination -> temp file
    created_dirs: list[Path] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)  # temp files and folders to remove in any case

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
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
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

    def __init__(self, spec: DatasetFiles, dest_dir: Path, staging: _Staging, log: Callable[[str], None]) -> None:
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
                expected += f" (the original .gz has md5 {file.gz_md5}, this one {_tv().calculate_md5(source)})"
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
        """Verify the archive, then extract it into a scratch folder beside the destination (or say
        what is wrong); returns the spec's files found there with their md5."""
        assert self.spec.archive is not None
        if not _tv().check_integrity(str(archive), self.spec.archive.md5):
            return f"{archive}: md5 {_tv().calculate_md5(archive)}, expected {self.spec.archive.md5} (truncated or corrupt archive?)"
        scratch = Path(tempfile.mkdtemp(dir=self.dest_dir, prefix=".unpack-"))
        self.staging.scratch.append(scratch)
        try:
            _tv().extract_archive(str(archive), str(scratch))
        except (tarfile.TarError, OSError, EOFError, RuntimeError) as e:
            return f"{archive}: cannot be read ({e})"
        found = {}
        for f in self.spec.files:
            path = scratch / self.spec.raw_dir / f.name
            if path.is_file():
                found[f.name] = (path, _tv().calculate_md5(path))
        return found

    @staticmethod
    def _check(tmp: Path, got: str, file: RawFile, problem: str) -> Path:
        if got != file.md5:
            tmp.unlink(missing_ok=True)
            raise _Mismatch(problem)
        return tmp


def _describe_mirrors(spec: DatasetFiles, mirrors: Sequence[Path]) -> str:
    subs = ", ".join(s for s in spec.mirror_dirs if s)
    lines = [f"  {m}{'' if m.is_dir() else '  (does not exist)'}" for m in mirrors] or ["  (none)"]
    return "\n".join(lines) + f"\n(each folder itself and its subfolders {subs})"


def _fetch_originals(
    spec: DatasetFiles, root: Path, mirrors: Sequence[Path], download: bool, log: Callable[[str], None]
) -> None:
    """Make ``root/spec.raw_dir/`` hold every file of ``spec`` with the right md5, or raise DataError."""
    dest_dir = root / spec.raw_dir
    missing = []
    for file in spec.files:
        path = dest_dir / file.name
        if path.is_file() and _tv().calculate_md5(path) == file.md5:
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
    spec: DatasetFiles,
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
        log(f"{spec.name}: downloading {names} with torchvision.datasets.{spec.torchvision_class.__name__}")
        try:
            spec.torchvision_class(str(tmp_root), train=True, download=True)
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


def _as_nchw(data: Any, spec: R.DatasetDef, what: str) -> Tensor:
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


def _as_labels(targets: Any, n: int, spec: R.DatasetDef, what: str) -> Tensor:
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
    spec = dataset_files(name)
    root, out = Path(root), Path(out)
    search = list(dict.fromkeys(Path(m).expanduser() for m in [*(mirrors or ()), *DEFAULT_MIRRORS]))
    _fetch_originals(spec, root, search, download, log)

    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = spec.torchvision_class(str(root), train=train, download=False)
        except Exception as e:
            raise DataError(f"{spec.name}: torchvision cannot read {root / spec.raw_dir} ({e})") from e
        what = f"{spec.name} {split} split in {root / spec.raw_dir}"
        x = _as_nchw(ds.data, spec.dataset, what)  # (N, C, H, W) uint8
        splits[f"{split}_x"] = x
        splits[f"{split}_y"] = _as_labels(ds.targets, len(x), spec.dataset, what)
    save_torch({"name": spec.name, "classes": list(spec.dataset.classes), **splits}, out)
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
# The data of one run


@dataclass
class RunData:
    """One run's splits on its device, with the input normalisation its settings ask for."""

    train_x: Tensor  # (N, C, H, W) uint8
    train_y: Tensor  # (N,) int64
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    dataset: R.DatasetDef
    mean: tuple[float, ...]
    std: tuple[float, ...]  # all 1 for input_norm "mean" (the earlier CIFAR study's inputs)

    def normalize(self, x: Tensor) -> Tensor:
        from normres.augment import normalize

        return normalize(x, self.mean, self.std)


def input_scaling(dataset: R.DatasetDef, input_norm: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the inputs: the dataset's, or its mean with std 1 (``mean``)."""
    if input_norm == "mean_std":
        return dataset.mean, dataset.std
    if input_norm == "mean":
        return dataset.mean, (1.0,) * dataset.channels
    raise ValueError(f"unknown input_norm {input_norm!r} (choose from: mean_std, mean)")


def load_run_data(data_path: str | Path, settings: Any, device: torch.device) -> RunData:
    """The prepared dataset split as the run's settings say, moved to ``device`` once."""
    prepared = load_prepared(Path(data_path))
    if prepared.name != settings.dataset:
        raise DataError(f"{data_path} holds dataset {prepared.name!r}, but the run asks for {settings.dataset!r}")
    train_idx, val_idx = split_indices(len(prepared.train_y), settings.val_size, settings.split_seed,
                                       subset=settings.train_subset)  # fmt: skip
    n_test = settings.test_subset or len(prepared.test_y)
    if n_test > len(prepared.test_y):
        raise DataError(
            f"test_subset {n_test} exceeds the {len(prepared.test_y)} test images of {prepared.name} ({data_path})"
        )
    dataset = R.get_dataset(settings.dataset)
    mean, std = input_scaling(dataset, settings.input_norm)
    return RunData(
        train_x=prepared.train_x[train_idx].to(device),
        train_y=prepared.train_y[train_idx].to(device),
        val_x=prepared.train_x[val_idx].to(device),
        val_y=prepared.train_y[val_idx].to(device),
        test_x=prepared.test_x[:n_test].to(device),
        test_y=prepared.test_y[:n_test].to(device),
        classes=list(prepared.classes),
        dataset=dataset,
        mean=mean,
        std=std,
    )
