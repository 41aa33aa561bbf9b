"""Study configuration: schema validation, the study's rules, and one typed settings object per run.

The workflow calls :func:`validate_config` before any job starts, so a typo or an impossible setting
fails with one message naming the key, the bad value and what is allowed, and nothing is written.
Defaults live in the schema only (``schema/config.schema.yaml``, filled in while validating); the
names it allows (norms, models, datasets, corruptions, protocols) come from :mod:`normres.registry`.
:class:`RunSettings` is what one training job depends on, and nothing else: a frozen dataclass whose
fields consumers read, and whose :meth:`RunSettings.to_dict` is the train rule's ``params`` (so that
changing a setting reruns exactly the runs it touches).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from normres import registry as R
from normres.errors import ConfigError

RUNS_ROOT = Path("results/runs")

__all__ = [
    "RUNS_ROOT",
    "BnStatisticsSettings",
    "Config",
    "ConfigError",
    "RobustnessSettings",
    "RunSettings",
    "RunSpec",
    "load_config",
    "load_schema",
    "protocols",
    "run_dir",
    "validate_config",
]


@dataclass(frozen=True, order=True)
class RunSpec:
    """One training job: the wildcards of the workflow's train rule."""

    study: str
    norm: str
    depth: int
    batch_size: int
    seed: int

    @property
    def run_dir(self) -> Path:
        return run_dir(self.study, self.norm, self.depth, self.batch_size, self.seed)


def run_dir(study: str, norm: str, depth: int, batch_size: int, seed: int, root: Path = RUNS_ROOT) -> Path:
    """Directory of one run; the one place that knows the results path convention."""
    return Path(root) / study / norm / f"n{depth}_b{batch_size}" / f"seed{seed}"


# ---------------------------------------------------------------------------------------------
# Typed settings


@dataclass(frozen=True)
class OptimizerSettings:
    name: str
    lr: float  # already scaled by batch_size / reference_batch_size where that is set
    momentum: float
    nesterov: bool
    weight_decay: float
    gate_lr_mult: float


@dataclass(frozen=True)
class ScheduleSettings:
    name: str
    milestones: tuple[int, ...]
    gamma: float


@dataclass(frozen=True)
class AugmentSettings:
    crop_pad: int
    flip: bool
    rotation: float
    brightness: float
    contrast: float


