"""The study's report: one self-contained HTML page (figures embedded as base64 PNG, inline CSS, no
external references) with the setup, the layers, results tables, the four analyses (small batches,
batch norm's statistics, robustness, significance), the published numbers beside the measured ones,
figures and provenance.

The page is rendered from ``templates/report.html`` with jinja2 (autoescape on, undefined names are
errors) and written atomically. Figure captions are the files of :mod:`normres.captions`, which
Snakemake's own report shows too. ``pending`` lists runs that have not finished, for a partial
report of a study still running (``normres report --partial``).
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

from normres import registry as R
from normres.captions import caption_text
from normres.io import atomic_path, read_json

__all__ = ["build_report", "collect_provenance", "figure_caption", "report_from_files"]

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
    return R.norm_rank(str(norm))


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
    """The caption of figure ``name`` (``{study}_{figure}``, a figure of all studies, or a
    misclassified grid ``misclassified/{study}/...``): the registry's caption file as plain text."""
    if _MISCLASSIFIED.search(name):
        run = _MISCLASSIFIED.sub("", name).strip("_-/ ") or name
        return f"{run}: {caption_text('misclassified.rst')}"
    for figure in sorted(R.FIGURES.values(), key=lambda f: -len(f.name)):
        if name == figure.name:
            return caption_text(figure.caption)
        if name.endswith(f"_{figure.name}"):
            return f"Study {name.removesuffix(f'_{figure.name}')}. {caption_text(figure.caption)}"
    return name


def _data_uri(path: Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"figure {path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_order(name: str, studies: list[str]) -> tuple[int, int, str]:
    """Figures grouped by study (in the order of ``studies``), those of all studies last, each group in
    the registry's order."""
    names = list(R.FIGURES)
    for figure in sorted(names, key=len, reverse=True):
        if name == figure:
            return len(studies), names.index(figure), ""
        study = name.removesuffix(f"_{figure}")
        if study != name and study in studies:
            return studies.index(study), names.index(figure), study
    return len(studies) + 1, 0, ""


def _figures(figures: Mapping[str, Path], captions: Mapping[str, str], studies: list[str]) -> tuple[list[dict], list[dict]]:
    """The figures as the template shows them: main figures (each with its group: a study, or all
    studies) and misclassified grids."""
    main, grids = [], []
    for name, path in figures.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"figure {name!r}: no file at {path}")
        entry = {"name": name, "caption": captions.get(name) or figure_caption(name), "uri": _data_uri(path)}
        (grids if _MISCLASSIFIED.search(name) else main).append(entry)
    for entry in main:
        order = _figure_order(entry["name"], studies)
        entry["order"], entry["group"] = order, (f"Study {order[2]}" if order[2] else "All studies")
    main.sort(key=lambda e: e["order"])
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


# ---------------------------------------------------------------------------------------------------------
# the analyses


def _mean_ci(values: Any) -> tuple[float, float, float, int]:
    from normres.aggregate import mean_ci

    values = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    mean, _, lo, hi = mean_ci(values)
    return mean, lo, hi, len(values)


def _completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"].astype(str) == "completed"]


