"""The two architectures of the study, each taking its normalization layer by name.

* ``resnet``: the CIFAR ResNet of He et al. 2016 ("Deep Residual Learning for Image Recognition",
  section 4.2): 6n+2 layers in three stages of 16/32/64 channels, a normalization layer after every
  convolution and before the activation, a projection shortcut (1x1 conv + norm) where the shape
  changes, global average pooling and one linear layer.
* ``cnn``: the small MNIST-study network (under 20k parameters) whose norm is an argument.

A layer that includes its own nonlinearity (``includes_activation`` in the registry: FRN with TLU,
EvoNorm) replaces the norm + ReLU pair; where no activation follows a norm (before a residual
addition, in a shortcut) it is built with ``apply_act=False``.

Both expose ``features(x) -> (N, F)`` (the pooled features whose percentiles the study tracks) and
``head(features) -> logits`` so that training and evaluation can read the features without hooks.

Model files (:func:`save_model`, :func:`load_model`) hold the weights and what is needed to rebuild the
model, loadable with ``weights_only=True``: nothing stored in a file decides what code runs.

Both compute in the channels_last (NHWC) memory layout by default (:func:`set_memory_format`):
weights are stored that way and inputs are converted on entry. Measured on a 2-core AVX-512 CPU, a ResNet-14 train step then takes 0.70x the
time of the NCHW one (the small CNN 0.6-0.8x, batch 8 0.92x), and channels_last is what GPUs' tensor
cores want too. Every norm layer keeps the layout it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normres import registry as R
from normres.errors import ModelFileError
from normres.io import load_torch, save_torch
from normres.norms import make_norm

__all__ = [
    "MODEL_FORMAT", "ModelConfig", "CifarResNet", "SmallCNN", "build_model", "count_parameters",
    "feature_quantiles", "is_finite", "load_model", "save_model", "set_memory_format",
]  # fmt: skip

MODEL_FORMAT = "normres-model/2"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: saved next to its weights.

    ``norm_class``/``norm_sha256`` record a user layer's reference and source hash: a model file is
    only loaded with the user's own entry for that layer, and they must agree.
    """

    model: str
    norm: str
    depth: int
    in_channels: int
    num_classes: int
    norm_options: Mapping[str, Any] = field(default_factory=dict)
    norm_class: str | None = None
    norm_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "norm_options": dict(self.norm_options)}


class _NormAct:
    """Builds a block's norm layers: ``norm(c)`` followed by a ReLU where ``act`` asks for one, or
    the layer alone when it includes its own nonlinearity."""

    def __init__(self, norm: R.NormDef, options: Mapping[str, Any]) -> None:
        self.norm, self.options = norm, dict(options)

    def norm_layer(self, channels: int, act: bool) -> nn.Module:
        extra = {"apply_act": act} if self.norm.includes_activation else {}
        return make_norm(self.norm, channels, **self.options, **extra)

    def act(self) -> nn.Module:
        return nn.Identity() if self.norm.includes_activation else nn.ReLU(inplace=True)


