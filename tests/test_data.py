"""normres.datasets (fetching/verifying original files, prepared tensors, splits), normres.augment
(batch augmentation) and normres.pixels (pixel CSVs).

The preparation tests build tiny files in the real formats (idx, CIFAR pickles, the .tar.gz) in
tmp_path and swap in file lists whose checksums match them; only the test marked slow reads the
real Fashion-MNIST from Debian's package.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from normres import augment as A
from normres import datasets as D
from normres import pixels as P
from normres import registry as R

# ---------------------------------------------------------------------------------------------
# Fixture helpers: tiny datasets in the original formats

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_bytes(arr: np.ndarray) -> bytes:
    """The idx format: 0, 0, type 0x08 (uint8), ndim, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def tiny_idx_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(20, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(10, dtype=np.uint8)[::-1].copy(),
    }


@pytest.fixture
def no_default_mirrors(monkeypatch):
    """Keep the real /usr/share/datasets out of the tests that use tiny specs."""
    monkeypatch.setattr(D, "DEFAULT_MIRRORS", ())


@pytest.fixture
def tiny_fashion(monkeypatch, no_default_mirrors):
    """Swap in a fashion_mnist spec whose checksums are those of tiny idx files; returns the files' bytes."""
    arrays = tiny_idx_arrays()
    raw = {name: idx_bytes(a) for name, a in arrays.items()}
    spec = D.DatasetFiles(
        R.DATASETS["fashion_mnist"],
        files=tuple(D.RawFile(n, md5(b), gz_md5=md5(gzip.compress(b, mtime=0))) for n, b in raw.items()),
    )
    _swap_files(monkeypatch, spec)
    return raw, arrays


def _swap_files(monkeypatch, spec: D.DatasetFiles) -> None:
    original = D.dataset_files
    monkeypatch.setattr(D, "dataset_files", lambda name: spec if name == spec.name else original(name))


def write_gz_mirror(folder: Path, raw: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, b in raw.items():
        # a different mtime than in the fixture: like Debian, the .gz differs, the contents do not
        (folder / f"{name}.gz").write_bytes(gzip.compress(b, mtime=12345))
    return folder


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_cifar_files(seed: int = 0) -> dict[str, bytes]:
    """Pickled batches as in cifar-10-python.tar.gz: rows of 3072 bytes, R then G then B planes."""
    rng = np.random.default_rng(seed)
    files = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = 4 if name != "test_batch" else 6
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [(i + j) % 10 for j in range(n)]}
        files[name] = pickle.dumps(batch)
    files["batches.meta"] = pickle.dumps({"label_names": CIFAR_CLASSES, "num_vis": 3072})
    return files


def cifar_tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, b in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    return buf.getvalue()


@pytest.fixture
def tiny_cifar(monkeypatch, no_default_mirrors):
    """Swap in a cifar10 spec (and torchvision class) whose checksums match tiny pickled batches."""
    files = tiny_cifar_files()
    archive = cifar_tar_gz(files)
    sums = {n: md5(b) for n, b in files.items()}

    class TinyCIFAR10(tvd.CIFAR10):  # torchvision re-checks its own md5 list when loading
        train_list = [[f"data_batch_{k}", sums[f"data_batch_{k}"]] for k in range(1, 6)]
        test_list = [["test_batch", sums["test_batch"]]]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": sums["batches.meta"]}

    spec = D.DatasetFiles(
        R.DATASETS["cifar10"],
        files=tuple(D.RawFile(n, s) for n, s in sums.items()),
        archive=D.RawFile("cifar-10-python.tar.gz", md5(archive)),
        parser=TinyCIFAR10,
    )
    _swap_files(monkeypatch, spec)
    return files, archive


# ---------------------------------------------------------------------------------------------
# Specs


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as e:
        R.get_dataset("cifar")
    assert str(e.value) == "unknown dataset 'cifar' (choose from: cifar10, mnist, fashion_mnist)"
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        D.prepare_dataset("cifar", Path("unused"), Path("unused.pt"))