def _layers_table(norms: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": name, **info} for name, info in sorted(norms.items(), key=lambda kv: _norm_rank(kv[0]))]


def _published_table(runs: pd.DataFrame, setup: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Published test accuracy beside the measured mean and 95% CI, for studies naming a protocol."""
    from normres.config import protocols

    rows = []
    done = _completed(runs)
    for study, settings in setup.items():
        name = settings.get("protocol") if isinstance(settings, Mapping) else None
        if not name:
            continue
        protocol = protocols()[name]
        for result in protocol["results"]:
            mine = done[(done["study"].astype(str) == study) & (done["norm"].astype(str) == result["norm"])
                        & (done["depth"] == result["depth"]) & (done["batch_size"] == result["batch_size"])]  # fmt: skip
            if mine.empty:
                continue
            mean, lo, hi, n = _mean_ci(mine["test_accuracy"])
            published = float(result["test_accuracy"])
            if n < 2:
                verdict = "1 seed: no confidence interval"
            elif lo <= published <= hi:
                verdict = "inside the 95% CI"
            else:
                verdict = f"{'above' if published > hi else 'below'} the 95% CI"
            rows.append({"study": study, "protocol": protocol["title"], "source": " ".join(protocol["source"].split()),
                         "norm": result["norm"], "depth": result["depth"], "batch_size": result["batch_size"],
                         "published": f"{published:.4f}", "measured": _fmt(mean), "ci": f"[{_fmt(lo)}, {_fmt(hi)}]",
                         "n": n, "verdict": verdict, "inside": verdict.startswith("inside")})  # fmt: skip
    return rows


def _small_batch_tables(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Per study with a batch-size sweep: test error at each batch size, per norm and depth."""
    tables = []
    done = _completed(runs)
    for study, group in done.groupby("study", sort=True):
        lines = [(k, g) for k, g in group.groupby(["norm", "depth"]) if g["batch_size"].nunique() >= 2]
        if not lines:
            continue
        sizes = sorted({int(b) for _, g in lines for b in g["batch_size"]})
        rows = []
        for (norm, depth), g in sorted(lines, key=lambda kv: (_norm_rank(kv[0][0]), kv[0][1])):
            cells = []
            for b in sizes:
                mean, lo, hi, n = _mean_ci(1 - g.loc[g["batch_size"] == b, "test_accuracy"])
                cells.append("–" if n == 0 else f"{_fmt(mean, 3)}" + (f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]" if n > 1 else ""))
            rows.append({"norm": norm, "depth": depth, "cells": cells})
        tables.append({"study": study, "sizes": sizes, "rows": rows})
    return tables


def _bn_statistics_view(runs: pd.DataFrame) -> dict[str, Any]:
    """EMA, PreciseBN and test-batch accuracy per condition, with the size of the EMA-vs-precise gap."""
    if "test_precise_accuracy" not in runs.columns:
        return {"rows": [], "sentence": ""}
    done = _completed(runs)
    done = done[pd.to_numeric(done["test_precise_accuracy"], errors="coerce").notna()]
    rows = []
    keys = ["study", "norm", "depth", "batch_size"]
    for key, g in sorted(done.groupby(keys), key=lambda kv: (kv[0][0], _norm_rank(kv[0][1]), kv[0][2], kv[0][3])):
        ema, precise, batch = (_mean_ci(g[c]) for c in ("test_accuracy", "test_precise_accuracy", "test_batch_accuracy"))
        gap = _mean_ci(g["test_precise_accuracy"] - g["test_accuracy"])
        rows.append({**dict(zip(keys, key)), "n": ema[3], "ema": _fmt(ema[0]), "precise": _fmt(precise[0]),
                     "batch": _fmt(batch[0]), "gap": f"{gap[0]:+.4f}",
                     "gap_ci": f"[{gap[1]:+.4f}, {gap[2]:+.4f}]" if gap[3] > 1 else "–", "_gap": gap[0]})  # fmt: skip
    sentence = ""
    if rows:
        biggest = max(rows, key=lambda r: abs(r["_gap"]))
        sentence = (
            f"PreciseBN changes test accuracy by {min(abs(r['_gap']) for r in rows):.4f} to "
            f"{abs(biggest['_gap']):.4f} against the EMA statistics the model was trained with; the largest "
            f"gap is {biggest['gap']} for {biggest['norm']} (study {biggest['study']}, depth {biggest['depth']}, "
            f"batch {biggest['batch_size']}). A positive gap means the moving averages lagged behind the weights."
        )
    return {"rows": rows, "sentence": sentence}


def _robustness_view(runs: pd.DataFrame, robustness: pd.DataFrame | None) -> dict[str, Any]:
    """Clean, corrupted and adapted accuracy per condition (means over seeds)."""
    if robustness is None or robustness.empty:
        return {"rows": [], "sentence": ""}
    data = robustness[robustness["status"].astype(str) == "completed"].copy()
    data["adapted"] = data["adapted"].astype(str).str.lower().isin(["true", "1"])
    rows = []
    keys = ["study", "norm", "depth", "batch_size"]
    for key, g in sorted(data.groupby(keys), key=lambda kv: (kv[0][0], _norm_rank(kv[0][1]), kv[0][2], kv[0][3])):
        clean = g[(g["corruption"] == "clean") & ~g["adapted"]]["accuracy"].mean()
        corrupted = g[(g["corruption"] != "clean") & ~g["adapted"]]["accuracy"].mean()
        adapted = g[(g["corruption"] != "clean") & g["adapted"]]["accuracy"]
        rows.append({**dict(zip(keys, key)), "clean": _fmt(clean), "corrupted": _fmt(corrupted),
                     "error": _fmt(1 - corrupted), "adapted": _fmt(adapted.mean()) if len(adapted) else "left as trained",
                     "gain": f"{adapted.mean() - corrupted:+.4f}" if len(adapted) else "–"})  # fmt: skip
    best = max(rows, key=lambda r: float(r["corrupted"]))
    as_trained = sorted({r["norm"] for r in rows if r["gain"] == "–"}, key=_norm_rank)
    sentence = f"Highest mean corruption accuracy: {best['norm']} ({best['corrupted']}, study {best['study']})."
    if as_trained:
        sentence += (f" {', '.join(as_trained)} keep{'s' if len(as_trained) == 1 else ''} no running statistics: "
                     "nothing to re-estimate, evaluated as trained.")  # fmt: skip
    return {"rows": rows, "sentence": sentence}


def _comparisons_view(comparisons: pd.DataFrame | None) -> dict[str, Any]:
    from normres.significance import describe

    if comparisons is None or comparisons.empty:
        return {"rows": [], "sentences": [], "few_seeds": []}
    few = comparisons["note"].astype(str).eq("needs >= 2 seeds")
    few_seeds = [f"{study}: {n} comparison{'s' if n > 1 else ''} with fewer than 2 paired seeds (not tested)"
                 for study, n in comparisons[few].groupby("study").size().items()]  # fmt: skip
    comparisons = comparisons[~few]
    rows = []
    for _, r in comparisons.iterrows():
        rows.append({"study": r["study"], "depth": r["depth"], "batch_size": r["batch_size"], "norm": r["norm"],
                     "reference": r["reference"], "n": _cell(r["n_pairs"]), "diff": _fmt(r["mean_diff"]),
                     "ci": f"[{_fmt(r['ci95_low'])}, {_fmt(r['ci95_high'])}]", "p": _fmt(r["p_value"]),
                     "p_holm": _fmt(r["p_holm"]), "significant": bool(r["significant"]) if pd.notna(r["significant"]) else False,
                     "note": r["note"] if isinstance(r["note"], str) else ""})  # fmt: skip
    return {"rows": rows, "sentences": describe(comparisons) if not comparisons.empty else [], "few_seeds": few_seeds}


def build_report(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    figures: Mapping[str, str | os.PathLike],
    provenance: Mapping[str, Any],
    setup: Mapping[str, Any],
    out: str | os.PathLike,
    title: str = "normres: normalization layers in CNNs",
    captions: Mapping[str, str] | None = None,
    comparisons: pd.DataFrame | None = None,
    robustness: pd.DataFrame | None = None,
    norms: Mapping[str, Mapping[str, Any]] | None = None,
    pending: list[str] | None = None,
) -> Path:
    """Render the report to ``out`` (written atomically) and return its path.

    ``runs``/``summary``/``comparisons``/``robustness``: the aggregated tables; ``figures``: name -> PNG
    path (names containing 'misclassified' are grouped; captions from :func:`figure_caption` unless
    given in ``captions``); ``provenance``: :func:`collect_provenance` output, extra keys are listed as
    they are; ``setup``: ``{study: {setting: value}}``; ``norms``: name -> registry description of the
    layers used; ``pending``: runs not finished yet (a partial report lists them).
    """
    out = Path(out)
    studies = sorted(runs["study"].astype(str).unique()) if "study" in runs.columns else []
    main, grids = _figures({k: Path(v) for k, v in figures.items()}, captions or {}, studies)
    n_diverged = int((runs["status"].astype(str) == "diverged").sum()) if "status" in runs.columns else 0
    html = (
        _environment()
        .get_template("report.html")
        .render(
            title=title,
            n_runs=len(runs),
            n_diverged=n_diverged,
            studies=studies,
            setup=_setup_tables(setup),
            layers=_layers_table(norms or {}),
            summary=_summary_table(summary, runs),
            published=_published_table(runs, setup),
            small_batch=_small_batch_tables(runs),
            bn_statistics=_bn_statistics_view(runs),
            robustness=_robustness_view(runs, robustness),
            comparisons=_comparisons_view(comparisons),
            runs=_runs_table(runs),
            figures=main,
            grids=grids,
            pending=pending or [],
            provenance=_provenance_view(provenance),
            provenance_json=json.dumps(provenance, indent=1, sort_keys=True, default=str),
        )
    )
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out


def report_from_files(
    runs: str | os.PathLike,
    summary: str | os.PathLike,
    comparisons: str | os.PathLike,
    records: Iterable[str | os.PathLike],
    figures: Iterable[str | os.PathLike],
    config: Mapping[str, Any],
    norms: Mapping[str, Mapping[str, Any]],
    out: str | os.PathLike,
    figures_root: str | os.PathLike = "results/figures",
    pending: list[str] | None = None,
    title: str = "normres: normalization layers in CNNs",
) -> Path:
    """:func:`build_report` from the aggregated files of a results folder (the workflow's report rule,
    and ``normres report``)."""
    root = Path(figures_root)
    robustness_csv = Path(runs).parent / "robustness.csv"
    return build_report(
        runs=pd.read_csv(runs),
        summary=pd.read_csv(summary),
        comparisons=pd.read_csv(comparisons),
        robustness=pd.read_csv(robustness_csv) if robustness_csv.exists() else None,
        figures={Path(p).relative_to(root).with_suffix("").as_posix(): p for p in figures},
        provenance=collect_provenance([read_json(p) for p in records]),
        setup=config["studies"],
        norms=norms,
        out=out,
        pending=pending,
        title=title,
    )
