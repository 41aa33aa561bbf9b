"""Augmentation of whole batches, in the airbench style: uint8 batches on the training device, one
seeded ``torch.Generator``, tensor ops only (no PIL, no per-sample loops, no DataLoader workers).

Random numbers are drawn on the generator's device and moved to the batch's device, so a CPU
generator gives the same draws whether the batch lives on the CPU or a GPU. Each function follows
the convention of its torchvision counterpart (tests compare them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from normres import registry as R

__all__ = [
    "AUGMENT_KEYS",
    "Augmentation",
    "adjust_brightness_contrast",
    "augment",
    "color_jitter",
    "normalize",
    "random_crop_flip",
    "random_rotation",
    "rotate",
]


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
    def from_options(cls, options: Mapping[str, Any], dataset: R.DatasetDef | None = None) -> Augmentation:
        """Build from a config mapping (keys :data:`AUGMENT_KEYS`, plus ``mean``/``std`` if no dataset)."""
        valid = AUGMENT_KEYS + ("mean", "std")
        if unknown := sorted(set(options) - set(valid)):
            raise ValueError(f"unknown augmentation option(s) {', '.join(unknown)} (choose from: {', '.join(valid)})")
        stats = {"mean": dataset.mean, "std": dataset.std} if dataset is not None else {}
        stats.update({k: tuple(options[k]) for k in ("mean", "std") if k in options})
        if len(stats) < 2:
            raise ValueError("augmentation needs mean and std (give a dataset or both keys)")
        return cls(**stats, **{k: options[k] for k in AUGMENT_KEYS if k in options})

    @classmethod
    def from_settings(cls, settings: Any, mean: Sequence[float], std: Sequence[float]) -> Augmentation:
        """Build from a run's :class:`~normres.config.AugmentSettings` and its input scaling."""
        return cls(mean=tuple(mean), std=tuple(std), **{k: getattr(settings, k) for k in AUGMENT_KEYS})

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
    dataset: R.DatasetDef | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Augment and normalise a uint8 batch per ``options`` (see :class:`Augmentation`); float32 out."""
    aug = options if isinstance(options, Augmentation) else Augmentation.from_options(options, dataset)
    return aug(x, generator)