def test_file_lists_are_torchvision_own():
    cifar = D.dataset_files("cifar10")
    tv = tvd.CIFAR10
    assert {(f.name, f.md5) for f in cifar.files} == {
        *map(tuple, tv.train_list),
        *map(tuple, tv.test_list),
        (tv.meta["filename"], tv.meta["md5"]),
    }
    assert (cifar.archive.name, cifar.archive.md5) == (tv.filename, tv.tgz_md5)
    assert cifar.raw_dir == tv.base_folder
    for name in ("mnist", "fashion_mnist"):
        spec = D.dataset_files(name)
        cls = spec.torchvision_class
        assert [(f"{f.name}.gz", f.gz_md5) for f in spec.files] == list(cls.resources)
        assert spec.raw_dir == f"{cls.__name__}/raw"
    assert list(R.DATASETS["fashion_mnist"].classes) == tvd.FashionMNIST.classes
    for spec in R.DATASETS.values():
        assert len(spec.mean) == len(spec.std) == spec.channels
        assert tvd.__dict__[spec.torchvision_class]  # the registry names a real torchvision class


# ---------------------------------------------------------------------------------------------
# Preparing from mirrors


def test_prepare_from_gz_mirror_round_trips(tmp_path, tiny_fashion):
    raw, arrays = tiny_fashion
    mirror = write_gz_mirror(tmp_path / "mirror" / "fashion-mnist", raw)  # Debian's layout
    root, out = tmp_path / "res" / "raw", tmp_path / "res" / "data.pt"

    assert D.prepare_dataset("fashion_mnist", root, out, mirrors=[tmp_path / "mirror"], download=False) == out

    for name, b in raw.items():  # decompressed into torchvision's layout
        assert (root / "FashionMNIST" / "raw" / name).read_bytes() == b
    assert [p.name for p in files_under(root)] == sorted(raw)  # no temp files left
    data = D.load_prepared(out)
    assert data.name == "fashion_mnist"
    assert data.classes == list(R.DATASETS["fashion_mnist"].classes)
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape == (20, 1, 28, 28)
    assert data.test_x.shape == (10, 1, 28, 28)
    assert data.train_y.dtype == torch.int64
    assert torch.equal(data.train_x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(data.test_y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())

    # second run: the verified files in root are used; the mirror is no longer needed
    for p in mirror.iterdir():
        p.unlink()
    out.unlink()
    D.prepare_dataset("fashion_mnist", root, out, mirrors=[tmp_path / "mirror"], download=False)
    assert torch.equal(D.load_prepared(out).train_x, data.train_x)


def test_prepare_from_plain_files_in_torchvision_layout(tmp_path, tiny_fashion):
    raw, _ = tiny_fashion
    folder = tmp_path / "mirror" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for name, b in raw.items():
        (folder / name).write_bytes(b)
    out = D.prepare_dataset("fashion_mnist", tmp_path / "root", tmp_path / "d.pt", mirrors=[tmp_path / "mirror"],
                            download=False)  # fmt: skip
    assert D.load_prepared(out).train_x.shape == (20, 1, 28, 28)


def test_wrong_contents_in_mirror_names_file_and_leaves_root_empty(tmp_path, tiny_fashion):
    raw, _ = tiny_fashion
    bad = dict(raw, **{"t10k-images-idx3-ubyte": idx_bytes(tiny_idx_arrays(seed=1)["t10k-images-idx3-ubyte"])})
    mirror = write_gz_mirror(tmp_path / "mirror", bad)
    root = tmp_path / "root"
    with pytest.raises(D.DataError) as e:
        D.prepare_dataset("fashion_mnist", root, tmp_path / "d.pt", mirrors=[mirror], download=False)
    msg = str(e.value)
    assert str(mirror / "t10k-images-idx3-ubyte.gz") in msg
    expected_md5 = md5(raw["t10k-images-idx3-ubyte"])
    assert f"expected decompressed md5 {expected_md5}" in msg
    assert md5(bad["t10k-images-idx3-ubyte"]) in msg  # what it got
    assert files_under(root) == [] and not root.exists()
    assert not (tmp_path / "d.pt").exists()


def test_truncated_gz_is_an_error(tmp_path, tiny_fashion):
    raw, _ = tiny_fashion
    mirror = write_gz_mirror(tmp_path / "mirror", raw)
    gz = mirror / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-100])
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(D.DataError, match="not a complete gzip file") as e:
        D.prepare_dataset("fashion_mnist", root, tmp_path / "d.pt", mirrors=[mirror], download=False)
    assert str(gz) in str(e.value)
    assert files_under(root) == [] and list(root.iterdir()) == []  # root was there before: kept, empty


