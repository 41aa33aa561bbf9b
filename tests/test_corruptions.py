"""Corruptions: each one against an independent implementation of the reference formula, seeding and
prefix stability, severities that hurt more as they grow, and the cached file's contract."""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import normres
from normres.corruptions import (
    CHUNK,
    CORRUPTION_NAMES,
    CORRUPTIONS,
    SEVERITIES,
    CorruptedSet,
    build_corrupted_set,
    corrupt,
    load_corrupted_set,
    save_corrupted_set,
)
from normres.errors import DataError

from conftest import FASHION

NOISY = ("gaussian_noise", "shot_noise", "impulse_noise")  # the corruptions that draw random numbers
ALL = [(name, s) for name in CORRUPTION_NAMES for s in SEVERITIES]


def _smooth(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, channels, 7, 7), generator=g)  # (n, C, 7, 7)
    fine = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)  # (n, C, side, side)
    return fine.clamp(0, 1).mul(255).round().to(torch.uint8)


def _objects(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    """Four overlapping flat ellipses on black with a faint smooth texture: edges, like photos.

    Only smooth images will not do for the severity ordering: on smooth fields pixelate's
    28 -> 23 -> 28 pixels (severity 3) loses more than 28 -> 21 -> 28 (severity 4), whose 4:3 grid
    is regular; on Fashion-MNIST and on these the order holds.
    """
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # (side, side)
    img = torch.zeros((n, channels, side, side))
    for _ in range(4):
        cy, cx = torch.rand((2, n, 1, 1, 1), generator=g) * side  # (n, 1, 1, 1) each
        ry, rx = 2 + torch.rand((2, n, 1, 1, 1), generator=g) * side / 3
        inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1  # (n, 1, side, side)
        img = torch.where(inside, torch.rand((n, channels, 1, 1), generator=g), img)
    texture = _smooth(n, channels, side, seed + 1).float() / 255
    return (0.8 * img + 0.2 * texture).mul(255).round().to(torch.uint8)  # (n, C, side, side)


@pytest.fixture(scope="module")
def gray() -> torch.Tensor:
    """200 natural-looking 1x28x28 images: real Fashion-MNIST test images where installed."""
    path = FASHION / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        return _objects(200, 1, 28)
    with gzip.open(path) as fh:
        pixels = np.frombuffer(fh.read(), dtype=np.uint8, offset=16)  # idx3: 16-byte header
    return torch.from_numpy(pixels.reshape(-1, 1, 28, 28)[:200].copy())


@pytest.fixture(scope="module")
def rgb(gray) -> torch.Tensor:
    """200 3x32x32 images: the grayscale ones enlarged and tinted per channel (so hue varies)."""
    g = torch.Generator().manual_seed(1)
    big = F.interpolate(gray.float(), size=(32, 32), mode="bilinear", align_corners=False)  # (200, 1, 32, 32)
    gain = 0.3 + 0.7 * torch.rand((200, 3, 1, 1), generator=g)  # (200, 3, 1, 1)
    offset = 60 * torch.rand((200, 3, 1, 1), generator=g)
    return (big * gain + offset).round().clamp(0, 255).to(torch.uint8)  # (200, 3, 32, 32)


@pytest.fixture(params=["gray", "rgb"])
def images(request) -> torch.Tensor:
    return request.getfixturevalue(request.param)


def _constant(value: int, n: int = 256, channels: int = 3, side: int = 32) -> torch.Tensor:
    return torch.full((n, channels, side, side), value, dtype=torch.uint8)


def _psnr(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    mse = (clean.double() - noisy.double()).pow(2).mean(dim=(1, 2, 3))  # (N,)
    return 10 * torch.log10(255.0**2 / mse)


def _param(name: str, severity: int) -> float:
    return CORRUPTIONS[name].params[severity - 1]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_entries_are_complete_and_resolve():
    assert CORRUPTION_NAMES == tuple(CORRUPTIONS)
    assert {"gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness",
            "pixelate", "jpeg"} <= set(CORRUPTION_NAMES)  # fmt: skip
    for name, spec in CORRUPTIONS.items():
        assert spec.name == name
        assert len(spec.params) == len(SEVERITIES) == 5
        # The published parameters are strictly ordered: each severity is harsher than the last.
        steps = np.diff(np.asarray(spec.params, dtype=float))
        assert (steps > 0).all() or (steps < 0).all(), name
        assert spec.description.endswith(".") and ". " not in spec.description, name
        assert callable(spec.load())


def test_names_import_without_torch():
    # The config validation's import: the names, without torch (the same normres as this process).
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(normres.__file__).parents[1])}
    code = "import sys, normres.corruption_specs as s; assert s.CORRUPTION_NAMES; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Every corruption: shape, dtype, determinism, prefix stability, harsher with severity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,severity", ALL)
