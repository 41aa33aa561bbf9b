"""Aggregation over runs and seeds: the tidy runs table, the per-condition summary, all histories,
and the per-corruption robustness table."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from normres.columns import (
    CONDITION,
    CORRUPTION_METRICS,
    METRIC_COLUMNS,
    METRICS as _VALUES,
    ROBUSTNESS_COLUMNS,
    RUN_KEYS,
    RUN_METRICS,
    metric_column,
)
from normres.errors import DataError
from normres.io import read_json, write_csv

METRICS = [*RUN_METRICS, *CORRUPTION_METRICS]
RUN_COLUMNS = [*RUN_KEYS, "status", "epochs", "wall_seconds", *METRICS, "run_dir"]
SUMMARY_COLUMNS = [*CONDITION, "metric", "n", "n_diverged", "mean", "std", "ci95_low", "ci95_high"]


def read_table(path: str | Path, columns: list[str], what: str) -> pd.DataFrame:
    """A CSV with at least ``columns``; :class:`DataError` naming the file for anything else."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} is not a readable CSV file: {exc}") from None
    if missing := [c for c in columns if c not in df.columns]:
        raise DataError(f"{what} {path} lacks column(s) {', '.join(missing)} (expected {', '.join(columns)})")
    return df


def metrics_table(metrics_csv: str | Path) -> dict[str, float]:
    """Read a metrics.csv into ``{"test_accuracy": ..., "test_precise_accuracy": ...}``."""
    df = read_table(metrics_csv, METRIC_COLUMNS, "metrics file")
    out = dict.fromkeys(RUN_METRICS, np.nan)
    for r in df.itertuples():
        for m in _VALUES:
            out[metric_column(r.split, r.statistics, m)] = float(getattr(r, m))
    return out


def robustness_table(robustness_csv: str | Path) -> dict[str, float]:
    """Mean accuracy over every corruption and severity of a run's robustness.csv (the clean rows
    left out), before and after adaptation (NaN where the run has no adapted rows)."""
    df = read_table(robustness_csv, ROBUSTNESS_COLUMNS, "robustness file")
    df = df[df["severity"] > 0]  # severity 0: the same images clean, for reference
    adapted = df["adapted"].astype(str).str.lower().isin(["true", "1"])
    return {
        "corruption_accuracy": float(df.loc[~adapted, "accuracy"].mean()) if (~adapted).any() else np.nan,
        "corruption_accuracy_adapted": float(df.loc[adapted, "accuracy"].mean()) if adapted.any() else np.nan,
    }


def run_row(run_dir: str | Path) -> dict:
    """One row of runs.csv from a run directory's run.json and metrics.csv."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / "run.json")
    try:
        keys = {**record["run"], "dataset": record["dataset"], "model": record["model"]}
        status, epochs = record["status"], record["epochs_completed"]
    except KeyError as exc:
        raise ValueError(f"{run_dir / 'run.json'} lacks the field {exc}") from None
    robustness = run_dir / "robustness.csv"
    return {
        **keys,
        "status": status,
        "epochs": epochs,
        "wall_seconds": record.get("wall_seconds"),
        **metrics_table(run_dir / "metrics.csv"),
        **(robustness_table(robustness) if robustness.exists() else dict.fromkeys(CORRUPTION_METRICS, np.nan)),
        "run_dir": str(run_dir),
    }


def collect_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    rows = [run_row(d) for d in run_dirs]
    return pd.DataFrame(rows, columns=RUN_COLUMNS).sort_values(RUN_KEYS, ignore_index=True)


def collect_histories(run_dirs: Iterable[str | Path], runs: pd.DataFrame) -> pd.DataFrame:
    """All history rows, each prefixed by its run's keys and status."""
    frames = []
    by_dir = runs.set_index("run_dir")
    for d in run_dirs:
        h = read_table(Path(d) / "history.csv", ["epoch"], "history file")
        meta = by_dir.loc[str(d), [*RUN_KEYS, "status"]]
        frames.append(h.assign(**meta.to_dict()))
    if not frames:
        return pd.DataFrame(columns=[*RUN_KEYS, "status"])
    out = pd.concat(frames, ignore_index=True)
    return out[[*RUN_KEYS, "status", *[c for c in out.columns if c not in RUN_KEYS + ["status"]]]]


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std and the Student-t confidence interval of the mean (NaN for n < 2)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return (np.nan,) * 4
    mean = float(values.mean())
    if n < 2:
        return mean, np.nan, np.nan, np.nan
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / np.sqrt(n))
    return mean, std, mean - half, mean + half


def summarize(runs: pd.DataFrame, metrics: Iterable[str] = METRICS) -> pd.DataFrame:
    """Per condition and metric: n completed runs, n diverged, mean, std, 95% CI over seeds.

    Diverged runs are counted but not averaged: their metrics describe a broken model. A metric no
    run of a condition has (PreciseBN for a layer without running statistics) gets no row.
    """
    rows = []
    for cond, group in runs.groupby(CONDITION, sort=True):
        ok = group[group["status"] == "completed"]
        for metric in metrics:
            if group[metric].isna().all():
                continue
            mean, std, lo, hi = mean_ci(ok[metric].dropna().to_numpy())
            rows.append(
                {
                    **dict(zip(CONDITION, cond)),
                    "metric": metric,
                    "n": int(ok[metric].notna().sum()),
                    "n_diverged": int((group["status"] == "diverged").sum()),
                    "mean": mean,
                    "std": std,
                    "ci95_low": lo,
                    "ci95_high": hi,
                }
            )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def collect_robustness(run_dirs: Iterable[str | Path], runs: pd.DataFrame) -> pd.DataFrame:
    """Every row of the runs' robustness.csv files, each prefixed by its run's keys and status."""
    frames = []
    by_dir = runs.set_index("run_dir")
    for d in run_dirs:
        path = Path(d) / "robustness.csv"
        if path.exists():
            meta = by_dir.loc[str(d), [*RUN_KEYS, "status"]]
            frames.append(read_table(path, ROBUSTNESS_COLUMNS, "robustness file").assign(**meta.to_dict()))
    columns = [*RUN_KEYS, "status", *ROBUSTNESS_COLUMNS]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def write_tables(run_dirs: Iterable[str | Path], runs_out, summary_out, histories_out, robustness_out=None) -> pd.DataFrame:
    """Write runs.csv, summary.csv, histories.csv (and robustness.csv) for ``run_dirs``; returns the
    runs table."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = collect_runs(run_dirs)
    write_csv(runs, runs_out)
    write_csv(summarize(runs), summary_out)
    write_csv(collect_histories(run_dirs, runs), histories_out)
    if robustness_out is not None:
        write_csv(collect_robustness(run_dirs, runs), robustness_out)
    return runs