class BasicBlock(nn.Module):
    """Two 3x3 convs, each followed by the norm; the shortcut projects when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, layers: _NormAct) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = layers.norm_layer(c_out, act=True)
        self.act1 = layers.act()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = layers.norm_layer(c_out, act=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), layers.norm_layer(c_out, act=False))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _pool(x: Tensor) -> Tensor:
    """Global average pooling, (N, C, H, W) -> (N, C). A mean rather than AdaptiveAvgPool2d, whose
    CUDA backward has no deterministic implementation."""
    return x.mean((2, 3))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, CIFAR-10 variant)."""

    memory_format = torch.channels_last  # of inputs and weights; see set_memory_format

    def __init__(self, config: ModelConfig, norm: R.NormDef) -> None:
        super().__init__()
        if config.depth < 1:
            raise ValueError(f"resnet depth n must be >= 1 (got {config.depth})")
        layers = _NormAct(norm, config.norm_options)
        widths = R.get_model(config.model).widths
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, widths[0], 3, 1, 1, bias=False),
            layers.norm_layer(widths[0], act=True),
            layers.act(),
        )
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, width in enumerate(widths):
            for i in range(config.depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride, layers))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], config.num_classes)
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x.contiguous(memory_format=self.memory_format)))  # (N, 64, H/4, W/4)
        return _pool(x)  # (N, 64)

    def head(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """The MNIST study's network: four 3x3 conv + norm + ReLU layers, two max-pools, GAP, linear."""

    memory_format = torch.channels_last  # of inputs and weights; see set_memory_format

    def __init__(self, config: ModelConfig, norm: R.NormDef) -> None:
        super().__init__()
        spec = R.get_model(config.model)
        if config.depth != spec.fixed_depth:
            raise ValueError(f"cnn has a single size: depth must be {spec.fixed_depth} (got {config.depth})")
        layers = _NormAct(norm, config.norm_options)
        modules: list[nn.Module] = []
        c_in = config.in_channels
        for i, width in enumerate(spec.widths):
            modules += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), layers.norm_layer(width, act=True), layers.act()]
            if i in (1, 2):
                modules.append(nn.MaxPool2d(2))
            c_in = width
        self.body = nn.Sequential(*modules)
        self.fc = nn.Linear(c_in, config.num_classes)
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        return _pool(self.body(x.contiguous(memory_format=self.memory_format)))  # (N, 32)

    def head(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _init_weights(model: nn.Module) -> None:
    # He init for convs (fan_out, as torchvision's ResNet); norm layers keep their own init.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_model(
    model: str,
    norm: str | R.NormDef,
    depth: int,
    in_channels: int,
    num_classes: int,
    norm_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build ``model`` (a registry name) with layer ``norm`` (a name, or a registry entry such as a
    user layer's) after every convolution."""
    definition = R.get_model(model)
    norm_def = norm if isinstance(norm, R.NormDef) else R.get_norm(norm)
    config = ModelConfig(model, norm_def.name, depth, in_channels, num_classes, dict(norm_options or {}),
                         norm_def.user, norm_def.sha256)  # fmt: skip
    net = set_memory_format(R.load_object(definition.factory)(config, norm_def), torch.channels_last)
    net.config = config  # type: ignore[assignment]
    return net


def set_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """Store ``model``'s weights and compute in ``memory_format``: ``torch.channels_last`` (NHWC, the
    default of :func:`build_model`) or ``torch.contiguous_format`` (NCHW, PyTorch's default)."""
    model.memory_format = memory_format  # type: ignore[assignment]
    return model.to(memory_format=memory_format)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def is_finite(model: nn.Module) -> bool:
    """Whether every parameter and buffer of ``model`` is finite (a diverged run's may not be)."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


@torch.no_grad()
def feature_quantiles(features: Tensor, qs: tuple[float, ...] = (0.01, 0.2, 0.8, 0.99)) -> list[float]:
    """Percentiles of all pooled feature values (the study's 1st/20th/80th/99th)."""
    flat = features.detach().float().flatten()
    if flat.numel() > 2**24:  # torch.quantile's input limit; a strided sample keeps it exact enough
        flat = flat[:: flat.numel() // 2**24 + 1]
    return torch.quantile(flat, torch.tensor(qs, device=flat.device)).tolist()


# ---------------------------------------------------------------------------------------------
# Model files


def save_model(
    model: nn.Module, dataset: str, classes: list[str], mean: tuple[float, ...], std: tuple[float, ...], path: str | Path
) -> Path:
    """Weights plus everything needed to rebuild and feed the model; loadable with ``weights_only=True``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_torch(
        {
            "format": MODEL_FORMAT,
            "model": model.config.to_dict(),
            "dataset": dataset,
            "classes": list(classes),
            "input": {"mean": list(mean), "std": list(std)},
            "state_dict": state,
        },
        path,
    )


_MODEL_KEYS = {"model": dict, "dataset": str, "classes": list, "input": dict, "state_dict": dict}
_ARCH_KEYS = {f: t for f, t in (("model", str), ("norm", str), ("depth", int), ("in_channels", int),
                                ("num_classes", int), ("norm_options", dict))}  # fmt: skip


def load_model(
    path: str | Path,
    expect: Mapping[str, Any] | None = None,
    user_norms: Mapping[str, R.NormDef] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a normres model file without executing anything stored in it.

    ``expect`` (a norm, depth or model the file must hold) makes a file of another architecture or norm an
    error that says which field differs. A model of a user layer needs that layer's entry in
    ``user_norms`` (from the user's config or command line), with the same class and source hash
    as the file records; the file's reference is never imported.
    """
    blob = load_torch(path, what="model file")
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ModelFileError(f"{path} is not a normres model file (expected format '{MODEL_FORMAT}', found {found!r})")
    for key, kind in _MODEL_KEYS.items():
        if not isinstance(blob.get(key), kind):
            raise ModelFileError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    arch = blob["model"]
    for key, kind in _ARCH_KEYS.items():
        if not isinstance(arch.get(key), kind):
            raise ModelFileError(f"{path}: model field {key!r} is missing or not a {kind.__name__}")
    for key, want in (expect or {}).items():
        if key in arch and arch[key] != want:
            raise ModelFileError(
                f"{path} holds a model with {key}={arch[key]!r}, but {key}={want!r} was expected "
                f"(file: {arch['model']} norm={arch['norm']} depth={arch['depth']})"
            )
    norm = _norm_of(path, arch, user_norms or {})
    try:
        model = build_model(arch["model"], norm, arch["depth"], arch["in_channels"], arch["num_classes"], arch["norm_options"])
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: weights do not fit a {arch['model']} with norm={arch['norm']}: {exc}") from None
    model.eval()
    return model, blob


def _norm_of(path: str | Path, arch: Mapping[str, Any], user_norms: Mapping[str, R.NormDef]) -> R.NormDef:
    """The registry entry to rebuild the file's norm with: a built-in one, or the user's own entry
    for a user layer, checked against what the file records."""
    name, recorded = arch["norm"], arch.get("norm_class")
    if recorded is None:
        return R.get_norm(name)
    given = user_norms.get(name)
    if given is None:
        raise ModelFileError(
            f"{path} holds a model with the user layer {name!r} ({recorded}); normres never imports code "
            f"named in a model file: name the layer yourself, with --config CONFIG (its `norms:` section) "
            f"or --norm-class {name}=path/to/file.py:Class"
        )
    if given.user.rpartition(":")[2] != recorded.rpartition(":")[2] or given.sha256 != arch.get("norm_sha256"):
        raise ModelFileError(
            f"{path} was trained with {name} = {recorded} (source sha256 {str(arch.get('norm_sha256'))[:12]}…), "
            f"but {name} = {given.user} (sha256 {str(given.sha256)[:12]}…) was given: not the same layer"
        )
    return given