def test_shape_dtype_and_change(images, name, severity):
    out = corrupt(images, name, severity, seed=0)
    assert out.shape == images.shape and out.dtype == torch.uint8  # uint8 holds exactly 0..255
    assert not torch.equal(out, images)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise"])
def test_noise_is_clipped_not_wrapped(name):
    white = _constant(255, n=16)
    out = corrupt(white, name, 5, seed=0)
    # Clipping at 1 piles about half the values (noise > 0) up at 255; wrapping would give values near 0.
    assert 0.4 < (out == 255).double().mean() < 0.6
    assert out.min() > 100


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_seeded(rgb, name):
    a, b = corrupt(rgb, name, 3, seed=7), corrupt(rgb, name, 3, seed=7)
    assert torch.equal(a, b)
    other = corrupt(rgb, name, 3, seed=8)
    if name in NOISY:
        assert (a != other).double().mean() > 0.01
    else:
        assert torch.equal(a, other)  # no random numbers: the seed does not matter


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 7, 7)])  # 7x7: torch.randn's tail differs
@pytest.mark.parametrize("name,severity", ALL)
def test_prefix_stable(name, severity, shape):
    x = _smooth(600, shape[0], shape[1], seed=3)  # 600 = two full chunks and a partial one
    whole = corrupt(x, name, severity, seed=1)
    assert torch.equal(corrupt(x[:300], name, severity, seed=1), whole[:300])
    assert torch.equal(corrupt(x[:1], name, severity, seed=1), whole[:1])


@pytest.mark.parametrize("name", NOISY)
def test_chunks_draw_different_noise(name):
    same = _constant(128, n=2 * CHUNK)  # identical images: only the draws can differ
    out = corrupt(same, name, 5, seed=0)
    assert not torch.equal(out[0], out[CHUNK])
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_psnr_falls_strictly_with_severity(images, name):
    psnr = [_psnr(images, corrupt(images, name, s, seed=0)).mean().item() for s in SEVERITIES]
    assert all(np.isfinite(psnr)), psnr
    assert all(later < earlier for earlier, later in zip(psnr, psnr[1:])), psnr


# ---------------------------------------------------------------------------------------------
# Against independent implementations of the reference formulas (make_cifar_c.py)
# ---------------------------------------------------------------------------------------------


def _to_255(y: np.ndarray) -> np.ndarray:
    return np.clip(y, 0, 1) * 255  # the reference's last step, before the conversion to uint8


def _assert_rounds_to(ours: torch.Tensor, ref: np.ndarray) -> None:
    """ours == round(ref), except that a value within 1e-3 of a tie (k + 0.5) may round either way.

    Exact ties are common (brightness at c = 0.1 adds 25.5 grey levels to V), and float32 here
    against float64 there decides them by rounding noise.
    """
    ours = ours.numpy().astype(float)
    tie = np.abs(ref - np.floor(ref) - 0.5) < 1e-3
    assert np.array_equal(ours[~tie], np.round(ref[~tie]))
    assert (np.abs(ours[tie] - ref[tie]) <= 0.5 + 1e-3).all()


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_blur_matches_scipy(images, severity):
    c = _param("gaussian_blur", severity)
    x = images.numpy() / 255.0
    # skimage.filters.gaussian(x, sigma=c, multichannel=True): scipy with mode='nearest', truncate=4.
    ref = ndimage.gaussian_filter(x, sigma=(0, 0, c, c), mode="nearest", truncate=4.0)
    _assert_rounds_to(corrupt(images, "gaussian_blur", severity, seed=0), _to_255(ref))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_matches_formula(images, severity):
    c = _param("contrast", severity)
    x = images.numpy() / 255.0
    means = x.mean(axis=(2, 3), keepdims=True)  # the reference's np.mean(x, axis=(0, 1)) on HWC
    _assert_rounds_to(corrupt(images, "contrast", severity, seed=0), _to_255((x - means) * c + means))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_matches_hsv_round_trip(rgb, severity):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    c = _param("brightness", severity)
    x = rgb.numpy().transpose(0, 2, 3, 1) / 255.0  # (N, H, W, 3)
    x[0, :4, :4] = 0  # black pixels: V = 0 has no hue
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    ref = _to_255(hsv_to_rgb(hsv)).transpose(0, 3, 1, 2)
    inp = torch.from_numpy(np.round(x * 255).astype(np.uint8).transpose(0, 3, 1, 2).copy())
    _assert_rounds_to(corrupt(inp, "brightness", severity, seed=0), ref)


