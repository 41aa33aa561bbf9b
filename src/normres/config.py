"""Study configuration: validation against the JSON schema, semantic checks, and expansion into runs.

The workflow calls :func:`validate_config` before any job starts, so a typo or an impossible setting
fails with one message naming the key, the bad value and what is allowed, and nothing is written.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from normres.specs import check_norm, norm_channels

RUNS_ROOT = Path("results/runs")


class ConfigError(ValueError):
    """A configuration value that the study cannot run with."""


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


@cache
def load_schema() -> dict[str, Any]:
    text = resources.files("normres").joinpath("schema/config.schema.yaml").read_text()
    return yaml.safe_load(text)


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


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled in; raise :class:`ConfigError`."""
    cfg = copy.deepcopy(dict(config))
    validator = _with_defaults(jsonschema.Draft202012Validator)(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        value = "" if err.validator in ("additionalProperties", "required") else f" (got {err.instance!r})"
        raise ConfigError(f"config error at {_where(err.absolute_path)}: {err.message}{value}")
    for name, study in cfg["studies"].items():
        _check_study(name, study)
    return cfg


def _check_study(name: str, study: dict[str, Any]) -> None:
    where = f"config error at studies.{name}"
    epochs = study["epochs"]
    for m in study["schedule"]["milestones"]:
        if not 1 <= m <= epochs:
            raise ConfigError(
                f"{where}.schedule.milestones: milestone {m} is outside the epoch range 1..{epochs}"
            )
    if study["model"] == "cnn":
        for i, grid in enumerate(study["grid"]):
            if grid["depth"] != [1]:
                raise ConfigError(
                    f"{where}.grid[{i}].depth: the cnn has a single size, depth must be [1] (got {grid['depth']})"
                )
    for i, grid in enumerate(study["grid"]):
        for norm, depth in itertools.product(grid["norm"], grid["depth"]):
            options = study["norm_options"].get(norm, {})
            try:
                check_norm(norm, norm_channels(study["model"], depth), **options)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}.norm_options.{norm}: {exc}") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    return validate_config(raw)


def expand_runs(config: Mapping[str, Any]) -> list[RunSpec]:
    """Every (study, norm, depth, batch size, seed) of a validated config, once each, sorted."""
    runs = set()
    for study_name, study in config["studies"].items():
        for grid in study["grid"]:
            for norm, depth, bs, seed in itertools.product(
                grid["norm"], grid["depth"], grid["batch_size"], study["seeds"]
            ):
                runs.add(RunSpec(study_name, norm, depth, bs, seed))
    return sorted(runs)


def run_settings(config: Mapping[str, Any], spec: RunSpec) -> dict[str, Any]:
    """The settings one training job depends on, and nothing else.

    The workflow passes this as the train rule's ``params``: changing a study's setting changes the
    params of that study's jobs only (and of one norm's jobs only for ``norm_options`` and ``l1``),
    so Snakemake reruns exactly those.
    """
    if spec.study not in config["studies"]:
        raise ConfigError(f"unknown study '{spec.study}' (choose from: {', '.join(config['studies'])})")
    study = config["studies"][spec.study]
    opt = dict(study["optimizer"])
    ref = opt.pop("reference_batch_size")
    if ref:
        opt["lr"] = opt["lr"] * spec.batch_size / ref
    return _sorted_keys({
        **asdict(spec),
        "dataset": study["dataset"],
        "model": study["model"],
        "epochs": study["epochs"],
        "val_size": study["val_size"],
        "train_subset": study["train_subset"],
        "test_subset": study["test_subset"],
        "split_seed": study["split_seed"],
        "optimizer": opt,
        "schedule": dict(study["schedule"]),
        "augment": dict(study["augment"]),
        "norm_options": dict(study["norm_options"].get(spec.norm, {})),
        "l1": float(study["l1"].get(spec.norm, 0.0)),
        "eval_test_every_epoch": study["eval_test_every_epoch"],
        "compile": study["compile"],
        "bf16": study["bf16"],
    })


def _sorted_keys(value: Any) -> Any:
    """The same settings with keys in one order: reordering a config file must not rerun jobs
    (Snakemake compares the params' text)."""
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    return value


def datasets(config: Mapping[str, Any]) -> list[str]:
    """The datasets the config's studies use (only these are prepared)."""
    return sorted({s["dataset"] for s in config["studies"].values()})
