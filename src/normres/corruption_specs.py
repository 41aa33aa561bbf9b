"""The corruptions of the shifted test sets and their published parameters, without importing torch.

The Snakefile validates the config on every invocation, dry runs included, and importing torch for
that costs seconds (see :mod:`normres.registry`). So the one registry of corruptions lives here, as
plain data: each entry's name, a one-sentence description, its five parameters (severities 1..5)
and the function that applies it, written as a ``"module:function"`` string and imported only
when :meth:`Corruption.load` is called. Config validation imports :data:`CORRUPTION_NAMES` or
:func:`check_corruption` from here; :mod:`normres.corruptions` (which needs torch) applies the
corruptions and re-exports everything below.

The parameters are CIFAR-10-C's (Hendrycks & Dietterich 2019, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR), used for the 28x28 grayscale datasets
too: MNIST-C (Mu & Gilmer 2019) chose other corruptions, so CIFAR-10-C's 32x32 parameters are the
published ones closest to these image sizes.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    """One corruption: what it does, its parameter at each severity, and where its code lives."""

    name: str
    description: str  # one sentence; ``c`` is the severity's parameter
    params: tuple[float, ...]  # params[severity - 1]
    function: str  # "module:function", called as function(uint8 chunk, c, torch.Generator)

    def __post_init__(self) -> None:
        if len(self.params) != len(SEVERITIES):
            raise ValueError(f"{self.name}: need {len(SEVERITIES)} parameters, got {len(self.params)}")
        if self.function.count(":") != 1:
            raise ValueError(f"{self.name}: function must read 'module:function', got {self.function!r}")

    def load(self) -> Callable[..., Any]:
        """Import and return the function (this is where torch gets imported)."""
        module, attr = self.function.split(":")
        return getattr(importlib.import_module(module), attr)


_M = "normres.corruptions"

# Parameters copied from hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py at commit
# 8190fe329f5f072a06e3a2aea02bb5dda69aed9f (2022-08-24): the list `c = [...]` of each function.
# The reference names the JPEG function `jpeg_compression`; here it is `jpeg`.
_TABLE = (
    Corruption(
        "gaussian_noise",
        "Adds independent zero-mean Gaussian noise of standard deviation c to every pixel and channel.",
        (0.04, 0.06, 0.08, 0.09, 0.10),
        f"{_M}:gaussian_noise",
    ),
    Corruption(
        "shot_noise",
        "Replaces every value x by Poisson(x * c) / c, photon noise at c photons for full white.",
        (500, 250, 100, 75, 50),
        f"{_M}:shot_noise",
    ),
    Corruption(
        "impulse_noise",
        "Sets a fraction c of all pixel values (each channel on its own) to black or white, half each.",
        (0.01, 0.02, 0.03, 0.05, 0.07),
        f"{_M}:impulse_noise",
    ),
    Corruption(
        "gaussian_blur",
        "Blurs each channel with a Gaussian of standard deviation c pixels, edges repeated outwards.",
        (0.4, 0.6, 0.7, 0.8, 1.0),
        f"{_M}:gaussian_blur",
    ),
    Corruption(
        "contrast",
        "Scales each channel's deviations from its per-image mean by c.",
        (0.75, 0.5, 0.4, 0.3, 0.15),
        f"{_M}:contrast",
    ),
    Corruption(
        "brightness",
        "Adds c to the value channel in HSV (the pixel itself for grayscale), hue and saturation kept.",
        (0.05, 0.1, 0.15, 0.2, 0.3),
        f"{_M}:brightness",
    ),
    Corruption(
        "pixelate",
        "Shrinks the image to a fraction c of its side with a box filter and enlarges it back.",
        (0.95, 0.9, 0.85, 0.75, 0.65),
        f"{_M}:pixelate",
    ),
    Corruption(
        "jpeg",
        "Encodes the image as JPEG at quality c and decodes it again.",
        (80, 65, 58, 50, 40),
        f"{_M}:jpeg",
    ),
)

CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in _TABLE}
CORRUPTION_NAMES: tuple[str, ...] = tuple(CORRUPTIONS)


def check_corruption(name: str, severity: int) -> Corruption:
    """The registry entry for ``name``; ValueError naming the bad value and the valid ones."""
    if not isinstance(name, str) or name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r} (choose from: {', '.join(CORRUPTION_NAMES)})")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        valid = ", ".join(map(str, SEVERITIES))
        raise ValueError(f"{name}: severity must be one of {valid}, got {severity!r}")
    return CORRUPTIONS[name]