def test_brightness_grayscale_is_value_plus_c(gray):
    c = _param("brightness", 4)
    out = corrupt(gray, "brightness", 4, seed=0)
    _assert_rounds_to(out, _to_255(gray.numpy() / 255.0 + c))
    # ... and the same as the RGB path on a grey RGB image.
    assert torch.equal(corrupt(gray.expand(-1, 3, -1, -1), "brightness", 4, seed=0), out.expand(-1, 3, -1, -1))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_statistics(severity):
    c = _param("gaussian_noise", severity)
    out = corrupt(_constant(128), "gaussian_noise", severity, seed=0)  # mid-grey: clipping 5 sigma away
    residual = (out.double() - 128) / 255  # (N, 3, 32, 32)
    assert abs(residual.mean().item()) < 0.002
    assert residual.std().item() == pytest.approx(c, rel=0.01)
    # Independent per pixel and channel: neighbours and channels uncorrelated.
    r = residual - residual.mean()
    for a, b in ((r[..., 1:], r[..., :-1]), (r[:, 1:], r[:, :-1])):
        assert abs((a * b).mean().item() / r.var().item()) < 0.01


@pytest.mark.parametrize("severity", SEVERITIES)
def test_shot_noise_distribution(severity):
    from scipy.stats import poisson

    c = _param("shot_noise", severity)
    x = 100 / 255
    out = corrupt(_constant(100), "shot_noise", severity, seed=0).double()  # (256, 3, 32, 32)
    # The exact law of the output: K ~ Poisson(x c), then round(clip(K / c, 0, 1) * 255).
    k = np.arange(0, int(x * c + 12 * np.sqrt(x * c)) + 1)
    values = np.round(np.clip(k / c, 0, 1) * 255)
    pmf = poisson.pmf(k, x * c)
    mean = (pmf * values).sum()
    var = (pmf * (values - mean) ** 2).sum()
    n = out.numel()
    assert out.mean().item() == pytest.approx(mean, abs=4 * np.sqrt(var / n))
    assert out.var().item() == pytest.approx(var, rel=4 * np.sqrt(2 / n))  # about 4 standard errors
    # ... and the whole histogram: total variation distance to the exact law.
    law = np.bincount(values.astype(int), weights=pmf, minlength=256)  # P(output = v), v = 0..255
    observed = np.bincount(out.flatten().numpy().astype(int), minlength=256) / n
    assert 0.5 * np.abs(observed - law).sum() < 0.005


def test_shot_noise_takes_values_k_over_c():
    c = _param("shot_noise", 5)  # 50 photons: the lattice k / c is coarser than uint8's steps
    counts = corrupt(_constant(100), "shot_noise", 5, seed=0).double() / 255 * c
    # Rounding to uint8 moves a value by at most 0.5 / 255, i.e. 0.5 * c / 255 photons.
    assert (counts - counts.round()).abs().max() <= 0.5 * c / 255 + 1e-9


@pytest.mark.parametrize("severity", SEVERITIES)
def test_impulse_noise_statistics(severity):
    c = _param("impulse_noise", severity)
    out = corrupt(_constant(128, n=512), "impulse_noise", severity, seed=0)
    assert set(out.unique().tolist()) <= {0, 128, 255}
    assert (out == 0).double().mean().item() == pytest.approx(c / 2, rel=0.05)
    assert (out == 255).double().mean().item() == pytest.approx(c / 2, rel=0.05)
    # skimage flips each channel on its own: a pixel has exactly one channel flipped w.p. 3c(1-c)^2.
    one_channel = ((out != 128).sum(dim=1) == 1).double().mean().item()
    assert one_channel == pytest.approx(3 * c * (1 - c) ** 2, rel=0.05)


