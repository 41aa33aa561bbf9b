"""Is the difference real? Paired comparisons of each norm with a study's reference norm.

Within a *condition group* ``(study, dataset, model, depth, batch_size)`` every norm is compared with the
study's reference norm, paired by seed: seed ``s`` of the norm against seed ``s`` of the reference (same
data order and initialisation stream), over the seeds where both runs completed with a finite value of the
metric. Per comparison: the mean of the differences (norm − reference) with its Student-t 95% CI
(df = n − 1), the paired t-test (:func:`scipy.stats.ttest_rel`, two-sided), and Holm's step-down adjusted
p-value over every comparison of the study that has a p-value (all groups, all norms). ``significant``
means ``p_holm < 0.05``.

Holm is implemented here (:func:`holm`) because scipy has no Holm adjustment: its
``false_discovery_control`` does Benjamini–Hochberg/–Yekutieli, which control the false discovery rate,
not the family-wise error rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from normres import registry as R
from normres.aggregate import RUN_KEYS, mean_ci
from normres.io import write_csv

__all__ = ["ALPHA", "COMPARISON_COLUMNS", "GROUP", "compare", "describe", "holm", "write_comparisons"]

ALPHA = 0.05
GROUP = ["study", "dataset", "model", "depth", "batch_size"]  # norms are compared within a group
COMPARISON_COLUMNS = [
    *GROUP,
    "metric",
    "norm",
    "reference",
    "n_pairs",
    "n_excluded",
    "mean_diff",
    "ci95_low",
    "ci95_high",
    "t",
    "p_value",
    "p_holm",
    "significant",
    "note",
]
NOTE_FEW_SEEDS = "needs >= 2 seeds"
NOTE_ZERO_VARIANCE = "zero variance of differences"
NOTE_ALL_ZERO = "all differences are 0"


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values, in the input order; NaN stays NaN and does not count towards m.

    Step-down: with the m p-values sorted ascending, ``p_(i)`` becomes ``max_{j <= i} (m − j + 1) p_(j)``,
    capped at 1 (the running maximum keeps the adjusted values in the order of the raw ones).
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional, got shape {p.shape}")
    finite = ~np.isnan(p)
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p[finite][(p[finite] < 0) | (p[finite] > 1)]}")
    out = np.full(p.shape, np.nan)
    ranked = np.flatnonzero(finite)[np.argsort(p[finite], kind="stable")]
    m = len(ranked)
    scaled = (m - np.arange(m)) * p[ranked]
    out[ranked] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


def compare(
    runs: pd.DataFrame,
    reference: Mapping[str, str],
    metric: str = "test_accuracy",
    norm_order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per (condition group, norm ≠ reference): the paired-by-seed comparison with the reference.

    ``runs`` is runs.csv (one row per run); ``reference`` maps each study in it to its reference norm.
    ``n_excluded`` counts the seeds run for both norms that cannot be paired because either run diverged
    (or has no finite ``metric``); seeds run for only one of the two are not pairs and not counted.
    Comparisons that cannot be tested say why in ``note`` and carry NaN: fewer than 2 pairs, the reference
    not run in the group, or differences all equal (zero variance; all exactly 0 gives p = 1).

    Rows are sorted by study, depth, batch size, then norm in ``norm_order`` (norms it does not list
    follow in the order they first appear in ``runs``; that order alone when it is None).
    """
    _check(runs, reference, metric)
    first_seen = list(dict.fromkeys(runs["norm"]))
    order = [*(norm_order or ()), *[n for n in first_seen if n not in (norm_order or ())]]
    rank = {norm: i for i, norm in enumerate(order)}

    rows = []
    for key, group in runs.groupby(GROUP, sort=False, dropna=False):
        ref = reference[key[0]]
        by_norm = {norm: _values_by_seed(g, metric) for norm, g in group.groupby("norm", sort=False)}
        for norm, (values, usable) in by_norm.items():
            if norm == ref:
                continue
            row = {**dict(zip(GROUP, key, strict=True)), "metric": metric, "norm": norm, "reference": ref}
            if ref not in by_norm:
                rows.append({**row, **_untested(0, 0, f"reference norm {ref!r} not run in this group")})
                continue
            ref_values, ref_usable = by_norm[ref]
            both = values.index.intersection(ref_values.index, sort=True)
            paired = both[usable.loc[both].to_numpy() & ref_usable.loc[both].to_numpy()]
            a, b = values.loc[paired].to_numpy(), ref_values.loc[paired].to_numpy()
            rows.append({**row, **_paired_test(a, b, n_excluded=len(both) - len(paired))})

    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    if out.empty:
        return out.astype({"significant": bool})
    out["p_holm"] = out.groupby("study", sort=False)["p_value"].transform(lambda p: holm(p.to_numpy()))
    out["significant"] = (out["p_holm"] < ALPHA).astype(bool)  # NaN compares False: not shown significant
    out["_rank"] = out["norm"].map(rank)
    out = out.sort_values(["study", "dataset", "model", "depth", "batch_size", "_rank"], kind="stable")
    return out.drop(columns="_rank").reset_index(drop=True)


