"""Figures of the study: training curves, feature percentiles, small batches, batch-norm statistics,
robustness, paired comparisons, depth effect, final accuracy, misclassified test images.

Every plotting function takes DataFrames in the formats of ``docs/architecture.md`` (``histories.csv``,
``runs.csv``, ``summary.csv``, ``predictions.csv``) and returns a :class:`matplotlib.figure.Figure`.
Figures are built without ``pyplot`` (Agg canvas, nothing registered globally), so this module is safe
to use from Snakemake jobs and tests; :func:`save` writes them.

The figures of a study are listed once, in :data:`normres.registry.FIGURES`; :func:`draw_figures` draws
them from the aggregated :class:`Tables`. Norms are ordered and coloured by the registry (user layers
after the built-in ones).

A *condition* is ``(study, norm, depth, batch_size)``; lines are labelled by norm and get ``depth …``/
``b=…`` (and the study) only when those vary within the plotted data; seed counts read ``(3 seeds)``. Lines are the mean over seeds, with a
±1 std band when there is more than one seed. Diverged runs (``status == "diverged"``; their history
stops early) never enter a mean: they are drawn on their own and marked ``(diverged)``/``×``/hatched.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before anything can pull in an interactive backend; no display on cluster nodes

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from normres import registry as R  # noqa: E402
from normres.io import atomic_path  # noqa: E402

__all__ = [
    "CONDITION",
    "curves",
    "depth_effect",
    "feature_percentiles",
    "final_accuracy",
    "forest_plot",
    "misclassified_grid",
    "render_misclassified",
    "save",
    "select_misclassified",
    "Tables",
    "bn_statistics",
    "draw_figures",
    "robustness_heatmap",
    "robustness_severity",
    "small_batch",
]

CONDITION = ["study", "norm", "depth", "batch_size"]
SPLITS = ("train", "val", "test")
CURVE_METRICS = ("loss", "accuracy")
PERCENTILES = ("feat_p1", "feat_p20", "feat_p80", "feat_p99")
DPI = 110

_LINESTYLES = ("-", "--", ":", "-.")
_PERCENTILE_COLOURS = {
    "feat_p1": "#9ecae1",
    "feat_p20": "#3182bd",
    "feat_p80": "#e6550d",
    "feat_p99": "#a63603",
}
_EMPTY_DEPTH = "no norm was run at more than one depth"
_EMPTY_MISCLASSIFIED = "no misclassified test images"


# ---------------------------------------------------------------------------------------------------------
# helpers


def _text(value: Any) -> str:
    """Plain text for matplotlib: a '$' would start mathtext."""
    return str(value).replace("$", r"\$")


def _norm_rank(norm: str) -> tuple[int, str]:
    return R.norm_rank(str(norm))


def _norm_colour(norm: str, extra: Sequence[str] = ()) -> str:
    """The registry's colour of ``norm``; layers outside it (user layers) by their order in ``extra``."""
    return R.norm_colour(str(norm), [n for n in map(str, extra) if n not in R.NORMS])


def _condition_sort_key(key: tuple) -> tuple:
    study, norm, depth, batch_size = key
    return (str(study), _norm_rank(norm), depth, batch_size)


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} lacks column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})"
        )


def _varying(df: pd.DataFrame) -> set[str]:
    """Which of study/depth/batch_size take more than one value in ``df``."""
    return {c for c in ("study", "depth", "batch_size") if c in df.columns and df[c].nunique(dropna=True) > 1}


def _label(study: Any, norm: Any, depth: Any, batch_size: Any, varying: set[str]) -> str:
    parts = [str(norm)]
    if "depth" in varying:
        parts.append(f"depth {depth}")
    if "batch_size" in varying:
        parts.append(f"b={batch_size}")
    label = " ".join(parts)
    if "study" in varying:
        label = f"{study}: {label}"
    return _text(label)


def _linestyles(df: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, str]:
    """One line style per combination of the non-norm keys, so equal colours stay apart."""
    present = [k for k in keys if k in df.columns]
    combos = sorted({tuple(r) for r in df[present].itertuples(index=False)}, key=lambda t: tuple(map(str, t)))
    return {c: _LINESTYLES[i % len(_LINESTYLES)] for i, c in enumerate(combos)}


def _diverged_mask(df: pd.DataFrame) -> pd.Series:
    if "status" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["status"].astype("string").eq("diverged").fillna(False).astype(bool)