def _pil(img: torch.Tensor):
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _chw(pil_image, channels: int) -> np.ndarray:
    arr = np.asarray(pil_image)
    return arr.reshape(*arr.shape[:2], channels).transpose(2, 0, 1)  # (C, H, W)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_pixelate_matches_pillow(images, severity):
    Image = pytest.importorskip("PIL.Image")
    c = _param("pixelate", severity)
    n, channels, side = 50, images.shape[1], images.shape[-1]
    small = int(side * c)  # the reference's int(32 * c)
    ref = [_chw(_pil(img).resize((small, small), Image.BOX).resize((side, side), Image.BOX), channels)
           for img in images[:n]]  # fmt: skip
    assert np.array_equal(corrupt(images[:n], "pixelate", severity, seed=0).numpy(), np.stack(ref))


def test_jpeg_matches_pillow_and_lower_quality_differs_more(images):
    pytest.importorskip("PIL.Image")
    from PIL import Image

    n, channels = 50, images.shape[1]
    for severity in SEVERITIES:
        ref = []
        for img in images[:n]:
            buf = io.BytesIO()
            _pil(img).save(buf, "JPEG", quality=_param("jpeg", severity))
            ref.append(_chw(Image.open(buf), channels))
        # Both use libjpeg with its defaults; builds of it may differ by a grey level here and there.
        diff = np.abs(corrupt(images[:n], "jpeg", severity, seed=0).numpy().astype(int) - np.stack(ref))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert (_param("jpeg", 1), _param("jpeg", 5)) == (80, 40)  # qualities
    err = {s: (corrupt(images, "jpeg", s, seed=0).double() - images.double()).abs().mean() for s in (1, 5)}
    assert err[5] > err[1]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,message",
    [
        (torch.zeros(2, 3, 32, 32), "uint8"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), r"shape \(N, C, H, W\)"),
        (torch.zeros(2, 2, 32, 32, dtype=torch.uint8), r"C in \(1, 3\)"),
        (np.zeros((2, 3, 32, 32), dtype=np.uint8), "torch.Tensor"),
    ],
)
def test_bad_images_raise(x, message):
    with pytest.raises(ValueError, match=message):
        corrupt(x, "contrast", 1, seed=0)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown corruption 'fog' \(choose from: gaussian_noise, .*jpeg"):
        corrupt(_constant(0, n=1), "fog", 1, seed=0)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True, "3"])
def test_bad_severity_raises(severity):
    with pytest.raises(ValueError, match=r"contrast: severity must be one of 1, 2, 3, 4, 5, got"):
        corrupt(_constant(0, n=1), "contrast", severity, seed=0)


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        corrupt(_constant(0, n=1), "contrast", 1, seed=seed)


# ---------------------------------------------------------------------------------------------
# The cached set
# ---------------------------------------------------------------------------------------------

SUBSET = ("shot_noise", "pixelate")


@pytest.fixture
def saved(tmp_path, gray) -> tuple[pathlib.Path, dict]:
    built = build_corrupted_set(gray[:40], SUBSET, (2, 5), seed=3)
    return save_corrupted_set(built, tmp_path / "corrupted.pt"), built


def test_saved_set_round_trips_as_plain_data(saved, gray):
    path, built = saved
    assert [p.name for p in path.parent.iterdir()] == ["corrupted.pt"]  # no temporary file left
    plain = torch.load(path, weights_only=True, map_location="cpu")
    assert plain["names"] == list(SUBSET) and plain["severities"] == [2, 5] and plain["seed"] == 3
    loaded = load_corrupted_set(path)
    assert isinstance(loaded, CorruptedSet)
    assert loaded.names == SUBSET and loaded.severities == (2, 5) and loaded.seed == 3
    for name in SUBSET:
        assert loaded.images[name].shape == (2, 40, 1, 28, 28)
        for j, severity in enumerate((2, 5)):
            expected = corrupt(gray[:40], name, severity, seed=3)
            assert torch.equal(loaded.images[name][j], expected)
            assert torch.equal(loaded.get(name, severity), expected)
    with pytest.raises(ValueError, match=r"no severity 1 \(it has: 2, 5\)"):
        loaded.get("pixelate", 1)
    with pytest.raises(ValueError, match=r"no 'jpeg' \(it has: shot_noise, pixelate\)"):
        loaded.get("jpeg", 2)


