"""Aggregation over runs and seeds: the tidy runs table, the per-condition summary, all histories."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from normres.io import read_json, write_csv
from normres.specs import METRIC_COLUMNS

RUN_KEYS = ["study", "dataset", "model", "norm", "depth", "batch_size", "seed"]
CONDITION = ["study", "dataset", "model", "norm", "depth", "batch_size"]
METRICS = [f"{split}_{m}" for split in ("train", "val", "test") for m in METRIC_COLUMNS[1:]]
RUN_COLUMNS = [*RUN_KEYS, "status", "epochs", "wall_seconds", *METRICS, "run_dir"]
SUMMARY_COLUMNS = [*CONDITION, "metric", "n", "n_diverged", "mean", "std", "ci95_low", "ci95_high"]


def metrics_table(metrics_csv: str | Path) -> dict[str, float]:
    """Read a metrics.csv into ``{"test_accuracy": ..., "val_loss": ...}``; errors name the file."""
    path = Path(metrics_csv)
    df = pd.read_csv(path)
    missing = set(METRIC_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)} (expected {METRIC_COLUMNS})")
    return {f"{r.split}_{m}": float(getattr(r, m)) for r in df.itertuples() for m in METRIC_COLUMNS[1:]}


def run_row(run_dir: str | Path) -> dict:
    """One row of runs.csv from a run directory's run.json and metrics.csv."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / "run.json")
    try:
        keys = {**record["run"], "dataset": record["dataset"], "model": record["model"]}
        status, epochs = record["status"], record["epochs_completed"]
    except KeyError as exc:
        raise ValueError(f"{run_dir / 'run.json'} lacks the field {exc}") from None
    return {
        **keys,
        "status": status,
        "epochs": epochs,
        "wall_seconds": record.get("wall_seconds"),
        **metrics_table(run_dir / "metrics.csv"),
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
        h = pd.read_csv(Path(d) / "history.csv")
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

    Diverged runs are counted but not averaged: their metrics describe a broken model.
    """
    rows = []
    for cond, group in runs.groupby(CONDITION, sort=True):
        ok = group[group["status"] == "completed"]
        for metric in metrics:
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


def write_tables(run_dirs: Iterable[str | Path], runs_out, summary_out, histories_out) -> pd.DataFrame:
    """Write runs.csv, summary.csv and histories.csv for ``run_dirs``; returns the runs table."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = collect_runs(run_dirs)
    write_csv(runs, runs_out)
    write_csv(summarize(runs), summary_out)
    write_csv(collect_histories(run_dirs, runs), histories_out)
    return runs