@dataclass(frozen=True)
class RunSettings:
    """Everything one training job depends on (nanoGPT's GPTConfig, for a run).

    ``norm_class``/``norm_sha256`` identify a user's layer (None for built-in layers): the hash of
    its source file is part of the settings, so editing the file reruns exactly the runs using it.
    """

    study: str
    norm: str
    depth: int
    batch_size: int
    seed: int
    dataset: str
    model: str
    epochs: int
    val_size: int
    train_subset: int | None
    test_subset: int | None
    split_seed: int
    input_norm: str
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    augment: AugmentSettings
    norm_options: Mapping[str, Any]
    norm_class: str | None
    norm_sha256: str | None
    l1: float
    eval_test_every_epoch: bool
    compile: bool
    bf16: bool
    deterministic: bool
    tf32: bool

    @property
    def spec(self) -> RunSpec:
        return RunSpec(self.study, self.norm, self.depth, self.batch_size, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able settings with keys in one order: reordering a config file must not rerun
        jobs (Snakemake compares the params' text)."""
        return _sorted_keys(_plain(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSettings:
        """The inverse of :meth:`to_dict`; ValueError naming a missing or unknown key."""
        nested = {"optimizer": OptimizerSettings, "schedule": ScheduleSettings, "augment": AugmentSettings}
        values = _fields_of(cls, data, "settings")
        for key, kind in nested.items():
            values[key] = kind(**_fields_of(kind, data[key], f"settings.{key}"))
        values["schedule"] = ScheduleSettings(**{**asdict(values["schedule"]),
                                                 "milestones": tuple(values["schedule"].milestones)})  # fmt: skip
        values["norm_options"] = dict(values["norm_options"])
        return cls(**values)

    def with_changes(self, **changes: Any) -> RunSettings:
        """A copy with some top-level fields replaced (tests, benchmarks)."""
        return RunSettings.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class BnStatisticsSettings:
    """The batch-statistics analysis of one run (Wu & Johnson 2021)."""

    precise_images: int | None
    batch_size: int  # of the test-batch statistics


@dataclass(frozen=True)
class RobustnessSettings:
    """The corruption analysis of one run (Hendrycks & Dietterich 2019; Schneider et al. 2020)."""

    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    images: int  # first this many test images
    adapt: bool


def _fields_of(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = [f.name for f in fields(cls)]
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    if missing := [n for n in names if n not in data]:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    if unknown := sorted(set(data) - set(names)):
        raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)}")
    return {n: data[n] for n in names}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    return value


# ---------------------------------------------------------------------------------------------
# Schema


@cache
def protocols() -> dict[str, dict[str, Any]]:
    """Published protocols and their reported accuracies (``normres/published.yaml``)."""
    return yaml.safe_load(resources.files("normres").joinpath("published.yaml").read_text())


@cache
def _base_schema() -> dict[str, Any]:
    return yaml.safe_load(resources.files("normres").joinpath("schema/config.schema.yaml").read_text())


def load_schema(user_norms: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config schema, with the registry's names (and ``user_norms``) filled in."""
    from normres.corruption_specs import CORRUPTION_NAMES  # torch-free names

    schema = copy.deepcopy(_base_schema())
    defs = schema["$defs"]
    names = R.norm_names(user_norms)
    defs["norm_name"] = {"enum": names}
    defs["dataset_name"] = {"enum": list(R.DATASETS)}
    defs["model_name"] = {"enum": list(R.MODELS)}
    defs["corruption_name"] = {"enum": list(CORRUPTION_NAMES)}
    options = {
        n.name: {"type": "object", "additionalProperties": False,
                 "properties": {o.name: o.json_schema() for o in n.options}}
        for n in R.NORMS.values()
    }  # fmt: skip
    options |= {name: {"type": "object"} for name in user_norms}  # checked by probing the layer
    defs["norm_options"] = {"type": "object", "additionalProperties": False, "properties": options}
    study = defs["study"]["properties"]
    study["protocol"] = {**study["protocol"], "enum": [*protocols(), None]}
    study["robustness"]["properties"]["corruptions"]["default"] = list(CORRUPTION_NAMES)
    return schema


def _with_defaults(validator_class: type) -> type:
    """A validator that fills in schema defaults while it validates (jsonschema's documented recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _where(path: Iterator[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _schema_check(cfg: dict[str, Any], schema: dict[str, Any]) -> None:
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        value = "" if err.validator in ("additionalProperties", "required") else f" (got {err.instance!r})"
        raise ConfigError(f"config error at {_where(err.absolute_path)}: {err.message}{value}")


# ---------------------------------------------------------------------------------------------
# The validated config


@dataclass(frozen=True)
class Config:
    """A validated config: the settings with defaults filled in (``raw``, JSON-able) and the layers
    it can use (built-in and the config's own, probed)."""

    raw: dict[str, Any]
    norms: Mapping[str, R.NormDef]

    @property
    def studies(self) -> dict[str, dict[str, Any]]:
        return self.raw["studies"]

    @property
    def data(self) -> dict[str, Any]:
        return self.raw["data"]

    @property
    def user_norms(self) -> dict[str, R.NormDef]:
        return {k: v for k, v in self.norms.items() if v.user is not None}

    @property
    def norm_order(self) -> list[str]:
        """Every layer name, built-in ones first (plot order)."""
        return list(self.norms)

    def study(self, name: str) -> dict[str, Any]:
        if name not in self.studies:
            raise ConfigError(f"unknown study {name!r} (choose from: {', '.join(self.studies)})")
        return self.studies[name]

    def runs(self, study: str | None = None) -> list[RunSpec]:
        """Every (study, norm, depth, batch size, seed), once each, sorted."""
        runs = set()
        for name, s in self.studies.items():
            if study is not None and name != study:
                continue
            for grid in s["grid"]:
                for norm, depth, bs, seed in itertools.product(grid["norm"], grid["depth"], grid["batch_size"], s["seeds"]):
                    runs.add(RunSpec(name, norm, depth, bs, seed))
        return sorted(runs)

    def study_norms(self, study: str) -> list[str]:
        """The study's norms in the order its grids name them."""
        return list(dict.fromkeys(n for g in self.study(study)["grid"] for n in g["norm"]))

    def reference_norm(self, study: str) -> str:
        s = self.study(study)
        return s["reference_norm"] or s["grid"][0]["norm"][0]

    def datasets(self) -> list[str]:
        """The datasets the studies use (only these are prepared)."""
        return sorted({s["dataset"] for s in self.studies.values()})

    def norm_options(self, study: str, norm: str) -> dict[str, Any]:
        """A layer's constructor options in a study: the user layer's own, then the study's."""
        base = self.raw["norms"][norm]["options"] if norm in self.user_norms else {}
        return {**base, **self.study(study)["norm_options"].get(norm, {})}

    def run_settings(self, spec: RunSpec) -> RunSettings:
        s = self.study(spec.study)
        opt = dict(s["optimizer"])
        ref = opt.pop("reference_batch_size")
        if ref:
            opt["lr"] = opt["lr"] * spec.batch_size / ref
        norm = self.norms[spec.norm]
        return RunSettings(
            **asdict(spec),
            dataset=s["dataset"],
            model=s["model"],
            epochs=s["epochs"],
            val_size=s["val_size"],
            train_subset=s["train_subset"],
            test_subset=s["test_subset"],
            split_seed=s["split_seed"],
            input_norm=s["input_norm"],
            optimizer=OptimizerSettings(**opt),
            schedule=ScheduleSettings(s["schedule"]["name"], tuple(s["schedule"]["milestones"]), s["schedule"]["gamma"]),
            augment=AugmentSettings(**s["augment"]),
            norm_options=self.norm_options(spec.study, spec.norm),
            norm_class=norm.user,
            norm_sha256=norm.sha256,
            l1=float(s["l1"].get(spec.norm, 0.0)),
            eval_test_every_epoch=s["eval_test_every_epoch"],
            compile=s["compile"],
            bf16=s["bf16"],
            deterministic=s["deterministic"],
            tf32=s["tf32"],
        )

    def test_images(self, study: str) -> int:
        s = self.study(study)
        return s["test_subset"] or R.get_dataset(s["dataset"]).test_images

    def bn_statistics_settings(self, spec: RunSpec) -> BnStatisticsSettings:
        b = self.study(spec.study)["bn_statistics"]
        return BnStatisticsSettings(b["precise_images"], b["batch_size"] or spec.batch_size)

    def robustness_settings(self, study: str) -> RobustnessSettings:
        r = self.study(study)["robustness"]
        return RobustnessSettings(tuple(r["corruptions"]), tuple(sorted(r["severities"])),
                                  r["images"] or self.test_images(study), r["adapt"])  # fmt: skip

    def has_bn_statistics(self, spec: RunSpec) -> bool:
        return self.study(spec.study)["bn_statistics"]["enabled"] and self.norms[spec.norm].running_stats

    def has_robustness(self, study: str) -> bool:
        return self.study(study)["robustness"]["enabled"]


def validate_config(raw: Mapping[str, Any], base_dir: str | Path = ".") -> Config:
    """A validated :class:`Config` from a config mapping; :class:`ConfigError` naming the bad key.

    ``base_dir``: the folder user layers' file paths are relative to (the config file's).
    User layers are imported and probed on a small batch here, before any job starts.
    """
    cfg = copy.deepcopy(dict(raw))
    user = cfg.get("norms")
    user_names = tuple(user) if isinstance(user, Mapping) else ()
    _schema_check(cfg, load_schema(tuple(n for n in user_names if n not in R.NORMS)))
    norms: dict[str, R.NormDef] = dict(R.NORMS)
    if cfg["norms"]:
        from normres.norms.user import load_user_norms  # imports torch: only for configs that need it

        norms |= load_user_norms(cfg, Path(base_dir))
    config = Config(cfg, norms)
    for name in cfg["studies"]:
        _check_study(config, name)
    return config


def _check_study(config: Config, name: str) -> None:
    study = config.study(name)
    where = f"config error at studies.{name}"
    model = R.get_model(study["model"])
    dataset = R.get_dataset(study["dataset"])
    epochs = study["epochs"]
    for m in study["schedule"]["milestones"]:
        if not 1 <= m <= epochs:
            raise ConfigError(f"{where}.schedule.milestones: milestone {m} is outside the epoch range 1..{epochs}")
    for i, grid in enumerate(study["grid"]):
        if model.fixed_depth is not None and grid["depth"] != [model.fixed_depth]:
            raise ConfigError(
                f"{where}.grid[{i}].depth: the {model.name} has a single size, depth must be "
                f"[{model.fixed_depth}] (got {grid['depth']})"
            )
    used = config.study_norms(name)
    for norm in used:
        depths = {d for g in study["grid"] if norm in g["norm"] for d in g["depth"]}
        for depth in sorted(depths):
            try:
                R.check_norm_options(config.norms[norm], study["norm_options"].get(norm, {}), model.norm_channels(depth))
            except ValueError as exc:
                raise ConfigError(f"{where}.norm_options.{norm}: {exc}") from None
    if study["reference_norm"] is not None and study["reference_norm"] not in used:
        raise ConfigError(
            f"{where}.reference_norm: {study['reference_norm']!r} is not one of the study's norms "
            f"(choose from: {', '.join(used)})"
        )
    _check_sizes(study, dataset, where)
    if study["protocol"] is not None:
        _check_protocol(study, where)


def _check_sizes(study: dict[str, Any], dataset: R.DatasetDef, where: str) -> None:
    """Every setting that depends on the dataset's size, before any job starts."""
    n = dataset.train_images
    if study["val_size"] >= n:
        raise ConfigError(
            f"{where}.val_size: {study['val_size']} validation images leave none of the {n} training images "
            f"of {dataset.name} for training (at most {n - 1})"
        )
    left = n - study["val_size"]
    if study["train_subset"] is not None and study["train_subset"] > left:
        raise ConfigError(
            f"{where}.train_subset: {study['train_subset']} exceeds the {left} training images of {dataset.name} "
            f"left after val_size {study['val_size']}"
        )
    train = study["train_subset"] or left
    sizes = sorted({b for g in study["grid"] for b in g["batch_size"]})
    if sizes[-1] > train:
        raise ConfigError(
            f"{where}.grid: batch size {sizes[-1]} exceeds the {train} training images of the study"
        )
    if study["test_subset"] is not None and study["test_subset"] > dataset.test_images:
        raise ConfigError(
            f"{where}.test_subset: {study['test_subset']} exceeds the {dataset.test_images} test images of {dataset.name}"
        )
    test = study["test_subset"] or dataset.test_images
    images = study["robustness"]["images"]
    if images is not None and images > test:
        raise ConfigError(f"{where}.robustness.images: {images} exceeds the study's {test} test images")
    batch = study["bn_statistics"]["batch_size"]
    if batch is not None and batch > test:
        raise ConfigError(f"{where}.bn_statistics.batch_size: {batch} exceeds the study's {test} test images")


def _check_protocol(study: dict[str, Any], where: str) -> None:
    """A study naming a protocol must use its settings (so that published numbers compare)."""
    name = study["protocol"]
    want = protocols()[name]["settings"]

    def compare(expected: Any, actual: Any, key: str) -> None:
        if isinstance(expected, Mapping):
            for k, v in expected.items():
                compare(v, (actual or {}).get(k), f"{key}.{k}")
        elif expected != actual and not (isinstance(expected, list) and list(actual or []) == expected):
            raise ConfigError(
                f"{where}.{key}: protocol {name!r} ({protocols()[name]['title']}) uses {expected!r} "
                f"(got {actual!r}); change the setting or drop `protocol`"
            )

    for key, expected in want.items():
        if key == "norm_options":  # only for the norms the study runs
            used = {n for g in study["grid"] for n in g["norm"]}
            for norm, options in expected.items():
                if norm in used:
                    compare(options, study["norm_options"].get(norm, {}), f"norm_options.{norm}")
        else:
            compare(expected, study[key], key)


def load_config(path: str | Path) -> Config:
    """Read a YAML config file and validate it (user layers' paths are relative to its folder)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    return validate_config(raw, path.parent)