def test_save_writes_only_the_images_of_a_view(tmp_path, gray):
    built = build_corrupted_set(gray[:40], ["contrast"], [1], seed=0)
    big = torch.cat([built["images"]["contrast"]] * 50)  # (50, 40, 1, 28, 28)
    built["images"]["contrast"] = big[:1]  # a view into a 50x larger storage
    path = save_corrupted_set(built, tmp_path / "c.pt")
    assert path.stat().st_size < 4 * big[:1].nbytes


@pytest.mark.parametrize(
    "names,severities,message",
    [
        (["contrast", "contrast"], [1], "corruption 'contrast' is listed twice"),
        (["contrast"], [1, 1], "severity 1 is listed twice"),
        (["fog"], [1], "unknown corruption 'fog'"),
        (["contrast"], [6], "severity must be one of"),
        ([], [1], "at least one corruption"),
    ],
)
def test_build_rejects_bad_lists(gray, names, severities, message):
    with pytest.raises(ValueError, match=message):
        build_corrupted_set(gray[:4], names, severities, seed=0)


def test_save_rejects_a_bad_dict_and_writes_nothing(tmp_path, gray):
    built = build_corrupted_set(gray[:4], ["contrast"], [1], seed=0)
    built["images"]["contrast"] = built["images"]["contrast"].float()
    with pytest.raises(ValueError, match=r"images\['contrast'\] must be a uint8 tensor"):
        save_corrupted_set(built, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def _rewrite(path: pathlib.Path, change) -> pathlib.Path:
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda o: o.pop("images"), r"missing key 'images' \(expected keys: format, names"),
        (lambda o: o.update(extra=1), "unexpected key 'extra'"),
        (lambda o: o.update(format="other/9"), "'format' is 'other/9'"),
        (lambda o: o.update(severities=["2", "5"]), "'severities' must be a list of integers"),
        (lambda o: o.update(seed=-3), "'seed' must be a non-negative integer"),
        (lambda o: o.update(names=["shot_noise", "fog"]), "unknown corruption 'fog'"),
        (lambda o: o["images"].pop("pixelate"), r"'images' must map exactly the names"),
        (lambda o: o["images"].update(pixelate=o["images"]["pixelate"].float()), "must be a uint8 tensor"),
        (lambda o: o["images"].update(pixelate=o["images"]["pixelate"][:1]), r"expected \(S=2, N, C, H, W\)"),
        (lambda o: o["images"].update(pixelate=o["images"]["pixelate"][:, :5]), "but images\\['shot_noise'\\] has"),
        (lambda o: o["params"].update(pixelate=[0.5, 0.5]), "built with parameters .* rebuild the set"),
        (lambda o: o.clear() or o.update(a=torch.zeros(1)) or None, "missing key 'format'"),
    ],
)
def test_load_rejects_missing_or_mistyped_keys(saved, change, message):
    path = _rewrite(saved[0], change)
    with pytest.raises(DataError, match=message) as info:
        load_corrupted_set(path)
    assert str(path) in str(info.value)


def test_load_rejects_a_list(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DataError, match="expected a dict, found list"):
        load_corrupted_set(tmp_path / "list.pt")


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(DataError, match=f"corrupted set {tmp_path / 'none.pt'} does not exist"):
        load_corrupted_set(tmp_path / "none.pt")
    (tmp_path / "text.pt").write_text("not a tensor file\n")
    np.save(tmp_path / "array.npy", np.zeros(3))
    for name in ("text.pt", "array.npy"):
        with pytest.raises(DataError, match=f"{tmp_path / name} is not a torch file"):
            load_corrupted_set(tmp_path / name)
    torch.save({"images": torch.zeros(3)}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:-200])  # truncated
    with pytest.raises(DataError, match=f"{tmp_path / 'cut.pt'} is (truncated or )?not a torch file"):
        load_corrupted_set(tmp_path / "cut.pt")


def test_load_refuses_files_that_need_unpickling_code(saved):
    path = _rewrite(saved[0], lambda o: o.update(names=pathlib.PurePosixPath("x")))
    with pytest.raises(DataError, match=f"refusing to load corrupted set {path}: .*unpickling code") as info:
        load_corrupted_set(path)
    assert "PurePosixPath" in str(info.value)
