"""The study's report: one self-contained HTML page (figures embedded as base64 PNG, inline CSS, no
external references) with the setup, results tables, figures and provenance.

The page is rendered from ``templates/report.html`` with jinja2 (autoescape on, undefined names are
errors) and written atomically.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from normres.io import atomic_path
from normres.plots import NORM_ORDER

__all__ = ["build_report", "collect_provenance", "figure_caption"]

TEMPLATES = Path(__file__).parent / "templates"
CONDITION_KEYS = ("study", "dataset", "model", "norm", "depth", "batch_size")
# summary.csv metric name -> column heading
SUMMARY_METRICS = {"test_accuracy": "test accuracy", "test_micro_f1": "micro-F1", "test_macro_f1": "macro-F1"}
RUN_COLUMNS = (
    "study",
    "dataset",
    "model",
    "norm",
    "depth",
    "batch_size",
    "seed",
    "status",
    "epochs",
    "wall_seconds",
    "test_accuracy",
    "test_micro_f1",
    "test_macro_f1",
    "test_loss",
)
_CAPTIONS = {
    "loss_curves": "Training-time loss per epoch on the validation (and, where evaluated, test) split. "
    "Lines: mean over completed seeds; band: ±1 std; diverged runs are drawn per seed and end in ×.",
    "accuracy_curves": "Accuracy per epoch on the validation (and, where evaluated, test) split. "
    "Lines: mean over completed seeds; band: ±1 std; diverged runs are drawn per seed and end in ×.",
    "feature_percentiles": "1st, 20th, 80th and 99th percentiles of the pooled features of the validation "
    "split per epoch (mean over completed seeds); each panel has its own y-scale.",
    "batch_size_effect": "Final test accuracy against batch size for every norm run at two or more batch "
    "sizes; error bars: std over completed seeds; × marks a diverged run.",
    "depth_effect": "Final test accuracy against the number of ResNet layers (6n + 2) for every norm run at "
    "two or more depths; error bars: std over completed seeds; × marks a diverged run.",
    "final_accuracy": "Final test accuracy per condition: mean over seeds with its 95% confidence interval, "
    "grouped by study; hatched bars had diverged seeds.",
}
_MISCLASSIFIED = re.compile(r"misclassified", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------
# provenance


def _describe(value: Any, nested: bool = False) -> str:
    """One line for a record or setting: a dict as ``k: v, ...`` (sorted), a list joined by commas;
    nested ones get braces/brackets so that ``grid: [{norm: [bn, gn], depth: [1]}]`` stays readable."""
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        text = ", ".join(f"{k}: {_describe(v, nested=True)}" for k, v in items)
        return f"{{{text}}}" if nested else text
    if isinstance(value, list | tuple):
        text = ", ".join(_describe(v, nested=True) for v in value)
        return f"[{text}]" if nested else text
    return "–" if value is None else str(value)  # as _fmt shows a missing value


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s"


def collect_provenance(run_records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Summarise run.json records: every package version seen (several versions of one package are
    flagged), git commits and hardware with their run counts, total compute time and the date range.

    Returns ``{"n_runs", "statuses", "versions": {pkg: [versions]}, "mixed_versions": [pkg],
    "git_commits": [{"value", "runs"}], "hardware": [{"value", "runs"}], "total_wall_seconds",
    "total_compute", "total_train_seconds", "first_started", "last_finished"}``.
    """
    records = list(run_records)
    versions: dict[str, set[str]] = {}
    commits: Counter[str] = Counter()
    hardware: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    wall = train = 0.0
    started: list[str] = []
    finished: list[str] = []
    for record in records:
        for package, version in (record.get("versions") or {}).items():
            versions.setdefault(str(package), set()).add(str(version))
        commits[str(record.get("git_commit") or "unknown")] += 1
        hardware[_describe(record.get("hardware")) or "unknown"] += 1
        statuses[str(record.get("status") or "unknown")] += 1
        seconds = record.get("wall_seconds")
        if isinstance(seconds, int | float) and math.isfinite(seconds):
            wall += float(seconds)
        seconds = record.get("train_seconds")
        if isinstance(seconds, int | float) and math.isfinite(seconds):
            train += float(seconds)
        if record.get("started_at"):
            started.append(str(record["started_at"]))
        if record.get("finished_at"):
            finished.append(str(record["finished_at"]))
    # ISO-8601 timestamps in one zone sort as strings; that is what train writes.
    return {
        "n_runs": len(records),
        "statuses": dict(sorted(statuses.items())),
        "versions": {p: sorted(v) for p, v in sorted(versions.items())},
        "mixed_versions": sorted(p for p, v in versions.items() if len(v) > 1),
        "git_commits": [{"value": c, "runs": n} for c, n in commits.most_common()],
        "hardware": [{"value": h, "runs": n} for h, n in hardware.most_common()],
        "total_wall_seconds": wall,
        "total_compute": _hms(wall),
        "total_train_seconds": train,
        "first_started": min(started) if started else (min(finished) if finished else None),
        "last_finished": max(finished) if finished else None,
    }