def test_bad_copy_is_skipped_when_a_later_mirror_has_a_good_one(tmp_path, tiny_fashion):
    raw, _ = tiny_fashion
    broken = write_gz_mirror(tmp_path / "broken", raw)
    (broken / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    good = write_gz_mirror(tmp_path / "good", raw)
    root = tmp_path / "root"
    D.prepare_dataset("fashion_mnist", root, tmp_path / "d.pt", mirrors=[broken, good], download=False)
    assert (root / "FashionMNIST/raw/train-labels-idx1-ubyte").read_bytes() == raw["train-labels-idx1-ubyte"]


def test_corrupt_file_in_root_is_fetched_again(tmp_path, tiny_fashion):
    raw, _ = tiny_fashion
    mirror = write_gz_mirror(tmp_path / "mirror", raw)
    target = tmp_path / "root" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"garbage")
    D.prepare_dataset("fashion_mnist", tmp_path / "root", tmp_path / "d.pt", mirrors=[mirror], download=False)
    assert target.read_bytes() == raw["t10k-labels-idx1-ubyte"]


def test_missing_files_error_lists_searched_folders(tmp_path, tiny_fashion):
    empty = tmp_path / "empty"
    empty.mkdir()
    nowhere = tmp_path / "nowhere"
    root = tmp_path / "root"
    with pytest.raises(D.DataError) as e:
        D.prepare_dataset("fashion_mnist", root, tmp_path / "d.pt", mirrors=[empty, nowhere], download=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "downloading is off" in msg
    assert f"  {empty}\n" in msg and f"  {nowhere}  (does not exist)" in msg
    assert "data.mirrors" in msg
    assert files_under(root) == [] and not root.exists()


def test_failed_download_is_reported_with_the_mirrors(tmp_path, tiny_fashion, monkeypatch):
    tiny = D.dataset_files("fashion_mnist")
    class FashionMNIST(tvd.FashionMNIST):  # offline, as on this machine
        def download(self):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: Name or service not known")

    _swap_files(monkeypatch, dataclasses.replace(D.dataset_files("fashion_mnist"), parser=FashionMNIST))
    root = tmp_path / "root"
    with pytest.raises(D.DataError) as e:
        D.prepare_dataset("fashion_mnist", root, tmp_path / "d.pt", mirrors=[tmp_path / "m"], download=True)
    msg = str(e.value)
    assert "downloading failed" in msg and "Name or service not known" in msg
    assert str(tmp_path / "m") in msg and "data.mirrors" in msg
    assert files_under(root) == [] and not root.exists()  # the download folder is removed too


def test_download_uses_torchvision_and_verifies(tmp_path, tiny_fashion, monkeypatch):
    raw, arrays = tiny_fashion

    class FashionMNIST(tvd.FashionMNIST):  # stands in for the network (the name sets torchvision's folder)
        def download(self):
            folder = Path(self.raw_folder)
            folder.mkdir(parents=True, exist_ok=True)
            for name, b in raw.items():
                (folder / name).write_bytes(b)
                (folder / f"{name}.gz").write_bytes(gzip.compress(b))

    _swap_files(monkeypatch, dataclasses.replace(D.dataset_files("fashion_mnist"), parser=FashionMNIST))
    root = tmp_path / "root"
    out = D.prepare_dataset("fashion_mnist", root, tmp_path / "d.pt", download=True)
    assert torch.equal(D.load_prepared(out).test_x[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert [p.name for p in files_under(root)] == sorted(raw)  # only the verified files, no download folder


def test_cifar_from_extracted_batches_is_nchw(tmp_path, tiny_cifar):
    files, _ = tiny_cifar
    folder = tmp_path / "mirror" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, b in files.items():
        (folder / name).write_bytes(b)
    out = D.prepare_dataset("cifar10", tmp_path / "root", tmp_path / "d.pt", mirrors=[tmp_path / "mirror"],
                            download=False)  # fmt: skip
    data = D.load_prepared(out)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (6, 3, 32, 32)
    first = pickle.loads(files["data_batch_1"])
    # CIFAR rows are the R, G, B planes in turn: (3, 32, 32) is the same byte order
    assert torch.equal(data.train_x[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert data.train_y[:4].tolist() == first["labels"]
    assert data.classes == CIFAR_CLASSES


def test_cifar_from_archive(tmp_path, tiny_cifar):
    files, archive = tiny_cifar
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "cifar-10-python.tar.gz").write_bytes(archive)
    root = tmp_path / "root"
    D.prepare_dataset("cifar10", root, tmp_path / "d.pt", mirrors=[tmp_path / "mirror"], download=False)
    assert {p.name: p.read_bytes() for p in files_under(root)} == files
    assert all(p.parent == root / "cifar-10-batches-py" for p in files_under(root))


def test_truncated_cifar_archive_names_archive_and_md5(tmp_path, tiny_cifar):
    _, archive = tiny_cifar
    path = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    path.write_bytes(archive[: len(archive) // 2])
    root = tmp_path / "root"
    with pytest.raises(D.DataError) as e:
        D.prepare_dataset("cifar10", root, tmp_path / "d.pt", mirrors=[path.parent], download=False)
    assert str(path) in str(e.value) and f"expected {md5(archive)}" in str(e.value)
    assert files_under(root) == []


# ---------------------------------------------------------------------------------------------
# load_prepared


def _prepared_blob(**changes):
    blob = {
        "name": "mnist",
        "classes": [str(i) for i in range(10)],
        "train_x": torch.zeros(5, 1, 28, 28, dtype=torch.uint8),
        "train_y": torch.arange(5),
        "test_x": torch.zeros(3, 1, 28, 28, dtype=torch.uint8),
        "test_y": torch.arange(3),
    }
    blob.update(changes)
    return {k: v for k, v in blob.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"test_y": None}, "missing key(s) test_y"),
        ({"train_x": torch.zeros(5, 1, 28, 28)}, "'train_x' must be a uint8 tensor"),
        ({"train_y": torch.arange(5, dtype=torch.int32)}, "'train_y' must be an int64 tensor"),
        ({"test_y": torch.arange(4)}, "'test_y' must be an int64 tensor (3,)"),
        ({"test_x": torch.zeros(3, 1, 32, 32, dtype=torch.uint8)}, "train images are (1, 28, 28)"),
        ({"train_y": torch.tensor([0, 1, 2, 3, 10])}, "labels outside 0..9"),
    ],
)
def test_load_prepared_rejects_malformed(tmp_path, changes, problem):
    path = tmp_path / "data.pt"
    torch.save(_prepared_blob(**changes), path)
    with pytest.raises(D.DataError) as e:
        D.load_prepared(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_load_prepared_missing_and_corrupt(tmp_path):
    with pytest.raises(D.DataError, match="not found"):
        D.load_prepared(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save(_prepared_blob(), good)
    assert D.load_prepared(good).num_classes == 10
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(D.DataError, match="not a readable prepared dataset") as e:
        D.load_prepared(bad)
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Splits and batches


def test_split_is_seeded_disjoint_and_complete():
    train, val = D.split_indices(100, 20, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again = D.split_indices(100, 20, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, D.split_indices(100, 20, seed=4)[1])
    assert val.tolist() != list(range(20))  # shuffled, not the first images

    sub_train, sub_val = D.split_indices(100, 20, seed=3, subset=10)
    assert torch.equal(sub_val, val) and len(sub_train) == 10 and set(sub_train.tolist()) <= set(train.tolist())
    assert len(D.split_indices(10, 0, seed=0)[1]) == 0


@pytest.mark.parametrize(("n", "val_size", "subset"), [(10, 10, None), (10, -1, None), (10, 11, None), (10, 2, 9)])
def test_split_rejects_bad_sizes(n, val_size, subset):
    with pytest.raises(ValueError, match="val_size|subset"):
        D.split_indices(n, val_size, seed=0, subset=subset)


def test_batches_cover_every_index_once():
    g = torch.Generator().manual_seed(0)
    parts = list(D.batches(10, 4, g))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert torch.cat(parts).tolist() != list(range(10))
    assert [len(p) for p in D.batches(10, 4, g, drop_last=True)] == [4, 4]
    assert torch.cat(list(D.batches(10, 3, None, shuffle=False))).tolist() == list(range(10))
    a = torch.cat(list(D.batches(50, 8, torch.Generator().manual_seed(1))))
    b = torch.cat(list(D.batches(50, 8, torch.Generator().manual_seed(1))))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Augmentation


def images(n=16, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_flip_identity_and_determinism():
    x = images()
    assert torch.equal(A.random_crop_flip(x, 0, gen(), flip=False), x)
    a, b = A.random_crop_flip(x, 4, gen(1)), A.random_crop_flip(x, 4, gen(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, A.random_crop_flip(x, 4, gen(2)))
    xf = x.float() / 255
    assert torch.equal(A.random_crop_flip(xf, 4, gen(1)), a.float() / 255)  # same draws for float input


def test_flip_really_flips_about_half():
    x = images(64)
    y = A.random_crop_flip(x, 0, gen(), flip=True)
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54


def test_crop_is_a_window_of_the_zero_padded_image():
    x, pad = images(12, c=2, h=9, w=7), 2
    y = A.random_crop_flip(x, pad, gen(5), flip=True)
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx, f)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in (False, True)
            if torch.equal(
                y[i], (xp[i, :, dy : dy + 9, dx : dx + 7]).flip(2) if f else xp[i, :, dy : dy + 9, dx : dx + 7]
            )
        ]
        assert hits, f"image {i} is not a crop of its padded version"
        offsets.add(hits[0][:2])
    assert len({dy for dy, _ in offsets}) > 1 and len({dx for _, dx in offsets}) > 1  # drawn per image


def test_rotate_matches_torchvision_and_zero_is_identity():
    x = images(4, h=12, w=10).float() / 255
    for angle in (90.0, 30.0, -17.0):
        ref = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(A.rotate(x, angle), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(A.random_rotation(x, 0.0, gen()), x, atol=1e-6, rtol=0)
    u8 = images(4)
    assert torch.equal(A.random_rotation(u8, 0.0, gen()), u8)


def test_random_rotation_per_image_angles_and_determinism():
    x = images(8).float() / 255
    a = A.random_rotation(x, 30.0, gen(3))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, A.random_rotation(x, 30.0, gen(3)))
    angles = (torch.rand(8, generator=gen(3)) * 2 - 1) * 30  # the draw random_rotation makes
    torch.testing.assert_close(a, A.rotate(x, angles))
    assert A.random_rotation(images(8), 30.0, gen(3)).dtype == torch.uint8


def test_color_jitter_matches_torchvision():
    x = images(6).float() / 255
    bf = torch.tensor([0.5, 0.8, 1.0, 1.2, 1.5, 0.9])
    cf = torch.tensor([1.5, 0.7, 1.0, 0.5, 1.3, 1.1])
    ref = torch.stack([TF.adjust_contrast(TF.adjust_brightness(x[i], bf[i].item()), cf[i].item()) for i in range(6)])
    torch.testing.assert_close(A.adjust_brightness_contrast(x, bf, cf), ref, atol=1e-5, rtol=0)
    gray = images(3, c=1).float() / 255
    ref1 = torch.stack([TF.adjust_contrast(g, 0.6) for g in gray])
    torch.testing.assert_close(A.adjust_brightness_contrast(gray, 1.0, 0.6), ref1, atol=1e-5, rtol=0)


def test_color_jitter_zero_is_identity_and_range_is_kept():
    x = images(8).float() / 255
    assert torch.equal(A.color_jitter(x, 0.0, 0.0, gen()), x)
    y = A.color_jitter(x, 0.9, 0.9, gen(1))
    assert y.min() >= 0 and y.max() <= 1 and not torch.equal(y, x)
    assert torch.equal(y, A.color_jitter(x, 0.9, 0.9, gen(1)))
    u8 = A.color_jitter(images(8), 0.3, 0.3, gen(1))
    assert u8.dtype == torch.uint8


def test_normalize_and_float_input_untouched():
    x = images(4)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    expected = (x.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(
        1, 3, 1, 1
    )
    out = A.normalize(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    xf = x.float() / 255
    before = xf.clone()
    torch.testing.assert_close(A.normalize(xf, mean, std), out)
    assert torch.equal(xf, before)
    with pytest.raises(ValueError, match="3 channels"):
        A.normalize(x, (0.5,), (0.5,))


def test_augment_off_is_normalize_and_options_are_checked():
    spec = R.DATASETS["cifar10"]
    x = images(8)
    torch.testing.assert_close(A.augment(x, {}, spec, gen()), A.normalize(x, spec.mean, spec.std))
    off = {"crop_pad": 0, "flip": False, "rotation": 0, "brightness": 0, "contrast": 0}
    torch.testing.assert_close(A.augment(x, off, spec, gen()), A.normalize(x, spec.mean, spec.std))
    with pytest.raises(ValueError) as e:
        A.augment(x, {"crop": 4}, spec, gen())
    assert "crop" in str(e.value) and "crop_pad, flip, rotation, brightness, contrast" in str(e.value)
    with pytest.raises(ValueError, match="crop_pad"):
        A.augment(x, {"crop_pad": -1}, spec, gen())
    with pytest.raises(ValueError, match="mean and std"):
        A.augment(x, {"crop_pad": 2}, None, gen())


def test_augment_full_pipeline_is_deterministic():
    spec = R.DATASETS["cifar10"]
    options = {"crop_pad": 4, "flip": True, "rotation": 15, "brightness": 0.2, "contrast": 0.2}
    x = images(16)
    a, b = A.augment(x, options, spec, gen(7)), A.augment(x, options, spec, gen(7))
    assert a.dtype == torch.float32 and a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, A.augment(x, options, spec, gen(8)))
    aug = A.Augmentation.from_options({**options, "mean": spec.mean, "std": spec.std})
    assert torch.equal(aug(x, gen(7)), a)


# ---------------------------------------------------------------------------------------------
# Pixel CSV


def test_pixel_csv_round_trip(tmp_path):
    spec = R.DATASETS["mnist"]
    x = images(3, c=1, h=28, w=28)
    path = P.write_pixel_csv(tmp_path / "x.csv", x)
    assert path.read_text().splitlines()[0].startswith("p0,p1,p2,")
    assert torch.equal(P.read_pixel_csv(path, spec), x)
    no_header = tmp_path / "n.csv"
    no_header.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
    assert torch.equal(P.read_pixel_csv(no_header, spec), x)


def _csv(tmp_path, rows: list[list[str]], header=True) -> Path:
    lines = ([",".join(f"p{i}" for i in range(784))] if header else []) + [",".join(r) for r in rows]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (["0"] * 783, "line 3: expected 784 values (mnist: 1 x 28 x 28), got 783"),
        (["0"] * 10 + ["abc"] + ["0"] * 773, "line 3, column 11: 'abc' is not an integer 0-255"),
        (["0"] * 5 + ["256"] + ["0"] * 778, "line 3, column 6: 256 is outside 0-255"),
        (["-1"] + ["0"] * 783, "line 3, column 1: -1 is outside 0-255"),
    ],
)
def test_pixel_csv_errors_name_the_line(tmp_path, bad_row, message):
    path = _csv(tmp_path, [["7"] * 784, bad_row, ["1"] * 784])
    with pytest.raises(D.DataError) as e:
        P.read_pixel_csv(path, R.DATASETS["mnist"])
    assert str(e.value) == f"{path}, {message}"


@pytest.mark.parametrize("bad", ["x", "0.5"])
def test_pixel_csv_single_row_with_a_bad_value_is_not_a_header(tmp_path, bad):
    """A one-row file whose row holds a non-integer is a bad data row, named, not a header."""
    path = _csv(tmp_path, [["3"] * 100 + [bad] + ["3"] * 683], header=False)
    with pytest.raises(D.DataError) as e:
        P.read_pixel_csv(path, R.DATASETS["mnist"])
    assert str(e.value) == f"{path}, line 1, column 101: {bad!r} is not an integer 0-255"


def test_pixel_csv_binary_file_is_named(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(D.DataError, match="not a text \\(UTF-8\\) CSV file"):
        P.read_pixel_csv(path, R.DATASETS["mnist"])


def test_pixel_csv_empty(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(D.DataError, match="no image rows"):
        P.read_pixel_csv(empty, R.DATASETS["mnist"])
    with pytest.raises(D.DataError, match="no image rows \\(only a header\\)"):
        P.read_pixel_csv(_csv(tmp_path, []), R.DATASETS["mnist"])


# ---------------------------------------------------------------------------------------------
# The real thing

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_from_debian(tmp_path):
    out = D.prepare_dataset("fashion_mnist", tmp_path / "raw", tmp_path / "data.pt", download=False)
    data = D.load_prepared(out)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.bincount().tolist() == [6000] * 10
    assert data.test_y.bincount().tolist() == [1000] * 10
    assert data.train_x.float().mean().item() / 255 == pytest.approx(0.2860, abs=5e-5)
