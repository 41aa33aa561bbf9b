"""What the study is made of, without importing torch or matplotlib.

The Snakefile validates the config and names every output on each invocation, dry runs included;
importing torch for that would cost seconds per call. So the names, the options each norm accepts,
the channel widths of each model, the columns of metrics files and the figure names live here,
and ``norms``, ``models``, ``evaluate``, ``aggregate`` and ``plots`` build on them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

NORM_NAMES = ("torch_bn", "bn", "in", "bin", "ln", "gn", "nn")
NORM_OPTIONS: dict[str, set[str]] = {
    "torch_bn": {"eps", "momentum"},
    "bn": {"eps", "momentum"},
    "in": {"eps"},
    "ln": {"eps"},
    "gn": {"eps", "groups", "channels_per_group"},
    "bin": {"eps", "momentum"},
    "nn": {"eps"},
}
DEFAULT_GROUPS = 32

MODELS = ("resnet", "cnn")
RESNET_WIDTHS = (16, 32, 64)  # the three stages of He et al.'s CIFAR ResNet
CNN_WIDTHS = (16, 16, 32, 32)  # the MNIST study's four conv layers

# Columns of a run's metrics.csv: one row per split (train, val, test).
METRIC_COLUMNS = ["split", "accuracy", "micro_f1", "macro_f1", "loss"]


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_name(name: str) -> None:
    if name not in NORM_OPTIONS:
        raise ValueError(f"unknown norm {name!r} (choose from: {', '.join(sorted(NORM_OPTIONS))})")


def check_options(name: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - NORM_OPTIONS[name])
    if unknown:
        allowed = ", ".join(sorted(NORM_OPTIONS[name]))
        raise ValueError(f"{name}: unknown option {unknown[0]!r} (choose from: {allowed})")


def check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def check_momentum(momentum: float | None) -> None:
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")


def resolve_groups(num_channels: int, groups: int | None = None, channels_per_group: int | None = None) -> int:
    """Number of group-norm groups for ``num_channels``; ValueError naming the numbers if invalid."""
    if groups is not None and channels_per_group is not None:
        raise ValueError(
            f"gn: give either groups or channels_per_group, not both "
            f"(got groups={groups}, channels_per_group={channels_per_group})"
        )
    if channels_per_group is not None:
        if not is_positive_int(channels_per_group):
            raise ValueError(f"gn: channels_per_group must be a positive integer, got {channels_per_group!r}")
        if num_channels % channels_per_group:
            raise ValueError(f"gn: {channels_per_group} channels per group do not divide {num_channels} channels")
        return num_channels // channels_per_group
    groups = DEFAULT_GROUPS if groups is None else groups
    if not is_positive_int(groups):
        raise ValueError(f"gn: groups must be a positive integer, got {groups!r}")
    if groups > num_channels:
        raise ValueError(f"gn: {groups} groups do not divide {num_channels} channels (more groups than channels)")
    if num_channels % groups:
        raise ValueError(f"gn: {groups} groups do not divide {num_channels} channels")
    return groups


def check_norm(name: str, channels: Iterable[int], **options: Any) -> None:
    """Raise the ValueError that building norm ``name`` for any of ``channels`` would raise.

    Used to validate a config before any job runs; builds nothing.
    """
    check_name(name)
    check_options(name, options)
    if "eps" in options:
        check_eps(options["eps"])
    if "momentum" in options:
        check_momentum(options["momentum"])
    for c in channels:
        if not is_positive_int(c):
            raise ValueError(f"{name}: channel counts must be positive integers, got {c!r}")
        if name == "gn":
            resolve_groups(c, options.get("groups"), options.get("channels_per_group"))


def norm_channels(model: str, depth: int) -> list[int]:
    """Channel counts of the normalization layers of ``model`` (to validate norm options early)."""
    if model == "resnet":
        return sorted(set(RESNET_WIDTHS))
    if model == "cnn":
        return sorted(set(CNN_WIDTHS))
    raise ValueError(f"unknown model '{model}' (choose from: {', '.join(MODELS)})")


def figure_names(studies: Iterable[str]) -> list[str]:
    """Names (without ``.png``) of the standard figures for these studies, for rule outputs."""
    names: list[str] = []
    for study in sorted(set(map(str, studies))):
        if not study or os.sep in study or "/" in study or study.startswith("."):
            raise ValueError(f"study name {study!r} cannot be part of a file name")
        names += [f"{study}_loss_curves", f"{study}_accuracy_curves", f"{study}_feature_percentiles"]
    return [*names, "batch_size_effect", "depth_effect", "final_accuracy"]
