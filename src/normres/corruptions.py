"""Deterministic corrupted copies of a test split, after CIFAR-10-C.

Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR). Each function below follows its counterpart in the reference script
(hendrycks/robustness, ``ImageNet-C/create_c/make_cifar_c.py``, commit 8190fe3) with the published
CIFAR-10-C parameters, which are also used for 28x28 grayscale images (see
:mod:`normres.corruption_specs` for the table and why). Differences from the reference:

* Batches of uint8 ``(N, C, H, W)`` tensors (C = 1 or 3) instead of one PIL image at a time; the
  float corruptions work in float32 on ``x / 255`` (the reference uses float64) and end with
  round-and-clamp to uint8. The reference ends with ``np.uint8(...)``, which truncates, so its
  published images are on average half a grey level darker than these.
* Random numbers come from ``torch.Generator`` s, not numpy's global state, so the noise is not
  CIFAR-10-C's noise, only drawn from the same distributions.

Names live in a torch-free module: the Snakefile validates configs without importing torch, so
:data:`CORRUPTIONS`, :data:`CORRUPTION_NAMES` and :func:`check_corruption` are defined in
:mod:`normres.corruption_specs` (each corruption's function is named there as a string) and
re-exported here; this module holds the torch code and the cached-file format.

**Determinism.** ``corrupt(x, name, severity, seed)`` splits the images into chunks of
:data:`CHUNK` and gives chunk ``k`` its own generator, seeded by
``numpy.random.SeedSequence([seed, crc32(name), severity, k])``; every chunk draws a full chunk's
worth of random numbers even when it is the partial last one. So the result for image ``i``
depends only on the seed, the corruption, the severity and images of its own chunk before it (only
shot noise consumes a rate-dependent number of draws), never on how many images follow: the first
300 images of a corrupted set of 600 equal the corrupted first 300. Keying on the name's CRC rather
than its position keeps every corruption's noise unchanged when corruptions are added. The draws
are reproducible for a given torch version; torch does not promise them across versions.

**Cached file** (:func:`build_corrupted_set`, :func:`save_corrupted_set`,
:func:`load_corrupted_set`): one ``torch.save`` of plain data, loadable with
``torch.load(path, weights_only=True, map_location="cpu")``::

    {"format": "normres.corrupted_set/1",
     "names": [str, ...], "severities": [int, ...], "seed": int,
     "params": {name: [param per listed severity]},      # checked against the table on loading
     "images": {name: uint8 tensor (S, N, C, H, W)}}     # S = len(severities), in that order
"""

from __future__ import annotations

import numbers
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur as tv_gaussian_blur

from normres.corruption_specs import (
    CORRUPTION_NAMES,
    CORRUPTIONS,
    SEVERITIES,
    Corruption,
    check_corruption,
)
from normres.errors import DataError
from normres.io import save_torch

__all__ = [
    "CHUNK",
    "CORRUPTIONS",
    "CORRUPTION_NAMES",
    "FORMAT",
    "SEVERITIES",
    "CorruptedSet",
    "Corruption",
    "brightness",
    "build_corrupted_set",
    "check_corruption",
    "contrast",
    "corrupt",
    "gaussian_blur",
    "gaussian_noise",
    "impulse_noise",
    "jpeg",
    "load_corrupted_set",
    "pixelate",
    "save_corrupted_set",
    "shot_noise",
]

CHUNK = 256  # images per generator; changing it changes every noisy corrupted set
FORMAT = "normres.corrupted_set/1"
CHANNELS = (1, 3)


# ---------------------------------------------------------------------------------------------
# The corruptions: each takes one chunk of at most CHUNK uint8 images (n, C, H, W), the severity's
# parameter c and the chunk's generator, and returns uint8 images of the same shape.
# Call them through corrupt(), which checks the input and seeds the generators.
# ---------------------------------------------------------------------------------------------


def _unit(x: Tensor) -> Tensor:
    return x.float().div_(255)  # (n, C, H, W) in [0, 1], the reference's x / 255.


def _uint8(y: Tensor) -> Tensor:
    # The reference's np.clip(y, 0, 1) * 255, rounded (where it truncates; see the module docstring).
    return y.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _full_chunk(x: Tensor) -> tuple[int, ...]:
    # A full chunk's shape, drawn even for the last, partial chunk so that draws are prefix-stable.
    return (CHUNK, *x.shape[1:])


def gaussian_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """clip(x + N(0, c^2)) per pixel and channel."""
    noise = torch.randn(_full_chunk(x), generator=generator)[: len(x)]  # (n, C, H, W)
    return _uint8(_unit(x) + c * noise)