def write_comparisons(
    runs: pd.DataFrame,
    reference: Mapping[str, str],
    path: str | Path,
    metric: str = "test_accuracy",
    norm_order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """:func:`compare` written atomically to ``path`` as CSV; returns the table."""
    comparisons = compare(runs, reference, metric=metric, norm_order=norm_order)
    write_csv(comparisons, path)
    return comparisons


def describe(comparisons: pd.DataFrame) -> list[str]:
    """One plain-English sentence per row of :func:`compare`'s table, saying whether the difference is
    significant at 5% after Holm's correction. The study is named only when the table holds several."""
    missing = [c for c in COMPARISON_COLUMNS if c not in comparisons.columns]
    if missing:
        raise ValueError(f"comparisons lack column(s) {', '.join(missing)} (expected {COMPARISON_COLUMNS})")
    several_studies = comparisons["study"].nunique() > 1
    return [_sentence(row, several_studies) for row in comparisons.to_dict("records")]


# ---------------------------------------------------------------------------------------------------------
# helpers


def _check(runs: pd.DataFrame, reference: Mapping[str, str], metric: str) -> None:
    needed = [*RUN_KEYS, "status", metric]
    missing = [c for c in needed if c not in runs.columns]
    if missing:
        raise ValueError(
            f"runs lack column(s) {', '.join(missing)} (has: {', '.join(map(str, runs.columns))})"
        )
    for study, study_runs in runs.groupby("study", sort=True):
        if study not in reference:
            known = ", ".join(map(str, reference)) or "none"
            raise ValueError(f"no reference norm for study {study!r} (reference has: {known})")
        norms = list(dict.fromkeys(study_runs["norm"]))
        if reference[study] not in norms:
            raise ValueError(
                f"reference norm {reference[study]!r} of study {study!r} was not run in that study "
                f"(choose from: {', '.join(map(str, norms))})"
            )
    duplicated = runs[runs.duplicated(RUN_KEYS, keep=False)]
    if not duplicated.empty:
        first = ", ".join(f"{k}={v}" for k, v in zip(RUN_KEYS, duplicated[RUN_KEYS].iloc[0], strict=True))
        raise ValueError(f"runs has more than one row for a run ({len(duplicated)} such rows), e.g. {first}")


def _values_by_seed(runs: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series]:
    """The metric per seed and whether that seed can be paired (completed, finite value)."""
    values = pd.to_numeric(runs[metric], errors="coerce").astype(float)
    usable = (runs["status"] == "completed").to_numpy() & np.isfinite(values.to_numpy())
    index = pd.Index(runs["seed"], name="seed")
    return pd.Series(values.to_numpy(), index=index), pd.Series(usable, index=index)


def _untested(n_pairs: int, n_excluded: int, note: str) -> dict:
    nan = np.nan
    return {"n_pairs": n_pairs, "n_excluded": n_excluded, "mean_diff": nan, "ci95_low": nan, "ci95_high": nan,
            "t": nan, "p_value": nan, "note": note}  # fmt: skip


def _paired_test(a: np.ndarray, b: np.ndarray, n_excluded: int) -> dict:
    """The paired comparison of ``a`` (norm) with ``b`` (reference), one value per seed in both."""
    n = len(a)
    if n < 2:
        return _untested(n, n_excluded, NOTE_FEW_SEEDS)
    diffs = a - b
    mean, _, lo, hi = mean_ci(diffs)
    row = {"n_pairs": n, "n_excluded": n_excluded, "mean_diff": mean, "ci95_low": lo, "ci95_high": hi}
    # Differences equal up to float round-off (0.95 - 0.93 and 0.93 - 0.91 differ in binary) have no
    # variance to speak of, and t = mean / 0 is undefined: scipy would return inf (p = 0) or NaN, or a
    # huge t from the round-off. Claim neither; all-zero differences are no evidence of an effect: p = 1.
    round_off = 64 * np.finfo(float).eps * float(np.max(np.abs(np.concatenate([a, b]))))
    if np.ptp(diffs) <= round_off:
        if np.all(np.abs(diffs) <= round_off):
            return {**row, "mean_diff": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "t": np.nan, "p_value": 1.0,
                    "note": f"{NOTE_ALL_ZERO} ({NOTE_ZERO_VARIANCE}: t undefined, p set to 1)"}  # fmt: skip
        return {**row, "t": np.nan, "p_value": np.nan, "note": f"{NOTE_ZERO_VARIANCE}: t undefined"}
    test = stats.ttest_rel(a, b)  # two-sided, df = n - 1
    return {**row, "t": float(test.statistic), "p_value": float(test.pvalue), "note": ""}


def _sentence(row: Mapping, several_studies: bool) -> str:
    definition = R.MODELS.get(str(row["model"]))
    if definition is None:
        where = f"{row['model']} depth {row['depth']}"
    elif definition.fixed_depth is None:  # ResNet-14 for n=2
        where = f"{definition.title.split(' of ')[0].removeprefix('CIFAR ')}-{definition.layers(int(row['depth']))}"
    else:  # a model of one size
        where = definition.title.removeprefix("the ")
    where = f"{where}, batch {row['batch_size']}"
    if several_studies:
        where = f"{row['study']}, {where}"
    what = f"{row['norm']} − {row['reference']}"
    metric = str(row["metric"]).replace("_", " ")
    n, note = int(row["n_pairs"]), str(row["note"]) if pd.notna(row["note"]) else ""
    excluded = int(row["n_excluded"])
    dropped = f"; {excluded} excluded: diverged or no value" if excluded else ""
    if note.startswith("reference norm"):
        return f"{where}: {what}: {note}, nothing to compare."
    if n < 2:
        return f"{where}: {what}: {NOTE_FEW_SEEDS} ({n} paired seed{'s' if n != 1 else ''}{dropped})."
    mean, lo, hi, p = (float(row[c]) for c in ("mean_diff", "ci95_low", "ci95_high", "p_holm"))
    decimals = 3 if max(abs(mean), abs(lo), abs(hi)) >= 0.01 else 4
    seeds = f"{n} seeds{dropped}"
    if np.isnan(p):
        return (
            f"{where}: {what} = {_signed(mean, decimals)} {metric} in all {seeds} "
            f"({NOTE_ZERO_VARIANCE}: no t-test, significance not assessed)."
        )
    verdict = "significant" if p < ALPHA else "not significant"
    return (
        f"{where}: {what} = {_signed(mean, decimals)} {metric} "
        f"(95% CI {_signed(lo, decimals)} to {_signed(hi, decimals)}, {seeds}), "
        f"p {_p_text(p)} (Holm): {verdict} at 5%."
    )


def _signed(x: float, decimals: int) -> str:
    text = f"{x:+.{decimals}f}"
    if float(text) == 0:
        text = f"{0:+.{decimals}f}"  # no "-0.000"
    return text.replace("-", "−")


def _p_text(p: float) -> str:
    """'= 0.213', '< 0.001'; more digits only where rounding would put p on the other side of 5%."""
    if p < 0.001:
        return "< 0.001"
    for decimals in (3, 4, 5, 6):
        text = f"{p:.{decimals}f}"
        if (float(text) < ALPHA) == (p < ALPHA):
            break
    return f"= {text}"