def _attach_status(histories: pd.DataFrame, runs: pd.DataFrame | None) -> pd.DataFrame:
    """Histories with a boolean ``diverged`` column: from ``status`` (histories or ``runs``), else from
    non-finite losses in the history itself."""
    hist = histories.copy()
    run_keys = [k for k in (*CONDITION, "seed") if k in hist.columns]
    if "status" not in hist.columns and runs is not None and "status" in runs.columns:
        keys = [k for k in run_keys if k in runs.columns]
        status = runs[[*keys, "status"]].drop_duplicates(keys)
        hist = hist.merge(status, on=keys, how="left")
    diverged = _diverged_mask(hist)
    loss_cols = [c for c in ("train_loss", "val_loss") if c in hist.columns]
    if loss_cols:
        losses = hist[loss_cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        bad_rows = pd.Series(np.isinf(losses).any(axis=1), index=hist.index)
        bad_runs = (
            bad_rows.groupby([hist[k] for k in run_keys], dropna=False).transform("any")
            if run_keys
            else bad_rows
        )
        diverged = diverged | bad_runs.astype(bool)
    hist["diverged"] = diverged.to_numpy()
    return hist


def _numeric(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Copy with ``columns`` as float and ±inf turned into NaN (diverged runs may log inf)."""
    out = df.copy()
    for c in columns:
        if c in out.columns:
            out[c] = pd.to_numeric(out[c], errors="coerce").astype(float).replace([np.inf, -np.inf], np.nan)
    return out


def _message_figure(title: str, message: str, figsize: tuple[float, float] = (6.4, 3.2)) -> Figure:
    """Empty state: a titled figure that says why there is nothing to plot."""
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, wrap=True, transform=ax.transAxes)
    fig.suptitle(_text(title))
    return fig


def _metric_label(metric: str) -> str:
    return metric.replace("_", " ").replace("micro f1", "micro-F1").replace("macro f1", "macro-F1")


def _conditions(df: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    groups = list(df.groupby(CONDITION, sort=False, dropna=False))
    return sorted(groups, key=lambda kv: _condition_sort_key(kv[0]))


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(n, 1))
    return math.ceil(n / cols), cols


def _unique_legend(axes: Iterable[Any]) -> tuple[list[Any], list[str]]:
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen.keys())


# ---------------------------------------------------------------------------------------------------------
# training curves


def curves(
    histories: pd.DataFrame,
    metric: str,
    splits: Sequence[str] = ("val", "test"),
    title: str | None = None,
    runs: pd.DataFrame | None = None,
) -> Figure:
    """``{split}_{metric}`` over epochs, one subplot per split that has data, one line per condition.

    ``runs`` (runs.csv) supplies ``status`` when ``histories`` has none; runs with non-finite losses
    count as diverged too. Diverged runs are drawn per seed, thin, ending in ``×``.
    """
    if metric not in CURVE_METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose from: {', '.join(CURVE_METRICS)})")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split {bad[0]!r} (choose from: {', '.join(SPLITS)})")
    _require(histories, [*CONDITION, "seed", "epoch"], "histories")
    title = title or f"{metric.capitalize()} per epoch"
    columns = [f"{s}_{metric}" for s in splits]
    hist = _numeric(_attach_status(histories, runs), [*columns, "epoch"])
    present = [s for s, c in zip(splits, columns, strict=True) if c in hist.columns and hist[c].notna().any()]
    if not present:
        return _message_figure(title, f"no {metric} values for split(s) {', '.join(splits)}")

    varying = _varying(hist)
    styles = _linestyles(hist, ("study", "depth", "batch_size"))
    norms = list(hist["norm"].astype(str).unique())
    fig = Figure(layout="constrained")  # sized once the legend is known
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, split in zip(axes, present, strict=True):
        col = f"{split}_{metric}"
        ends: list[tuple[float, float, str]] = []  # last finite point of each diverged run
        kept_values: list[np.ndarray] = []
        diverged_values: list[np.ndarray] = []
        for (study, norm, depth, batch_size), group in _conditions(hist):
            colour = _norm_colour(str(norm), norms)
            style = styles[(study, depth, batch_size)]
            label = _label(study, norm, depth, batch_size, varying)
            ok = group[~group["diverged"]]
            stats = ok.groupby("epoch")[col].agg(["mean", "std", "count"]).dropna(subset=["mean"])
            if not stats.empty:
                x = stats.index.to_numpy(dtype=float)
                mean = stats["mean"].to_numpy()
                ax.plot(x, mean, color=colour, linestyle=style, linewidth=1.6, label=label)
                std = stats["std"].where(stats["count"] > 1).to_numpy(dtype=float)
                if np.isfinite(std).any():
                    ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
                    kept_values += [mean - np.nan_to_num(std), mean + np.nan_to_num(std)]
                kept_values.append(mean)
            bad_label = f"{label} (diverged)"
            for _, run in group[group["diverged"]].groupby("seed"):
                run = run.sort_values("epoch").dropna(subset=[col])
                if run.empty:
                    continue
                ax.plot(
                    run["epoch"],
                    run[col],
                    color=colour,
                    linestyle=style,
                    linewidth=0.9,
                    alpha=0.7,
                    label=bad_label,
                )
                diverged_values.append(run[col].to_numpy())
                ends.append((float(run["epoch"].iloc[-1]), float(run[col].iloc[-1]), colour))
        _clip_to_kept(ax, kept_values, diverged_values)
        _mark_diverged(ax, ends, markersize=8)
        ax.set_title(f"{split} split")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{split} {metric}")
        ax.grid(alpha=0.3)
    handles, labels = _unique_legend(axes)
    columns = _legend_columns(len(labels))
    # Centred beside the panels, clear of the suptitle; many conditions make the figure taller, not the
    # legend spill off the bottom.
    fig.legend(
        handles, labels, loc="outside right center", fontsize=8, title="norm", title_fontsize=9, ncols=columns
    )
    rows = math.ceil(len(labels) / columns)
    fig.set_size_inches(4.8 * len(present) + 2.2 * columns, max(4.0, 0.19 * rows + 1.6))
    fig.suptitle(_text(title))
    return fig


def _legend_columns(entries: int, per_column: int = 16) -> int:
    """Columns for a legend beside the panels: a few long columns rather than one running off the page."""
    return max(1, math.ceil(entries / per_column))


def _clip_to_kept(ax: Any, kept: list[np.ndarray], diverged: list[np.ndarray]) -> None:
    """Keep the y-range on the completed runs: a diverged loss of 1e9 must not flatten every other line.
    Diverged values within one span of that range still show."""
    if not kept:
        return
    values = np.concatenate(kept)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo or max(abs(hi), 1.0) * 0.1
    if diverged:
        extra = np.concatenate(diverged)
        extra = extra[np.isfinite(extra) & (extra >= lo - span) & (extra <= hi + span)]
        if extra.size:
            lo, hi = min(lo, float(extra.min())), max(hi, float(extra.max()))
            span = hi - lo or span
    ax.set_ylim(lo - 0.05 * span, hi + 0.05 * span)


# ---------------------------------------------------------------------------------------------------------
# feature percentiles


def _mark_diverged(ax: Any, points: Iterable[tuple[float, float, str]], markersize: int) -> None:
    """An x where each diverged run ends, kept just inside the frame (a value off the axis, or
    without a final metric, sits at the edge)."""
    lo, hi = ax.get_ylim()
    inset = 0.03 * (hi - lo)
    for x, y, colour in points:
        y = y if np.isfinite(y) else lo
        ax.plot([x], [min(max(y, lo + inset), hi - inset)], marker="x", markersize=markersize,
                markeredgewidth=2, color=colour, linestyle="none", clip_on=False)  # fmt: skip


def feature_percentiles(
    histories: pd.DataFrame, title: str | None = None, runs: pd.DataFrame | None = None
) -> Figure:
    """feat_p1/p20/p80/p99 of the pooled validation features over epochs, one subplot per condition
    (per norm when norms are the only thing varying), mean over the completed seeds.

    Each subplot keeps its own y-range (unnormalized nets reach values orders of magnitude above the
    rest); a subplot switches to a symlog axis when its values span more than two decades.
    """
    _require(histories, [*CONDITION, "seed", "epoch"], "histories")
    title = title or "Percentiles of pooled validation features per epoch"
    hist = _numeric(_attach_status(histories, runs), [*PERCENTILES, "epoch"])
    cols = [c for c in PERCENTILES if c in hist.columns]
    hist = hist[hist[cols].notna().any(axis=1)] if cols else hist.iloc[0:0]
    if hist.empty:
        return _message_figure(title, "no feature percentiles recorded")

    varying = _varying(hist)
    groups = _conditions(hist)
    rows, ncols = _grid(len(groups))
    fig = Figure(figsize=(3.5 * ncols + 1.2, 2.8 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, ncols, squeeze=False).ravel()
    for ax, ((study, norm, depth, batch_size), group) in zip(axes, groups, strict=False):
        n_bad = group.loc[group["diverged"], "seed"].nunique()
        ok = group[~group["diverged"]] if n_bad < group["seed"].nunique() else group
        stats = ok.groupby("epoch")[cols].mean()
        for col in cols:
            ax.plot(
                stats.index,
                stats[col],
                color=_PERCENTILE_COLOURS[col],
                linewidth=1.5,
                linestyle="--" if col in ("feat_p1", "feat_p99") else "-",
                label=col.removeprefix("feat_"),
            )
        _maybe_symlog(ax, stats.to_numpy(dtype=float))
        name = _label(study, norm, depth, batch_size, varying)
        if n_bad:
            name += f" ({n_bad} diverged)" if n_bad < group["seed"].nunique() else " (diverged)"
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("feature value")
        ax.grid(alpha=0.3)
    for ax in axes[len(groups) :]:
        ax.set_axis_off()
    handles, labels = _unique_legend(axes[:1])
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=len(labels))
    fig.suptitle(_text(title))
    return fig


def _maybe_symlog(ax: Any, values: np.ndarray) -> None:
    finite = np.abs(values[np.isfinite(values)])
    positive = finite[finite > 0]
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_yscale("symlog", linthresh=max(float(positive.min()), float(positive.max()) * 1e-4))


# ---------------------------------------------------------------------------------------------------------
# effect of batch size / depth on the final metric


def depth_effect(runs: pd.DataFrame, metric: str = "test_accuracy") -> Figure:
    """Final ``metric`` against the number of layers 6n+2 of the CIFAR ResNets (the MNIST ``cnn`` has no
    depth to vary and is skipped), one line per (norm, batch size, study) run at two or more depths."""
    fixed = [m.name for m in R.MODELS.values() if m.fixed_depth is not None]  # models of one size
    data = runs[~runs["model"].astype(str).isin(fixed)] if "model" in runs.columns else runs
    return _effect(
        data,
        metric,
        x=lambda df: 6 * df["depth"].astype(float) + 2,
        x_label="layers (6n + 2)",
        line_keys=("study", "norm", "batch_size"),
        title=f"Effect of depth on {_metric_label(metric)}",
        empty=_EMPTY_DEPTH,
        log2=False,
    )


def _effect(
    runs: pd.DataFrame,
    metric: str,
    *,
    x: Any,
    x_label: str,
    line_keys: tuple[str, str, str],
    title: str,
    empty: str,
    log2: bool,
) -> Figure:
    _require(runs, [*CONDITION, "seed", metric], "runs")
    data = _numeric(runs, [metric])
    data["x"] = x(data).to_numpy()
    data["diverged"] = _diverged_mask(data).to_numpy()
    data = data[np.isfinite(data["x"])]
    lines = [
        (key, g)
        for key, g in data.groupby(list(line_keys), sort=False, dropna=False)
        if g["x"].nunique() >= 2
    ]
    if not lines:
        return _message_figure(title, empty)
    lines.sort(key=lambda kv: (str(kv[0][0]), _norm_rank(str(kv[0][1])), kv[0][2]))
    plotted = pd.concat([g for _, g in lines])
    varying = _varying(plotted) - {"batch_size" if log2 else "depth"}
    other = line_keys[2]
    styles = _linestyles(plotted, ("study", other))
    norms = list(plotted["norm"].astype(str).unique())

    fig = Figure(figsize=(8.6, 4.6), layout="constrained")
    ax = fig.add_subplot()
    bad_points: list[tuple[float, float, str]] = []
    for key, g in lines:
        study, norm, third = key
        depth, batch_size = (third, None) if log2 else (None, third)
        colour = _norm_colour(str(norm), norms)
        stats = g[~g["diverged"]].groupby("x")[metric].agg(["mean", "std", "count"]).dropna(subset=["mean"])
        label = _label(study, norm, depth, batch_size, varying)
        n_bad = int(g["diverged"].sum())
        if n_bad:
            label += f" ({n_bad} diverged)"
        ax.errorbar(
            stats.index.to_numpy(dtype=float),
            stats["mean"].to_numpy(),
            yerr=stats["std"].where(stats["count"] > 1).fillna(0).to_numpy(),
            color=colour,
            linestyle=styles[(study, third)],
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1.5,
            label=label,
        )
        for _, run in g[g["diverged"]].iterrows():
            bad_points.append((float(run["x"]), float(run[metric]), colour))
    if bad_points:
        lo, hi = ax.get_ylim()
        _mark_diverged(ax, bad_points, markersize=9)
        ax.set_ylim(lo, hi)
        ax.plot([], [], marker="x", color="black", linestyle="none", markeredgewidth=2, label="diverged run")
    xs = np.sort(plotted["x"].unique())
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.minorticks_off()
    ax.set_xlabel(x_label)
    ax.set_ylabel(_metric_label(metric))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside right upper",
        fontsize=8,
        title="norm",
        title_fontsize=9,
        ncols=_legend_columns(len(labels), per_column=18),
    )
    fig.suptitle(_text(title))
    return fig


# ---------------------------------------------------------------------------------------------------------
# final accuracy with confidence intervals


def final_accuracy(
    summary: pd.DataFrame, metric: str = "test_accuracy", runs: pd.DataFrame | None = None
) -> Figure:
    """Horizontal bars of the mean ``metric`` with 95% CI error bars, one bar per condition, grouped by
    study. Conditions with diverged seeds (``n_diverged`` of the summary, else counted in ``runs``) are
    hatched and say how many diverged."""
    title = f"Final {_metric_label(metric)} (mean over seeds, 95% CI)"
    _require(summary, [*CONDITION, "metric", "n", "mean", "ci95_low", "ci95_high"], "summary")
    data = _numeric(summary[summary["metric"].astype(str) == metric], ["mean", "ci95_low", "ci95_high", "n"])
    if data.empty:
        have = ", ".join(sorted(summary["metric"].astype(str).unique()))
        return _message_figure(title, f"summary has no rows for metric {metric!r} (has: {have or 'none'})")
    bad_counts: dict[tuple, int] = {}
    if "n_diverged" in data.columns:  # written by normres.aggregate.summarize
        counts = pd.to_numeric(data["n_diverged"], errors="coerce").fillna(0).astype(int)
        bad_counts = {tuple(r[c] for c in CONDITION): n for (_, r), n in zip(data.iterrows(), counts) if n}
    elif runs is not None and "status" in runs.columns:
        bad = runs[_diverged_mask(runs)]
        bad_counts = {k: len(g) for k, g in bad.groupby(CONDITION, dropna=False)} if not bad.empty else {}

    norms = list(data["norm"].astype(str).unique())
    positions: list[float] = []
    tick_labels: list[str] = []
    headers: list[int] = []
    bars: list[tuple[float, pd.Series, int]] = []
    y = 0.0
    for study, group in sorted(data.groupby("study", sort=False), key=lambda kv: str(kv[0])):
        headers.append(len(positions))
        positions.append(y)
        tick_labels.append(_text(study))
        y += 1
        varying = _varying(group)
        rows = sorted(group.iterrows(), key=lambda r: _condition_sort_key(tuple(r[1][c] for c in CONDITION)))
        for _, row in rows:
            n_bad = bad_counts.get(tuple(row[c] for c in CONDITION), 0)
            label = _label(row["study"], row["norm"], row["depth"], row["batch_size"], varying)
            n_seeds = int(row["n"]) if np.isfinite(row["n"]) else 0
            label += f" ({n_seeds} seed{'' if n_seeds == 1 else 's'})"
            if n_bad:
                label += f" ({n_bad} diverged)"
            positions.append(y)
            tick_labels.append(label)
            bars.append((y, row, n_bad))
            y += 1
        y += 0.5  # gap between studies

    fig = Figure(figsize=(9.0, 0.34 * len(positions) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    for ypos, row, n_bad in bars:
        mean = row["mean"]
        err = np.array([[mean - row["ci95_low"]], [row["ci95_high"] - mean]], dtype=float)
        err = np.clip(np.nan_to_num(err), 0, None)
        colour = _norm_colour(str(row["norm"]), norms)
        if np.isfinite(mean):
            ax.barh(
                ypos,
                mean,
                xerr=err,
                color=colour,
                height=0.75,
                hatch="//" if n_bad else None,
                edgecolor="black" if n_bad else colour,
                capsize=3,
                error_kw={"elinewidth": 1},
            )
            ax.text(mean + err[1, 0], ypos, f" {mean:.3f}", va="center", fontsize=7)
        else:
            ax.text(0, ypos, " no finished seed (diverged)", va="center", fontsize=7, color="#b00")
    ax.set_yticks(positions, tick_labels, fontsize=8)
    for i in headers:
        ax.get_yticklabels()[i].set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel(f"{_metric_label(metric)} (mean, 95% CI)")
    ax.set_ylabel("study / condition")
    ax.grid(axis="x", alpha=0.3)
    upper = data["ci95_high"].fillna(data["mean"]).max()  # NaN when no condition has a finished seed
    ax.set_xlim(0, max(1.0, float(upper) * 1.08) if pd.notna(upper) else 1.0)
    handles: list[Any] = [
        Patch(color=_norm_colour(n, norms), label=_text(n)) for n in sorted(norms, key=_norm_rank)
    ]
    if any(n_bad for _, _, n_bad in bars):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="has diverged seeds"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="norm", title_fontsize=9)
    fig.suptitle(_text(title))
    return fig


# ---------------------------------------------------------------------------------------------------------
# misclassified images


def select_misclassified(predictions: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The ``k`` misclassified rows (``label != prediction``) with the highest confidence; ties broken by
    test index so the choice is deterministic."""
    _require(predictions, ["index", "label", "prediction", "confidence"], "predictions")
    wrong = predictions[predictions["label"] != predictions["prediction"]]
    ordered = wrong.sort_values(["confidence", "index"], ascending=[False, True], kind="mergesort")
    return ordered.head(k).reset_index(drop=True)


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def misclassified_grid(
    images: Any,
    labels: Sequence[int] | Any,
    predictions: Sequence[int] | Any,
    classes: Sequence[str],
    title: str,
    confidences: Sequence[float] | Any | None = None,
) -> Figure:
    """Up to 10 uint8 images ``(k, C, H, W)`` (C = 1 grey, C = 3 RGB) on a 2 × 5 grid, each titled
    ``true: X`` / ``pred: Y`` (with the confidence when given); unused cells stay blank."""
    images = _as_array(images)
    labels, predictions = _as_array(labels).astype(int), _as_array(predictions).astype(int)
    if images.size == 0 or len(images) == 0:
        return _message_figure(title, _EMPTY_MISCLASSIFIED, figsize=(9.0, 2.4))
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (k, C, H, W) with C in (1, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    k = len(images)
    if k > 10:
        raise ValueError(f"at most 10 images fit the grid, got {k}")
    if len(labels) != k or len(predictions) != k:
        raise ValueError(
            f"need one label and prediction per image: {k} images, {len(labels)} labels, "
            f"{len(predictions)} predictions"
        )
    for value in (*labels, *predictions):
        if not 0 <= value < len(classes):
            raise ValueError(f"class index {value} outside classes (0..{len(classes) - 1})")
    conf = None if confidences is None else _as_array(confidences).astype(float)

    fig = Figure(figsize=(9.0, 4.6), layout="constrained")
    axes = fig.subplots(2, 5).ravel()
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.set_axis_off()
            continue
        image = images[i]
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        pred = _text(classes[predictions[i]])
        if conf is not None:
            pred += f" ({conf[i]:.0%})"
        ax.set_title(f"true: {_text(classes[labels[i]])}\npred: {pred}", fontsize=9)
    fig.suptitle(_text(title))
    return fig


def render_misclassified(
    predictions: pd.DataFrame, test_x: Any, classes: Sequence[str], title: str, path: str | os.PathLike
) -> Path:
    """Select the 10 most confidently misclassified test images of one run (``predictions.csv``) and save
    their grid to ``path``; ``test_x`` is the prepared uint8 test tensor the indices refer to."""
    chosen = select_misclassified(predictions, k=10)
    images = _as_array(test_x)[chosen["index"].to_numpy(dtype=int)]
    fig = misclassified_grid(
        images, chosen["label"], chosen["prediction"], classes, title, chosen["confidence"]
    )
    return save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# output


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically (temp file in the same directory, then ``os.replace``) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:  # only figures made through pyplot are registered there
            pyplot.close(fig)
        fig.clear()
    return path


# ---------------------------------------------------------------------------------------------------------
# paired comparisons with the reference norm (normres.significance)

_FOREST_COLUMNS = ("study", "depth", "batch_size", "metric", "norm", "reference", "n_pairs", "mean_diff",
                   "ci95_low", "ci95_high", "p_holm", "significant", "note")  # fmt: skip


def forest_plot(comparisons: pd.DataFrame, study: str, title: str | None = None) -> Figure:
    """The paired differences (norm − reference) of one study from ``normres.significance.compare``: one row
    per comparison, a point at the mean difference with its 95% CI bar, a line at 0. Points are filled where
    the difference is significant at 5% after Holm's correction, open where not; comparisons without a CI
    say why (``note``) on their row."""
    _require(comparisons, _FOREST_COLUMNS, "comparisons")
    data = _numeric(comparisons[comparisons["study"].astype(str) == str(study)],
                    ["mean_diff", "ci95_low", "ci95_high", "p_holm"])  # fmt: skip
    metrics = list(data["metric"].astype(str).unique())
    if len(metrics) > 1:
        raise ValueError(
            f"comparisons of study {study!r} hold several metrics ({', '.join(metrics)}); pass one at a time"
        )
    metric = _metric_label(metrics[0]) if metrics else "metric"
    references = ", ".join(map(str, data["reference"].astype(str).unique()))
    title = title or f"{study}: {metric} against {references or 'the reference'} (paired by seed, 95% CI)"
    if data.empty:
        return _message_figure(title, f"no comparisons for study {study!r} (no norm besides the reference)")
    has_ci = np.isfinite(data["ci95_low"]) & np.isfinite(data["ci95_high"])
    if not has_ci.any():
        return _message_figure(title, "no comparison has a confidence interval (needs >= 2 paired seeds)")

    varying = _varying(data) - {"study"}
    norms = list(data["norm"].astype(str).unique())
    fig = Figure(figsize=(8.6, 0.36 * len(data) + 1.9), layout="constrained")
    ax = fig.add_subplot()
    labels = []
    for y, (_, row) in enumerate(data.iterrows()):
        labels.append(_label(study, f"{row['norm']} vs {row['reference']}", row["depth"], row["batch_size"],
                             varying))  # fmt: skip
        if not has_ci.loc[row.name]:
            reason = row["note"] if isinstance(row["note"], str) and row["note"] else "no confidence interval"
            ax.text(0, y, f" {_text(reason)} ({int(row['n_pairs'])} paired)", va="center", fontsize=7,
                    color="#b00")  # fmt: skip
            continue
        colour = _norm_colour(str(row["norm"]), norms)
        significant = bool(row["significant"])
        mean, lo, hi = row["mean_diff"], row["ci95_low"], row["ci95_high"]
        ax.errorbar([mean], [y], xerr=[[mean - lo], [hi - mean]], color=colour, linewidth=1.6, capsize=3,
                    marker="o", markersize=7, markeredgecolor=colour,
                    markerfacecolor=colour if significant else "white")  # fmt: skip
        p = row["p_holm"]
        if np.isfinite(p):
            note = f"Holm p={p:.3f}" if p >= 0.001 else "Holm p<0.001"
        else:  # zero variance of the differences: no t-test
            note = _text(row["note"]) if isinstance(row["note"], str) else "no p-value"
        ax.text(hi, y, f"  {note}", va="center", fontsize=7)
    ax.axvline(0, color="black", linewidth=0.9, zorder=0)
    ends = np.concatenate([data.loc[has_ci, "ci95_low"], data.loc[has_ci, "ci95_high"], [0.0]])
    span = float(ends.max() - ends.min()) or 0.01
    ax.set_xlim(ends.min() - 0.08 * span, ends.max() + 0.35 * span)  # room for the p-values on the right
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first comparison on top
    ax.set_xlabel(f"difference in {metric} (norm − reference)")
    ax.grid(axis="x", alpha=0.3)
    handles = [
        ax.plot([], [], marker="o", color="black", linestyle="none", label="significant (Holm p < 0.05)")[0],
        ax.plot([], [], marker="o", color="black", markerfacecolor="white", linestyle="none",
                label="not significant")[0],  # fmt: skip
    ]
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=2)
    fig.suptitle(_text(title))
    return fig


# ---------------------------------------------------------------------------------------------------------
# small batches (Wu & He 2018, Fig. 1)


def _mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    from normres.aggregate import mean_ci

    mean, _, lo, hi = mean_ci(values)
    return mean, lo, hi


def small_batch(runs: pd.DataFrame, title: str | None = None, metric: str = "test_accuracy") -> Figure:
    """Test error (1 - ``metric``) against the training batch size on a log2 axis, one line per norm
    (and depth, where several) run at two or more batch sizes: the mean over completed seeds with its
    95% confidence band; diverged runs are ×."""
    title = title or "Test error against batch size (mean over seeds, 95% CI)"
    _require(runs, [*CONDITION, "seed", "status", metric], "runs")
    data = _numeric(runs, [metric])
    data["error"] = 1 - data[metric]
    data["diverged"] = _diverged_mask(data).to_numpy()
    lines = [(k, g) for k, g in data.groupby(["norm", "depth"], sort=False) if g["batch_size"].nunique() >= 2]
    if not lines:
        return _message_figure(title, "no norm was run at more than one batch size")
    lines.sort(key=lambda kv: (_norm_rank(str(kv[0][0])), kv[0][1]))
    plotted = pd.concat([g for _, g in lines])
    varying = _varying(plotted) - {"batch_size", "study"}
    norms = list(plotted["norm"].astype(str).unique())
    styles = _linestyles(plotted, ("depth",))
    fig = Figure(figsize=(8.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    bad: list[tuple[float, float, str]] = []
    for (norm, depth), g in lines:
        colour = _norm_colour(str(norm), norms)
        stats = []
        for b, gb in sorted(g.groupby("batch_size"), key=lambda kv: kv[0]):
            ok = gb.loc[~gb["diverged"], "error"].dropna().to_numpy()
            if ok.size:
                stats.append((float(b), *_mean_ci(ok)))
            bad += [(float(b), float(e), colour) for e in gb.loc[gb["diverged"], "error"]]
        if not stats:
            continue
        x, mean, lo, hi = (np.array(v, dtype=float) for v in zip(*stats))
        label = _label("", norm, depth, None, varying)
        ax.plot(x, mean, color=colour, linestyle=styles[(depth,)], marker="o", markersize=4, linewidth=1.6, label=label)
        if np.isfinite(lo).any():
            ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
    if bad:
        _mark_diverged(ax, bad, markersize=9)
        ax.plot([], [], marker="x", color="black", linestyle="none", markeredgewidth=2, label="diverged run")
    sizes = np.sort(plotted["batch_size"].astype(float).unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{v:g}" for v in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel(f"test error (1 − {_metric_label(metric)})")
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="norm", title_fontsize=9)
    fig.suptitle(_text(title))
    return fig


# ---------------------------------------------------------------------------------------------------------
# batch norm's statistics (Wu & Johnson 2021)

BN_STATISTICS = {"test_accuracy": "EMA (as trained)", "test_precise_accuracy": "PreciseBN",
                 "test_batch_accuracy": "test-batch statistics"}  # fmt: skip


def bn_statistics(runs: pd.DataFrame, title: str | None = None) -> Figure:
    """Test accuracy of every condition whose layer keeps running statistics, with the three choices
    of statistics side by side: mean over completed seeds and 95% CI."""
    title = title or "Test accuracy under three choices of normalization statistics (mean, 95% CI)"
    _require(runs, [*CONDITION, "seed", "status", *BN_STATISTICS], "runs")
    data = _numeric(runs, list(BN_STATISTICS))
    data = data[data["test_precise_accuracy"].notna() & ~_diverged_mask(data)]
    if data.empty:
        return _message_figure(title, "no completed run of a layer with running statistics")
    groups = _conditions(data)
    varying = _varying(data) - {"study"}
    fig = Figure(figsize=(max(6.0, 1.4 * len(groups) + 2.5), 4.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(BN_STATISTICS)
    shades = ("#4c72b0", "#dd8452", "#55a868")
    for k, (column, name) in enumerate(BN_STATISTICS.items()):
        for i, ((study, norm, depth, batch_size), g) in enumerate(groups):
            mean, lo, hi = _mean_ci(g[column].dropna().to_numpy())
            err = np.nan_to_num(np.array([[mean - lo], [hi - mean]]))
            ax.bar(i + (k - 1) * width, mean, width, yerr=err, color=shades[k], capsize=3,
                   label=name if i == 0 else None, error_kw={"clip_on": True})  # fmt: skip
            # the value inside the bar's top: a wide CI (two seeds) must not push it off the figure
            ax.text(i + (k - 1) * width, mean - 0.005, f"{mean:.3f}", ha="center", va="top", fontsize=7,
                    rotation=90, color="white")  # fmt: skip
    labels = [_label(study, norm, depth, batch_size, varying) for (study, norm, depth, batch_size), _ in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=8, rotation=20, ha="right")
    lo = float(np.nanmin(data[list(BN_STATISTICS)].to_numpy()))
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, ncols=3)
    fig.suptitle(_text(title))
    return fig


# ---------------------------------------------------------------------------------------------------------
# robustness under corruption (Hendrycks & Dietterich 2019; Schneider et al. 2020)


def _robustness_rows(robustness: pd.DataFrame) -> pd.DataFrame:
    data = _numeric(robustness, ["accuracy", "severity"])
    data["adapted"] = data["adapted"].astype(str).str.lower().isin(["true", "1"])
    return data[~_diverged_mask(data)]


def robustness_severity(robustness: pd.DataFrame, title: str | None = None) -> Figure:
    """Accuracy against corruption severity (0 = clean), averaged over corruptions and seeds, one line
    per condition; dashed after test-time adaptation of the running statistics."""
    title = title or "Accuracy under corruption (mean over corruptions and seeds)"
    _require(robustness, [*CONDITION, "seed", "corruption", "severity", "adapted", "accuracy"], "robustness")
    data = _robustness_rows(robustness)
    if data.empty:
        return _message_figure(title, "no robustness results of completed runs")
    varying = _varying(data) - {"study"}
    norms = list(data["norm"].astype(str).unique())
    fig = Figure(figsize=(8.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for (study, norm, depth, batch_size), g in _conditions(data):
        colour = _norm_colour(str(norm), norms)
        for adapted, ga in g.groupby("adapted"):
            per_seed = ga.groupby(["seed", "severity"])["accuracy"].mean()  # over corruptions
            curve = per_seed.groupby("severity").mean()
            label = _label(study, norm, depth, batch_size, varying) + (" (adapted)" if adapted else "")
            ax.plot(curve.index, curve.to_numpy(), color=colour, linestyle="--" if adapted else "-",
                    marker="o", markersize=3.5, linewidth=1.5, label=label)  # fmt: skip
    ax.set_xticks(sorted(data["severity"].unique()), ["clean" if v == 0 else f"{v:g}" for v in sorted(data["severity"].unique())])
    ax.set_xlabel("severity")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="norm", title_fontsize=9,
               ncols=_legend_columns(len(labels), per_column=18))  # fmt: skip
    fig.suptitle(_text(title))
    return fig


def robustness_heatmap(robustness: pd.DataFrame, title: str | None = None) -> Figure:
    """Accuracy per corruption (rows) and condition (columns), averaged over severities and seeds,
    before adaptation, with a bottom row of the mean over corruptions."""
    title = title or "Accuracy per corruption (mean over severities and seeds, before adaptation)"
    _require(robustness, [*CONDITION, "seed", "corruption", "severity", "adapted", "accuracy"], "robustness")
    data = _robustness_rows(robustness)
    data = data[~data["adapted"] & (data["severity"] > 0)]
    if data.empty:
        return _message_figure(title, "no robustness results of completed runs")
    varying = _varying(data) - {"study"}
    groups = _conditions(data)
    corruptions = list(dict.fromkeys(data["corruption"]))
    table = np.array([[g.loc[g["corruption"] == c, "accuracy"].mean() for _, g in groups] for c in corruptions])
    table = np.vstack([table, table.mean(0)])
    rows = [*corruptions, "mean"]
    fig = Figure(figsize=(1.0 * len(groups) + 3.2, 0.42 * len(rows) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(table, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for r in range(table.shape[0]):
        for c in range(table.shape[1]):
            value = table[r, c]
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")  # fmt: skip
    ax.set_xticks(range(len(groups)), [_label(*k, varying) for k, _ in groups], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r.replace("_", " ") for r in rows], fontsize=8)
    ax.axhline(len(rows) - 1.5, color="white", linewidth=2)
    fig.colorbar(image, ax=ax, label="test accuracy", shrink=0.8)
    fig.suptitle(_text(title))
    return fig


# ---------------------------------------------------------------------------------------------------------
# the study's figures, as the registry lists them


@dataclass(frozen=True)
class Tables:
    """The aggregated tables every figure is drawn from (formats of ``docs/architecture.md``)."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    histories: pd.DataFrame
    robustness: pd.DataFrame
    comparisons: pd.DataFrame
    norm_order: tuple[str, ...] = ()

    @classmethod
    def read(cls, paths: Any, norm_order: Sequence[str] = ()) -> Tables:
        """From the files (``runs``, ``summary``, ``histories``, ``robustness``, ``comparisons``)."""
        return cls(*(pd.read_csv(getattr(paths, name)) for name in ("runs", "summary", "histories",
                                                                  "robustness", "comparisons")),
                   tuple(norm_order))  # fmt: skip

    def of(self, study: str) -> Tables:
        """The same tables, restricted to one study."""
        pick = lambda df: df[df["study"].astype(str) == study] if "study" in df.columns else df  # noqa: E731
        return Tables(*(pick(df) for df in (self.runs, self.summary, self.histories, self.robustness,
                                            self.comparisons)), self.norm_order)  # fmt: skip


def loss_curves(t: Tables, study: str) -> Figure:
    return curves(t.histories, "loss", title=f"{study}: loss per epoch", runs=t.runs)


def accuracy_curves(t: Tables, study: str) -> Figure:
    return curves(t.histories, "accuracy", title=f"{study}: accuracy per epoch", runs=t.runs)


def feature_percentiles_of(t: Tables, study: str) -> Figure:
    return feature_percentiles(t.histories, title=f"{study}: percentiles of pooled validation features", runs=t.runs)


def small_batch_of(t: Tables, study: str) -> Figure:
    return small_batch(t.runs, title=f"{study}: test error against batch size (mean over seeds, 95% CI)")


def bn_statistics_of(t: Tables, study: str) -> Figure:
    return bn_statistics(t.runs, title=f"{study}: test accuracy with EMA, PreciseBN and test-batch statistics")


def robustness_severity_of(t: Tables, study: str) -> Figure:
    return robustness_severity(t.robustness, title=f"{study}: accuracy under corruption against severity")


def robustness_heatmap_of(t: Tables, study: str) -> Figure:
    return robustness_heatmap(t.robustness, title=f"{study}: accuracy per corruption (mean over severities)")


def comparisons_forest(t: Tables, study: str) -> Figure:
    return forest_plot(t.comparisons, study)


def depth_effect_of(t: Tables, study: None) -> Figure:
    return depth_effect(t.runs)


def final_accuracy_of(t: Tables, study: None) -> Figure:
    return final_accuracy(t.summary, runs=t.runs)


def draw_figures(tables: Tables, figures: Iterable[tuple[str, str | None, str | os.PathLike]]) -> dict[str, Path]:
    """Draw and save each ``(figure name, study or None, path)`` with the registry's function; each
    figure is saved (and freed) as soon as it is drawn. Returns path by figure key."""
    written: dict[str, Path] = {}
    for name, study, path in figures:
        draw = R.load_object(R.FIGURES[name].draw)
        fig = draw(tables.of(study) if study is not None else tables, study)
        written[f"{study}_{name}" if study else name] = save(fig, path)
    return written