def shot_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """clip(Poisson(x * c) / c) per pixel and channel."""
    rate = torch.zeros(_full_chunk(x))  # (CHUNK, C, H, W); padding images have rate 0
    rate[: len(x)] = _unit(x) * c
    # torch.poisson samples serially on the CPU, so draws for an image depend on earlier images only.
    return _uint8(torch.poisson(rate, generator=generator)[: len(x)] / c)


def impulse_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """Salt and pepper as skimage.util.random_noise(mode='s&p', amount=c) draws it.

    skimage (``skimage/util/noise.py``) flips each element of the array, every channel on its own,
    with probability ``amount``, and makes a flipped element salt with probability 1/2, else
    pepper. One uniform draw per element gives the same distribution: below c/2 pepper, in
    [c/2, c) salt. (skimage before 0.16 instead set ceil(amount * size / 2) random coordinates,
    repeats allowed; its distribution differs slightly and is not reproduced.)
    """
    u = torch.rand(_full_chunk(x), generator=generator)[: len(x)]  # (n, C, H, W)
    return x.masked_fill(u < c, 255).masked_fill_(u < c / 2, 0)  # exact in uint8: 0 and 1 map to 0, 255


def gaussian_blur(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """skimage.filters.gaussian(x, sigma=c, multichannel=True): scipy's gaussian_filter per channel.

    skimage's defaults are mode='nearest' and truncate=4, so scipy uses a kernel of radius
    int(4 * sigma + 0.5) over the edge-replicated image. torchvision's gaussian_blur builds the
    same normalised kernel but pads by reflection, so the image is replicate-padded by the radius
    first and torchvision's own padding is cropped off again.
    """
    r = int(4.0 * c + 0.5)  # scipy.ndimage's radius for truncate=4.0
    padded = F.pad(_unit(x), (r, r, r, r), mode="replicate")  # (n, C, H + 2r, W + 2r)
    blurred = tv_gaussian_blur(padded, kernel_size=[2 * r + 1] * 2, sigma=[c, c])  # same shape
    return _uint8(blurred[..., r:-r, r:-r])  # (n, C, H, W)


def contrast(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """clip((x - mean) * c + mean), the mean per image and channel over (H, W) as the reference's."""
    y = _unit(x)
    mean = y.mean(dim=(2, 3), keepdim=True)  # (n, C, 1, 1)
    return _uint8((y - mean) * c + mean)


def brightness(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """V += c in HSV (skimage's rgb2hsv / hsv2rgb), clipped to 1; grayscale: the pixel plus c.

    No round trip through HSV is needed: with hue and saturation fixed, every RGB channel is
    proportional to V (hsv2rgb gives V, V(1 - S) and an interpolation between them), so the
    result is ``x * V' / V`` with ``V = max over channels`` and ``V' = min(V + c, 1)``. A black
    pixel (V = 0, which rgb2hsv gives S = 0) becomes grey ``V'``. For one channel V is the pixel
    itself, the same as a grey RGB pixel.
    """
    y = _unit(x)
    v = y.amax(dim=1, keepdim=True)  # (n, 1, H, W): HSV value
    v_new = (v + c).clamp_(max=1.0)  # (n, 1, H, W)
    ratio = torch.where(v > 0, y / v, 1.0)  # (n, C, H, W): RGB relative to V, fixed by H and S
    return _uint8(ratio * v_new)


@cache
def _pil_box_weights(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) resampling matrix of Pillow's BOX filter (``precompute_coeffs`` in Resample.c).

    Output pixel i averages, with equal weights, the input pixels whose centres lie in the box
    (-1/2, 1/2] * max(scale, 1) around its own centre (i + 1/2) * scale, scale = n_in / n_out.
    Shrinking, that is a 1- or 2-pixel mean; enlarging, exactly one pixel (nearest neighbour
    with Pillow's tie rule).
    """
    scale = n_in / n_out
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale  # (n_out,)
    offset = (torch.arange(n_in, dtype=torch.float64) + 0.5 - centre[:, None]) / max(scale, 1.0)
    weights = ((offset > -0.5) & (offset <= 0.5)).double()  # (n_out, n_in)
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def _pil_box_resize(x: Tensor, height: int, width: int) -> Tensor:
    """Pillow's ``Image.resize((width, height), Image.BOX)`` on uint8 images (n, C, H, W).

    Pillow resamples horizontally, then vertically, and rounds half up to uint8 after each pass;
    so does this.
    """
    rows = torch.matmul(x.float(), _pil_box_weights(x.shape[-1], width).T).add_(0.5).floor_()  # (n, C, H, w)
    out = torch.matmul(_pil_box_weights(x.shape[-2], height), rows).add_(0.5).floor_()  # (n, C, h, w)
    return out.to(torch.uint8)


def pixelate(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """Pillow BOX resize to int(side * c), then BOX back up, as the reference does it.

    The reference resizes a PIL image to ``(int(32 * c), int(32 * c))`` and back with
    ``PIL.Image.BOX`` both ways; here the side is the image's own (28 or 32). Pillow's BOX is
    reproduced exactly with two small resampling matrices per axis, including its rounding to
    uint8 after each pass, so the result equals Pillow's pixel for pixel. (torch's ``area`` mode
    would differ: it gives partly covered pixels full weight, Pillow decides by pixel centres.)
    """
    h, w = x.shape[-2:]
    small = _pil_box_resize(x, int(h * c), int(w * c))  # (n, C, h * c, w * c)
    return _pil_box_resize(small, h, w)  # (n, C, H, W)


def jpeg(x: Tensor, c: int, generator: torch.Generator) -> Tensor:
    """JPEG at quality c and back, via torchvision.io's libjpeg (the reference uses PIL's).

    torchvision's encoder, like Pillow's, leaves libjpeg's defaults (4:2:0 chroma subsampling for
    RGB, a grayscale JPEG for one channel); the output matched Pillow's save/open pixel for pixel
    on the images tried. torchvision 0.29 deprecates its codecs in favour of TorchCodec; the warning
    is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        encoded = torchvision.io.encode_jpeg(list(x), quality=int(c))  # n 1-D uint8 tensors
        decoded = torchvision.io.decode_jpeg(encoded)  # n uint8 (C, H, W)
    return torch.stack(decoded)  # (n, C, H, W)


# ---------------------------------------------------------------------------------------------
# Applying a corruption
# ---------------------------------------------------------------------------------------------


def _check_images(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (values 0..255), got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] not in CHANNELS:
        raise ValueError(f"images must have shape (N, C, H, W) with C in {CHANNELS}, got shape {tuple(x.shape)}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _chunk_generator(seed: int, name: str, severity: int, chunk: int) -> torch.Generator:
    # SeedSequence mixes the four integers into a well-spread 64-bit seed: nearby tuples give
    # unrelated streams, which seed + chunk or similar arithmetic would not guarantee.
    entropy = [int(seed), zlib.crc32(name.encode()), int(severity), chunk]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@cache
def _function(spec: Corruption) -> Callable[[Tensor, Any, torch.Generator], Tensor]:
    return spec.load()


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Corrupted copy of uint8 images (N, C, H, W): the same shape and dtype.

    Deterministic in (seed, name, severity) and prefix-stable (see the module docstring). Computed
    on the CPU (the JPEG codec and the generators live there); the result is on x's device.
    """
    spec = check_corruption(name, severity)
    _check_images(x)
    _check_seed(seed)
    function = _function(spec)
    c = spec.params[severity - 1]
    images = x.detach().cpu().contiguous()  # (N, C, H, W)
    out = torch.empty_like(images)
    for k, start in enumerate(range(0, len(images), CHUNK)):
        generator = _chunk_generator(seed, name, severity, k)
        out[start : start + CHUNK] = function(images[start : start + CHUNK], c, generator)
    return out.to(x.device)


# ---------------------------------------------------------------------------------------------
# The cached corrupted set
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptedSet:
    """A loaded corrupted set: ``images[name][j]`` is the split at severity ``severities[j]``."""

    names: tuple[str, ...]
    severities: tuple[int, ...]
    seed: int
    images: dict[str, Tensor]  # name -> uint8 (S, N, C, H, W)

    def get(self, name: str, severity: int) -> Tensor:
        """The corrupted split (N, C, H, W) for one corruption and severity."""
        if name not in self.images:
            raise ValueError(f"corrupted set has no {name!r} (it has: {', '.join(self.names)})")
        if severity not in self.severities:
            have = ", ".join(map(str, self.severities))
            raise ValueError(f"corrupted set has no severity {severity!r} (it has: {have})")
        return self.images[name][self.severities.index(severity)]


def _names_and_severities(names: Iterable[str], severities: Iterable[int]) -> tuple[tuple, tuple]:
    names, severities = tuple(names), tuple(severities)
    if not names or not severities:
        raise ValueError(f"need at least one corruption and one severity, got {names} and {severities}")
    for what, values in (("corruption", names), ("severity", severities)):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ValueError(f"{what} {repeated[0]!r} is listed twice")
    for name in names:
        for severity in severities:
            check_corruption(name, severity)
    return names, severities


def build_corrupted_set(
    x: Tensor,
    names: Iterable[str] = CORRUPTION_NAMES,
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Every listed corruption of uint8 images (N, C, H, W) at every listed severity.

    Returns the plain dict that :func:`save_corrupted_set` writes (format in the module docstring).
    """
    names, severities = _names_and_severities(names, severities)
    _check_images(x)
    _check_seed(seed)
    images = {}
    for name in names:
        stack = torch.empty((len(severities), *x.shape), dtype=torch.uint8)  # (S, N, C, H, W)
        for j, severity in enumerate(severities):
            stack[j] = corrupt(x, name, severity, seed)
        images[name] = stack
    return {
        "format": FORMAT,
        "names": list(names),
        "severities": list(severities),
        "seed": int(seed),
        "params": {name: [CORRUPTIONS[name].params[s - 1] for s in severities] for name in names},
        "images": images,
    }


_KEYS = ("format", "names", "severities", "seed", "params", "images")


def _problem(obj: Any) -> str | None:
    """What is wrong with a corrupted-set dict, or None; the first problem found, named."""
    if not isinstance(obj, Mapping):
        return f"expected a dict, found {type(obj).__name__}"
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        return f"missing key {missing[0]!r} (expected keys: {', '.join(_KEYS)})"
    extra = sorted(set(obj) - set(_KEYS), key=str)
    if extra:
        return f"unexpected key {extra[0]!r} (expected keys: {', '.join(_KEYS)})"
    if obj["format"] != FORMAT:
        return f"'format' is {obj['format']!r}, expected {FORMAT!r}"
    names, severities, seed = obj["names"], obj["severities"], obj["seed"]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return f"'names' must be a list of strings, found {names!r}"
    if not isinstance(severities, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in severities
    ):
        return f"'severities' must be a list of integers, found {severities!r}"
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        return f"'seed' must be a non-negative integer, found {seed!r}"
    try:
        names, severities = _names_and_severities(names, severities)
    except ValueError as exc:
        return str(exc)
    params, images = obj["params"], obj["images"]
    for key, value in (("params", params), ("images", images)):
        if not isinstance(value, Mapping) or set(value) != set(names):
            found = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            return f"{key!r} must map exactly the names {list(names)}, found {found}"
    for name in names:
        expected = [CORRUPTIONS[name].params[s - 1] for s in severities]
        if list(params[name]) != expected:
            return (
                f"{name!r} was built with parameters {list(params[name])}, but the table now gives "
                f"{expected} for severities {list(severities)}; rebuild the set"
            )
    shape = None
    for name in names:
        t = images[name]
        if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.ndim != 5:
            kind = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            return f"images[{name!r}] must be a uint8 tensor (S, N, C, H, W), found a {kind}"
        if t.shape[0] != len(severities) or t.shape[2] not in CHANNELS:
            return (
                f"images[{name!r}] has shape {tuple(t.shape)}; expected (S={len(severities)}, N, C, H, W) "
                f"with C in {CHANNELS}"
            )
        if shape is not None and t.shape != shape:
            return f"images[{name!r}] has shape {tuple(t.shape)}, but images[{names[0]!r}] has {tuple(shape)}"
        shape = t.shape
    return None


def save_corrupted_set(obj: Mapping[str, Any], path: str | Path) -> Path:
    """Write a :func:`build_corrupted_set` dict atomically (a temporary file, then a rename)."""
    problem = _problem(obj)
    if problem:
        raise ValueError(f"cannot save corrupted set to {path}: {problem}")

    def compact(t: Tensor) -> Tensor:
        # torch.save writes a view's whole storage; copy views so the file holds only the images.
        return t.contiguous() if t.untyped_storage().nbytes() == t.nbytes else t.clone()

    plain = {
        "format": FORMAT,
        "names": list(obj["names"]),
        "severities": list(obj["severities"]),
        "seed": int(obj["seed"]),
        "params": {name: list(obj["params"][name]) for name in obj["names"]},
        "images": {name: compact(obj["images"][name]) for name in obj["names"]},
    }
    return save_torch(plain, path)  # normres.io: torch.save inside atomic_path


def load_corrupted_set(path: str | Path) -> CorruptedSet:
    """Read a file written by :func:`save_corrupted_set` as plain data (no code is unpickled).

    Raises :class:`normres.errors.DataError` naming the file and the problem: missing, not a torch
    file, holding objects that only unpickling code could rebuild, or keys missing or mistyped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corrupted set {path} does not exist (write it with save_corrupted_set)")
    if not zipfile.is_zipfile(path):
        raise DataError(f"corrupted set {path} is not a torch file (torch.save writes a zip archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        reason = next((ln.strip() for ln in lines if "Unsupported" in ln), lines[0] if lines else "")
        raise DataError(
            f"refusing to load corrupted set {path}: it holds objects that only unpickling code "
            f"could rebuild ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"corrupted set {path} is truncated or not a torch file: {exc}") from None
    problem = _problem(obj)
    if problem:
        raise DataError(f"corrupted set {path}: {problem}")
    return CorruptedSet(
        names=tuple(obj["names"]),
        severities=tuple(obj["severities"]),
        seed=obj["seed"],
        images=dict(obj["images"]),
    )
