"""Normalization layers, built by name from :mod:`normres.registry`.

Every constructor takes ``num_channels`` first and keyword options after it (timm's contract), so
model code takes a layer's registry entry instead of switching on names. The layers themselves live
in :mod:`normres.norms.classic` (the seven of the CIFAR study), :mod:`normres.norms.literature` (the
layers since 2017) and the user's own files (:mod:`normres.norms.user`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normres import registry as R
from normres.norms.classic import BatchInstanceNorm

__all__ = [
    "clamp_gates_",
    "describe",
    "gate_parameters",
    "make_norm",
    "running_stat_layers",
]


def make_norm(norm: str | R.NormDef, num_channels: int, *, apply_act: bool | None = None, **options: Any) -> nn.Module:
    """Build layer ``norm`` (a built-in name, or any registry entry) for ``num_channels`` channels.

    ValueError naming the layer for unknown names and for options it does not take or bounds they
    break. ``apply_act`` is the models' switch for layers that include their own nonlinearity (FRN,
    EvoNorm), not an option of the study. A user layer's entry comes from the user's config
    (``normres.norms.user``); its class is imported from there, never from a model file.
    """
    definition = norm if isinstance(norm, R.NormDef) else R.get_norm(norm)
    R.check_norm_options(definition, options, [num_channels])
    if apply_act is not None:
        if not definition.includes_activation:
            raise ValueError(f"{definition.name}: apply_act is only for layers that include their activation")
        options = {**options, "apply_act": apply_act}
    if definition.user is not None:
        from normres.norms.user import layer_class

        return layer_class(definition)(num_channels, **options)
    return R.load_object(definition.factory)(num_channels, **options)


def describe(name: str) -> str:
    """One sentence saying which axes the statistics of layer ``name`` span."""
    return R.get_norm(name).description


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``rho`` gates of every :class:`BatchInstanceNorm` in ``model`` (own lr, no decay)."""
    return [m.rho for m in model.modules() if isinstance(m, BatchInstanceNorm)]


@torch.no_grad()
def clamp_gates_(gates: list[nn.Parameter]) -> None:
    """Clamp batch-instance gates ``rho`` into [0, 1] in place (after each optimizer step)."""
    for rho in gates:
        rho.clamp_(0.0, 1.0)


def running_stat_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that keep running statistics for eval mode: torch's ``_BatchNorm``
    family and every layer with ``running_var``, ``momentum`` and ``reset_running_stats()`` (the
    protocol of ``nn.BatchNorm2d``, which normres's own layers and user layers can follow)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        or (hasattr(m, "running_var") and hasattr(m, "momentum") and callable(getattr(m, "reset_running_stats", None)))
    ]