# ---------------------------------------------------------------------------------------------------------
# table rows


def _fmt(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals; missing or non-finite values as a dash."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–" if value is None else str(value)
    return f"{number:.{digits}f}" if math.isfinite(number) else "–"


def _cell(value: Any) -> str:
    """A table cell from a DataFrame value: NaN as a dash, whole floats as integers."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _norm_rank(norm: str) -> tuple[int, str]:
    return (NORM_ORDER.index(norm), "") if norm in NORM_ORDER else (len(NORM_ORDER), norm)


def _sort_conditions(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    order = df.copy()
    order["_norm"] = order["norm"].astype(str).map(_norm_rank) if "norm" in order else 0
    by = [k if k != "norm" else "_norm" for k in keys]
    return order.sort_values(by, kind="mergesort").drop(columns="_norm")


def _summary_table(summary: pd.DataFrame, runs: pd.DataFrame) -> dict[str, Any]:
    keys = [k for k in CONDITION_KEYS if k in summary.columns]
    metrics = [m for m in SUMMARY_METRICS if m in set(summary["metric"].astype(str))]
    data = summary[summary["metric"].astype(str).isin(metrics)]
    diverged: Counter[tuple] = Counter()
    run_keys = [k for k in keys if k in runs.columns]
    if "status" in runs.columns:
        for _, run in runs[runs["status"].astype(str) == "diverged"].iterrows():
            diverged[tuple(str(run[k]) for k in run_keys)] += 1
    rows = []
    conditions = _sort_conditions(data[keys].drop_duplicates(), keys)
    for _, cond in conditions.iterrows():
        mask = pd.Series(True, index=data.index)
        for k in keys:
            mask &= data[k] == cond[k]
        block = data[mask].set_index(data[mask]["metric"].astype(str))
        cells = []
        for m in metrics:
            if m in block.index:
                r = block.loc[m]
                cells.append(
                    {
                        "mean_std": f"{_fmt(r['mean'])} ± {_fmt(r['std'])}",
                        "ci": f"[{_fmt(r['ci95_low'])}, {_fmt(r['ci95_high'])}]",
                    }
                )
            else:
                cells.append({"mean_std": "–", "ci": "–"})
        n = block["n"].max() if not block.empty else None
        if "n_diverged" in block.columns:  # written by normres.aggregate.summarize
            n_bad = int(pd.to_numeric(block["n_diverged"], errors="coerce").fillna(0).max())
        else:
            n_bad = diverged[tuple(str(cond[k]) for k in run_keys)]
        rows.append(
            {"keys": [_cell(cond[k]) for k in keys], "n": _cell(n), "metrics": cells, "diverged": n_bad}
        )
    return {"keys": keys, "metrics": [SUMMARY_METRICS[m] for m in metrics], "rows": rows}


def _runs_table(runs: pd.DataFrame) -> dict[str, Any]:
    columns = [c for c in RUN_COLUMNS if c in runs.columns]
    keys = [c for c in (*CONDITION_KEYS, "seed") if c in runs.columns]
    rows = []
    for _, run in _sort_conditions(runs, keys).iterrows():
        cells = []
        for c in columns:
            value = run[c]
            cells.append(_hms(float(value)) if c == "wall_seconds" and pd.notna(value) else _cell(value))
        rows.append({"cells": cells, "diverged": str(run.get("status", "")) == "diverged"})
    return {"columns": columns, "rows": rows}


def _setup_tables(setup: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{study: {setting: value}}`` -> one table per study; scalar entries go to a 'general' table."""
    general = {k: v for k, v in setup.items() if not isinstance(v, Mapping)}
    tables = (
        [{"name": "general", "rows": [(str(k), _describe(v)) for k, v in general.items()]}] if general else []
    )
    for study, settings in setup.items():
        if isinstance(settings, Mapping):
            tables.append({"name": str(study), "rows": [(str(k), _describe(v)) for k, v in settings.items()]})
    return tables


# ---------------------------------------------------------------------------------------------------------
# figures


def figure_caption(name: str) -> str:
    """Default caption for a figure from :func:`normres.plots.study_figures` or a misclassified grid."""
    for suffix, caption in _CAPTIONS.items():
        if name == suffix:
            return caption
        if name.endswith(f"_{suffix}"):
            return f"Study {name.removesuffix(f'_{suffix}')}. {caption}"
    if _MISCLASSIFIED.search(name):
        run = _MISCLASSIFIED.sub("", name).strip("_-/ ") or name
        return (
            f"The 10 test images misclassified with the highest confidence ({run}): true and predicted class."
        )
    return name


def _data_uri(path: Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"figure {path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figures(figures: Mapping[str, Path], captions: Mapping[str, str]) -> tuple[list[dict], list[dict]]:
    main, grids = [], []
    for name, path in figures.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"figure {name!r}: no file at {path}")
        entry = {"name": name, "caption": captions.get(name) or figure_caption(name), "uri": _data_uri(path)}
        (grids if _MISCLASSIFIED.search(name) else main).append(entry)
    return main, grids


# ---------------------------------------------------------------------------------------------------------
# page


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _provenance_view(provenance: Mapping[str, Any]) -> dict[str, Any]:
    known = {
        "n_runs",
        "statuses",
        "versions",
        "mixed_versions",
        "git_commits",
        "hardware",
        "total_wall_seconds",
        "total_compute",
        "total_train_seconds",
        "first_started",
        "last_finished",
    }
    return {
        "n_runs": provenance.get("n_runs"),
        "statuses": provenance.get("statuses") or {},
        "versions": {
            k: ", ".join(v) if isinstance(v, list | tuple) else str(v)
            for k, v in (provenance.get("versions") or {}).items()
        },
        "mixed": set(provenance.get("mixed_versions") or ()),
        "git_commits": provenance.get("git_commits") or [],
        "hardware": provenance.get("hardware") or [],
        "total_compute": provenance.get("total_compute"),
        "train_compute": (
            _hms(provenance["total_train_seconds"]) if provenance.get("total_train_seconds") else None
        ),
        "first_started": provenance.get("first_started"),
        "last_finished": provenance.get("last_finished"),
        "other": [(str(k), _describe(v)) for k, v in provenance.items() if k not in known],
    }


def build_report(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    figures: Mapping[str, str | os.PathLike],
    provenance: Mapping[str, Any],
    setup: Mapping[str, Any],
    out: str | os.PathLike,
    title: str = "normres: normalization layers in CNNs",
    captions: Mapping[str, str] | None = None,
) -> Path:
    """Render the report to ``out`` (written atomically) and return its path.

    ``runs``/``summary``: runs.csv / summary.csv frames; ``figures``: name -> PNG path (names containing
    'misclassified' are grouped; captions from :func:`figure_caption` unless given in ``captions``);
    ``provenance``: :func:`collect_provenance` output, extra keys are listed as they are; ``setup``:
    ``{study: {setting: value}}``.
    """
    out = Path(out)
    main, grids = _figures({k: Path(v) for k, v in figures.items()}, captions or {})
    n_diverged = int((runs["status"].astype(str) == "diverged").sum()) if "status" in runs.columns else 0
    html = (
        _environment()
        .get_template("report.html")
        .render(
            title=title,
            n_runs=len(runs),
            n_diverged=n_diverged,
            studies=sorted(runs["study"].astype(str).unique()) if "study" in runs.columns else [],
            setup=_setup_tables(setup),
            summary=_summary_table(summary, runs),
            runs=_runs_table(runs),
            figures=main,
            grids=grids,
            provenance=_provenance_view(provenance),
            provenance_json=json.dumps(provenance, indent=1, sort_keys=True, default=str),
        )
    )
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out
