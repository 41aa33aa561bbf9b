"""Every name of the study, defined once: normalization layers, models, datasets and figures.

The config schema's enums, the workflow's wildcard constraints, the command line's choices, the
order and colours of the plots, the report's descriptions and the notebook all read these tables;
nothing else writes a norm, model, dataset or figure name. Adding a layer is one entry in
:data:`NORMS` (plus its class); a user's own layer is an entry built from a config's ``norms:``
section (:func:`user_norm`), and from then on it is treated like the built-in ones.

Importing this module does not import torch: the Snakefile validates the config and names every
output on every invocation (dry runs included), and a torch import would cost seconds there.
Constructors are therefore named as ``"module:attribute"`` strings and imported on use
(:func:`load_object`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "DATASETS",
    "FIGURES",
    "MODELS",
    "NORMS",
    "DatasetDef",
    "FigureDef",
    "ModelDef",
    "NormDef",
    "Option",
    "check_norm_options",
    "get_dataset",
    "get_model",
    "get_norm",
    "load_object",
    "norm_colour",
    "norm_names",
    "norm_rank",
    "resolve_groups",
    "user_norm",
]


# ---------------------------------------------------------------------------------------------
# Options of a layer


@dataclass(frozen=True)
class Option:
    """One keyword option of a layer's constructor: its JSON type and bounds.

    The default is the constructor's own (``normres norms`` reads it from the signature), so it is
    written in one place.
    """

    name: str
    type: str  # JSON schema type: "number", "integer" or "boolean"
    description: str
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False  # None is a valid value (e.g. momentum None: cumulative average)

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": [self.type, "null"] if self.nullable else self.type,
                                  "description": self.description}  # fmt: skip
        for key, value in (("minimum", self.minimum), ("exclusiveMinimum", self.exclusive_minimum),
                           ("maximum", self.maximum)):  # fmt: skip
            if value is not None:
                schema[key] = value
        return schema

    def check(self, owner: str, value: Any) -> None:
        """ValueError naming ``owner.name`` when ``value`` breaks the type or a bound."""
        where = f"{owner}: option {self.name}"
        if value is None:
            if not self.nullable:
                raise ValueError(f"{where} must not be null")
            return
        if self.type == "boolean":
            ok = isinstance(value, bool)
        elif self.type == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"{where} must be of type {self.type}, got {value!r}")
        if self.type == "boolean":
            return
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{where} must be >= {self.minimum}, got {value!r}")
        if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
            raise ValueError(f"{where} must be > {self.exclusive_minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{where} must be <= {self.maximum}, got {value!r}")


EPS = Option("eps", "number", "Added to the variance before the square root.", exclusive_minimum=0)
MOMENTUM = Option(
    "momentum", "number", "Weight of the newest batch in the running averages (null: cumulative average).",
    exclusive_minimum=0, maximum=1, nullable=True,
)  # fmt: skip
GROUPS = Option("groups", "integer", "Number of groups (must divide every layer's channels).", minimum=1)
CHANNELS_PER_GROUP = Option("channels_per_group", "integer", "Channels per group (instead of groups).", minimum=1)


def resolve_groups(num_channels: int, groups: int | None = None, channels_per_group: int | None = None) -> int:
    """Number of group-norm groups for ``num_channels``; ValueError naming the numbers if invalid.

    Without either option, 32 groups (Wu & He 2018's default).
    """
    if groups is not None and channels_per_group is not None:
        raise ValueError(
            f"give either groups or channels_per_group, not both "
            f"(got groups={groups}, channels_per_group={channels_per_group})"
        )
    if channels_per_group is not None:
        if num_channels % channels_per_group:
            raise ValueError(f"{channels_per_group} channels per group do not divide {num_channels} channels")
        return num_channels // channels_per_group
    groups = 32 if groups is None else groups
    if groups > num_channels:
        raise ValueError(f"{groups} groups do not divide {num_channels} channels (more groups than channels)")
    if num_channels % groups:
        raise ValueError(f"{groups} groups do not divide {num_channels} channels")
    return groups


def _check_groups(num_channels: int, options: Mapping[str, Any]) -> None:
    resolve_groups(num_channels, options.get("groups"), options.get("channels_per_group"))


# ---------------------------------------------------------------------------------------------
# Normalization layers


@dataclass(frozen=True)
class NormDef:
    """A normalization layer: how to build it and what it is.

    ``factory`` names a constructor ``(num_channels, **options) -> nn.Module`` (timm's contract:
    shape- and memory-format-preserving). ``batch_dependent``: the output of one sample depends on
    the others in its batch (in training). ``running_stats``: the layer keeps population statistics
    for eval mode, so the batch-statistics analyses apply to it. ``includes_activation``: the layer
    contains its own nonlinearity (FRN's TLU, EvoNorm), so models leave out the ReLU after it and
    build it with ``apply_act=False`` where no activation follows.
    """

    name: str
    factory: str
    title: str
    normalizes_over: str
    description: str
    citation: str
    batch_dependent: bool
    running_stats: bool = False
    includes_activation: bool = False
    options: tuple[Option, ...] = ()
    check: Callable[[int, Mapping[str, Any]], None] | None = None  # channel-dependent option checks
    user: str | None = None  # for a user's layer: the config's class reference
    sha256: str | None = None  # for a user's layer: hash of its source file

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)


_NORMS: tuple[NormDef, ...] = (
    NormDef(
        name="torch_bn",
        factory="normres.norms.classic:TorchBatchNorm",
        title="PyTorch BatchNorm2d",
        normalizes_over="(N, H, W) per channel",
        description="PyTorch's BatchNorm2d: statistics per channel over the batch and spatial axes "
        "(N, H, W), running averages in eval mode.",
        citation="Ioffe & Szegedy 2015, Batch Normalization: Accelerating Deep Network Training by "
        "Reducing Internal Covariate Shift (ICML)",
        batch_dependent=True,
        running_stats=True,
        options=(EPS, MOMENTUM),
    ),
    NormDef(
        name="bn",
        factory="normres.norms.classic:BatchNorm",
        title="Batch norm",
        normalizes_over="(N, H, W) per channel",
        description="Batch norm: statistics per channel over the batch and spatial axes (N, H, W), "
        "running averages in eval mode.",
        citation="Ioffe & Szegedy 2015, Batch Normalization: Accelerating Deep Network Training by "
        "Reducing Internal Covariate Shift (ICML)",
        batch_dependent=True,
        running_stats=True,
        options=(EPS, MOMENTUM),
    ),
    NormDef(
        name="in",
        factory="normres.norms.classic:InstanceNorm",
        title="Instance norm",
        normalizes_over="(H, W) per sample and channel",
        description="Instance norm: statistics per sample and channel over the spatial axes (H, W), "
        "in training and eval alike.",
        citation="Ulyanov, Vedaldi & Lempitsky 2016, Instance Normalization: The Missing Ingredient for "
        "Fast Stylization (arXiv:1607.08022)",
        batch_dependent=False,
        options=(EPS,),
    ),
    NormDef(
        name="bin",
        factory="normres.norms.classic:BatchInstanceNorm",
        title="Batch-instance norm",
        normalizes_over="(N, H, W) and (H, W), mixed per channel",
        description="Batch-instance norm: a learned per-channel mix rho of batch statistics over "
        "(N, H, W) and instance statistics over (H, W).",
        citation="Nam & Kim 2018, Batch-Instance Normalization for Adaptively Style-Invariant Neural "
        "Networks (NeurIPS)",
        batch_dependent=True,
        running_stats=True,
        options=(EPS, MOMENTUM),
    ),
    NormDef(
        name="ln",
        factory="normres.norms.classic:LayerNorm",
        title="Layer norm",
        normalizes_over="(C, H, W) per sample",
        description="Layer norm: statistics per sample over all channels and spatial axes (C, H, W).",
        citation="Ba, Kiros & Hinton 2016, Layer Normalization (arXiv:1607.06450)",
        batch_dependent=False,
        options=(EPS,),
    ),
    NormDef(
        name="gn",
        factory="normres.norms.classic:GroupNorm",
        title="Group norm",
        normalizes_over="(C/G, H, W) per sample and group",
        description="Group norm: statistics per sample over each group of channels and the spatial "
        "axes (C/G, H, W).",
        citation="Wu & He 2018, Group Normalization (ECCV)",
        batch_dependent=False,
        options=(GROUPS, CHANNELS_PER_GROUP, EPS),
        check=_check_groups,
    ),
    NormDef(
        name="nn",
        factory="normres.norms.classic:Identity",
        title="No normalization",
        normalizes_over="nothing",
        description="No normalization: the identity, no statistics.",
        citation="(baseline)",
        batch_dependent=False,
        options=(EPS,),  # accepted and ignored, so that configs stay uniform
    ),
    NormDef(
        name="brn",
        factory="normres.norms.literature:BatchRenorm",
        title="Batch renorm",
        normalizes_over="(N, H, W) per channel, corrected towards the running averages",
        description="Batch renormalization: batch norm whose batch statistics are corrected towards the "
        "running averages (r = sigma_B / sigma, d = (mu_B - mu) / sigma, clipped to a bound relaxed on a "
        "schedule, not differentiated); running averages in eval mode.",
        citation="Ioffe 2017, Batch Renormalization: Towards Reducing Minibatch Dependence in "
        "Batch-Normalized Models (NeurIPS)",
        batch_dependent=True,
        running_stats=True,
        options=(
            EPS,
            MOMENTUM,
            Option("r_max", "number", "Bound on the correction r (and 1/r) once relaxed.", minimum=1),
            Option("d_max", "number", "Bound on the correction |d| once relaxed.", minimum=0),
            Option("warmup_steps", "integer", "Training steps of plain batch norm (r = 1, d = 0) before "
                   "the bounds are relaxed.", minimum=0),  # fmt: skip
            Option("r_max_ramp_steps", "integer", "Steps after the warm-up over which the bound on r "
                   "rises linearly from 1 to r_max.", minimum=0),  # fmt: skip
            Option("d_max_ramp_steps", "integer", "Steps after the warm-up over which the bound on |d| "
                   "rises linearly from 0 to d_max.", minimum=0),  # fmt: skip
        ),
    ),
    NormDef(
        name="gbn",
        factory="normres.norms.literature:GhostBatchNorm",
        title="Ghost batch norm",
        normalizes_over="(samples of a ghost batch, H, W) per channel",
        description="Ghost batch norm: batch norm over each ghost batch of virtual_batch_size samples "
        "(N, H, W within it) in training, running averages in eval mode.",
        citation="Hoffer, Hubara & Soudry 2017, Train longer, generalize better: closing the "
        "generalization gap in large batch training of neural networks (NeurIPS)",
        batch_dependent=True,
        running_stats=True,
        options=(
            Option("virtual_batch_size", "integer", "Samples per ghost batch (the last one may be smaller; "
                   "a batch no larger is plain batch norm).", minimum=2),  # fmt: skip
            EPS,
            MOMENTUM,
        ),
    ),
    NormDef(
        name="frn",
        factory="normres.norms.literature:FilterResponseNorm",
        title="Filter response norm + TLU",
        normalizes_over="(H, W) per sample and channel, uncentred",
        description="Filter response normalization: x divided by the root mean square over (H, W) per "
        "sample and channel (no mean subtracted), then a per-channel affine and the thresholded linear "
        "unit max(y, tau).",
        citation="Singh & Krishnan 2020, Filter Response Normalization Layer: Eliminating Batch "
        "Dependence in the Training of Deep Neural Networks (CVPR)",
        batch_dependent=False,
        includes_activation=True,
        options=(
            EPS,
            Option("learned_eps", "boolean", "Add a learned |eps_l| (initialised to 1e-4) to eps, the "
                   "paper's variant for small activation maps."),  # fmt: skip
        ),
    ),
    NormDef(
        name="evonorm_b0",
        factory="normres.norms.literature:EvoNormB0",
        title="EvoNorm-B0",
        normalizes_over="(N, H, W) per channel and (H, W) per sample and channel",
        description="EvoNorm-B0: x / max(sqrt(s2_B + eps), v * x + sqrt(s2_I + eps)) * gamma + beta, with "
        "the batch variance s2_B over (N, H, W) (running average in eval mode) and the instance "
        "variance s2_I over (H, W); a normalization and activation in one.",
        citation="Liu, Brock, Simonyan & Le 2020, Evolving Normalization-Activation Layers (NeurIPS)",
        batch_dependent=True,
        running_stats=True,
        includes_activation=True,
        options=(EPS, MOMENTUM),
    ),
    NormDef(
        name="evonorm_s0",
        factory="normres.norms.literature:EvoNormS0",
        title="EvoNorm-S0",
        normalizes_over="(C/G, H, W) per sample and group",
        description="EvoNorm-S0: x * sigmoid(v * x) / sqrt(s2_G + eps) * gamma + beta, with the variance "
        "s2_G per sample over each group of channels and (H, W) (C/G, H, W); a normalization and "
        "activation in one.",
        citation="Liu, Brock, Simonyan & Le 2020, Evolving Normalization-Activation Layers (NeurIPS)",
        batch_dependent=False,
        includes_activation=True,
        options=(GROUPS, CHANNELS_PER_GROUP, EPS),
        # without groups or channels_per_group the layer picks a count that fits (the reference's rule)
        check=lambda channels, options: (
            _check_groups(channels, options) if {"groups", "channels_per_group"} & options.keys() else None
        ),
    ),
)

NORMS: dict[str, NormDef] = {d.name: d for d in _NORMS}

# One colour per layer, in registry order (matplotlib's tab10, then tab20's lighter shades);
# user layers take the colours after the built-in ones.
_PALETTE = (
    "#1f77b4", "#17becf", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd", "#7f7f7f", "#8c564b",
    "#e377c2", "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79",
)  # fmt: skip

USER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def norm_names(extra: Iterable[str] = ()) -> list[str]:
    """The built-in layers in registry order, then ``extra`` (user layers) in the order given."""
    return [*NORMS, *[n for n in extra if n not in NORMS]]


def get_norm(name: str, user: Mapping[str, NormDef] | None = None) -> NormDef:
    """The definition of layer ``name`` (a built-in one, or one of ``user``)."""
    return _lookup({**NORMS, **(user or {})}, "norm", name)


def norm_rank(name: str, order: Sequence[str] = ()) -> tuple[int, str]:
    """Sort key: registry order, then ``order`` (user layers), then by name."""
    names = norm_names(order)
    return (names.index(name), "") if name in names else (len(names), str(name))


def norm_colour(name: str, order: Sequence[str] = ()) -> str:
    """The layer's colour: fixed per built-in layer; user layers in the order of ``order``."""
    names = norm_names(order)
    index = names.index(name) if name in names else len(names) + sorted(set(order) | {name}).index(name)
    return _PALETTE[index % len(_PALETTE)]


def check_norm_options(norm: NormDef, options: Mapping[str, Any], channels: Iterable[int]) -> None:
    """ValueError naming the bad option or value, for every channel count of a model.

    Builds nothing. A user layer's options are checked by probing the layer instead
    (``normres.norms.user``), since only its signature knows them.
    """
    if norm.user is None:
        allowed = [o.name for o in norm.options]
        for key, value in options.items():
            option = norm.option(key)
            if option is None:
                raise ValueError(f"{norm.name}: unknown option {key!r} (choose from: {', '.join(allowed) or 'none'})")
            option.check(norm.name, value)
    if norm.check is not None:
        for c in channels:
            try:
                norm.check(c, options)
            except ValueError as exc:
                raise ValueError(f"{norm.name}: {exc}") from None


def user_norm(name: str, class_ref: str, sha256: str) -> NormDef:
    """The registry entry of a user's layer (``norms: {name: {class: ...}}`` of a config)."""
    if name in NORMS:
        raise ValueError(f"{name!r} is a built-in norm; give your layer another name")
    if not USER_NAME.match(name):
        raise ValueError(f"norm name {name!r} must be lower case letters, digits and _ (starting with a letter)")
    return NormDef(
        name=name,
        factory=class_ref,
        title=name,
        normalizes_over="(user-defined)",
        description=f"User layer {class_ref}.",
        citation="(user layer)",
        batch_dependent=True,  # until probing says otherwise
        user=class_ref,
        sha256=sha256,
    )


def with_probe(norm: NormDef, *, running_stats: bool, batch_dependent: bool, title: str, description: str | None) -> NormDef:
    """A user layer's entry completed with what probing it found out."""
    return replace(norm, running_stats=running_stats, batch_dependent=batch_dependent, title=title,
                   description=description or norm.description)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelDef:
    """An architecture: its constructor, the channel widths its norm layers see, and its depth rule."""

    name: str
    factory: str
    title: str
    citation: str
    widths: tuple[int, ...]  # channel counts of the norm layers (for option checks)
    fixed_depth: int | None = None  # the only allowed depth, for a model of one size

    def norm_channels(self, depth: int) -> list[int]:
        del depth  # the widths do not depend on the depth for the models here
        return sorted(set(self.widths))

    def layers(self, depth: int) -> int:
        """Number of weight layers, for labels."""
        return 6 * depth + 2 if self.fixed_depth is None else len(self.widths) + 1


MODELS: dict[str, ModelDef] = {
    m.name: m
    for m in (
        ModelDef(
            name="resnet",
            factory="normres.models:CifarResNet",
            title="CIFAR ResNet of 6n+2 layers",
            citation="He, Zhang, Ren & Sun 2016, Deep Residual Learning for Image Recognition (CVPR), "
            "section 4.2",
            widths=(16, 32, 64),
        ),
        ModelDef(
            name="cnn",
            factory="normres.models:SmallCNN",
            title="small CNN of the MNIST study",
            citation="(the MNIST study's network: four 3x3 conv layers, under 20k parameters)",
            widths=(16, 16, 32, 32),
            fixed_depth=1,
        ),
    )
}


def _lookup(table: Mapping[str, Any], kind: str, name: str) -> Any:
    """``table[name]``, or a ValueError naming the bad name and the valid ones."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r} (choose from: {', '.join(table)})") from None


def get_model(name: str) -> ModelDef:
    return _lookup(MODELS, "model", name)


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class DatasetDef:
    """A dataset: its torchvision class (which also supplies the download checksums), its shape,
    size and normalisation constants, and where mirrors keep its files.

    ``idx_md5``: md5 of the decompressed idx files, for copies whose .gz were recompressed (Debian's
    Fashion-MNIST), which torchvision's checksums of the .gz cannot verify.
    """

    name: str
    torchvision_class: str
    channels: int
    height: int
    width: int
    classes: tuple[str, ...]
    train_images: int
    test_images: int
    mean: tuple[float, ...]  # per channel, of pixel/255 over the training set
    std: tuple[float, ...]
    raw_dir: str  # where torchvision keeps the files, relative to its root
    mirror_dirs: tuple[str, ...] = ("",)  # subfolders of a mirror folder to look in ("" = itself)
    idx_md5: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.channels, self.height, self.width)


DATASETS: dict[str, DatasetDef] = {
    d.name: d
    for d in (
        DatasetDef(
            name="cifar10",
            torchvision_class="CIFAR10",
            channels=3,
            height=32,
            width=32,
            classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
            train_images=50000,
            test_images=10000,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),  # of all training pixels (not the often-copied 0.2023, 0.1994, 0.2010)
            raw_dir="cifar-10-batches-py",
            mirror_dirs=("", "cifar-10-batches-py", "cifar10", "cifar-10", "CIFAR10", "cifar10/cifar-10-batches-py"),
        ),
        DatasetDef(
            name="mnist",
            torchvision_class="MNIST",
            channels=1,
            height=28,
            width=28,
            classes=tuple("0123456789"),  # torchvision says "0 - zero", ...
            train_images=60000,
            test_images=10000,
            mean=(0.1307,),
            std=(0.3081,),
            raw_dir="MNIST/raw",
            mirror_dirs=("", "mnist", "MNIST", "MNIST/raw"),
            idx_md5={
                "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
                "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
                "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
                "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
            },
        ),
        DatasetDef(
            name="fashion_mnist",
            torchvision_class="FashionMNIST",
            channels=1,
            height=28,
            width=28,
            classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                     "Bag", "Ankle boot"),  # fmt: skip
            train_images=60000,
            test_images=10000,
            mean=(0.2860,),
            std=(0.3530,),
            raw_dir="FashionMNIST/raw",
            mirror_dirs=("", "fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw"),
            idx_md5={
                "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
            },
        ),
    )
}


def get_dataset(name: str) -> DatasetDef:
    return _lookup(DATASETS, "dataset", name)


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass(frozen=True)
class FigureDef:
    """A figure of the study: the function drawing it, its caption, and where it belongs.

    ``scope``: ``"study"`` (one per study, file ``{study}_{name}.png``) or ``"all"`` (one across
    studies, ``{name}.png``). ``draw`` names ``(tables, study) -> Figure`` (``study`` is None for
    scope "all"); ``applies`` says from a validated study config (and the study's layers) whether the figure has anything to
    show, so that a study without, say, robustness evaluation gets no empty robustness figure.
    ``caption`` is the file in ``normres/captions/`` shared by the HTML report and Snakemake's
    report; ``category``/``subcategory`` group it in Snakemake's report.
    """

    name: str
    scope: str
    draw: str
    caption: str
    category: str
    applies: Callable[[Mapping[str, Any], Mapping[str, NormDef]], bool] = lambda study, norms: True


def _has_batch_sizes(study: Mapping[str, Any], norms: Mapping[str, NormDef]) -> bool:
    sizes: dict[str, set[int]] = {}
    for grid in study["grid"]:
        for norm in grid["norm"]:
            sizes.setdefault(norm, set()).update(grid["batch_size"])
    return any(len(s) > 1 for s in sizes.values())


def _has_running_stats(study: Mapping[str, Any], norms: Mapping[str, NormDef]) -> bool:
    used = {n for grid in study["grid"] for n in grid["norm"]}
    return study["bn_statistics"]["enabled"] and any(norms[n].running_stats for n in used)


def _has_robustness(study: Mapping[str, Any], norms: Mapping[str, NormDef]) -> bool:
    return study["robustness"]["enabled"]


def _has_comparisons(study: Mapping[str, Any], norms: Mapping[str, NormDef]) -> bool:
    return len(study["seeds"]) > 1 and any(len(grid["norm"]) > 1 for grid in study["grid"])


def _has_depths(study: Mapping[str, Any], norms: Mapping[str, NormDef]) -> bool:
    depths: dict[str, set[int]] = {}
    for grid in study["grid"]:
        for norm in grid["norm"]:
            depths.setdefault(norm, set()).update(grid["depth"])
    return any(len(d) > 1 for d in depths.values())


FIGURES: dict[str, FigureDef] = {
    f.name: f
    for f in (
        FigureDef("loss_curves", "study", "normres.plots:loss_curves", "loss_curves.rst", "training curves"),
        FigureDef("accuracy_curves", "study", "normres.plots:accuracy_curves", "accuracy_curves.rst", "training curves"),
        FigureDef("feature_percentiles", "study", "normres.plots:feature_percentiles_of", "feature_percentiles.rst",
                  "feature percentiles"),  # fmt: skip
        FigureDef("batch_size", "study", "normres.plots:small_batch_of", "batch_size.rst", "small batches",
                  applies=_has_batch_sizes),  # fmt: skip
        FigureDef("bn_statistics", "study", "normres.plots:bn_statistics_of", "bn_statistics.rst",
                  "batch statistics", applies=_has_running_stats),  # fmt: skip
        FigureDef("robustness_severity", "study", "normres.plots:robustness_severity_of", "robustness_severity.rst",
                  "robustness", applies=_has_robustness),  # fmt: skip
        FigureDef("robustness_heatmap", "study", "normres.plots:robustness_heatmap_of", "robustness_heatmap.rst",
                  "robustness", applies=_has_robustness),  # fmt: skip
        FigureDef("comparisons", "study", "normres.plots:comparisons_forest", "comparisons.rst", "significance",
                  applies=_has_comparisons),  # fmt: skip
        FigureDef("depth_effect", "all", "normres.plots:depth_effect_of", "depth_effect.rst", "depth",
                  applies=_has_depths),  # fmt: skip
        FigureDef("final_accuracy", "all", "normres.plots:final_accuracy_of", "final_accuracy.rst", "final accuracy"),
    )
}


def figures_for(studies: Mapping[str, Mapping[str, Any]], norms: Mapping[str, NormDef]) -> list[tuple[FigureDef, str | None, str]]:
    """``(figure, study or None, file name)`` of every figure that applies to these (validated)
    studies: a study's figure where it applies to the study, a figure of all studies where it
    applies to any of them."""
    out = []
    for figure in FIGURES.values():
        if figure.scope == "all":
            if any(figure.applies(s, norms) for s in studies.values()):
                out.append((figure, None, f"{figure.name}.png"))
            continue
        for name, study in studies.items():
            if figure.applies(study, norms):
                out.append((figure, name, f"{name}_{figure.name}.png"))
    return out


# ---------------------------------------------------------------------------------------------


def load_object(ref: str) -> Any:
    """The attribute named by ``"package.module:attribute"`` (for the registry's constructors)."""
    module, _, attribute = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj
