"""normres.significance (paired comparisons with the reference norm, Holm) and plots.forest_plot, on small
hand-made runs tables whose answers are worked out in the tests."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from normres import plots
from normres.significance import COMPARISON_COLUMNS, compare, describe, holm, write_comparisons

T_975_DF2 = 4.302653  # Student t quantile 0.975 at df = 2, from a printed table


def run(norm, seed, acc, *, study="s", depth=1, batch_size=128, status="completed", model="resnet"):
    return {"study": study, "dataset": "cifar10", "model": model, "norm": norm, "depth": depth,
            "batch_size": batch_size, "seed": seed, "status": status, "test_accuracy": acc}  # fmt: skip


def runs_of(*rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def paired(diffs, *, norm="gn", base=(0.90, 0.85, 0.80, 0.75, 0.70), **keys) -> list[dict]:
    """Reference bn and ``norm`` runs, interleaved, whose per-seed differences are ``diffs`` (the bases vary
    by seed, so only a paired test sees the small differences clearly); ``[1::2]`` is the norm's runs alone.
    """
    return [
        r
        for s, d in enumerate(diffs)
        for r in (run("bn", s, base[s], **keys), run(norm, s, base[s] + d, **keys))
    ]


# ---------------------------------------------------------------------------------------------------------
# the numbers


def test_hand_computed_paired_test():
    # differences 0.01, 0.02, 0.03: mean 0.02, sd sqrt(((-0.01)^2 + 0 + 0.01^2) / 2) = 0.01,
    # se = 0.01 / sqrt(3), t = 0.02 / se = 2 sqrt(3) = 3.4641, df = 2;
    # for df = 2 the two-sided p has a closed form: p = 1 - t / sqrt(2 + t^2) = 1 - 3.4641 / sqrt(14)
    # = 0.07418
    row = compare(runs_of(*paired([0.01, 0.02, 0.03])), {"s": "bn"}).iloc[0]
    se = 0.01 / math.sqrt(3)
    t = 0.02 / se
    assert t == pytest.approx(3.4641, abs=1e-4)
    p = 1 - t / math.sqrt(2 + t**2)
    assert p == pytest.approx(0.07418, abs=1e-5)
    assert row["n_pairs"] == 3 and row["n_excluded"] == 0
    assert row["mean_diff"] == pytest.approx(0.02)
    assert row["t"] == pytest.approx(t, rel=1e-6)
    assert row["p_value"] == pytest.approx(p, rel=1e-6)
    assert row["ci95_low"] == pytest.approx(0.02 - T_975_DF2 * se, abs=1e-6)  # -0.004841
    assert row["ci95_high"] == pytest.approx(0.02 + T_975_DF2 * se, abs=1e-6)  # +0.044841
    assert row["p_holm"] == pytest.approx(p)  # the only comparison: m = 1
    assert not row["significant"] and row["note"] == ""
    assert (row["norm"], row["reference"], row["metric"]) == ("gn", "bn", "test_accuracy")


def test_holm_by_hand():
    # sorted: 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> raised to 0.06 by the running maximum
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # capped at 1; NaN stays NaN and does not count towards m
    # (m = 3 here): 0.02 x 3 = 0.06, 0.6 x 2 = 1.2 -> 1, 0.7 x 1 = 0.7 -> 1.2 by the running maximum -> 1
    adjusted = holm([0.7, np.nan, 0.02, 0.6])
    assert adjusted[[0, 2, 3]] == pytest.approx([1.0, 0.06, 1.0]) and np.isnan(adjusted[1])
    assert holm([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def test_holm_counts_every_group_of_a_study_but_not_other_studies():
    diffs = [0.01, 0.02, 0.03]  # p = 0.07418 in each comparison
    runs = runs_of(
        *paired(diffs, study="a", batch_size=8),
        *paired(diffs, study="a", batch_size=128),
        *paired(diffs, study="a", batch_size=128, norm="ln")[1::2],  # ln beside the same bn runs
        *paired(diffs, study="b"),
    )
    out = compare(runs, {"a": "bn", "b": "bn"})
    p = 1 - 2 * math.sqrt(3) / math.sqrt(14)
    a, b = out[out["study"] == "a"], out[out["study"] == "b"]
    assert len(a) == 3 and len(b) == 1
    assert a["p_holm"].tolist() == pytest.approx([3 * p] * 3)  # m = 3: two batch sizes, two norms at 128
    assert b["p_holm"].tolist() == pytest.approx([p])  # study b alone: m = 1


def test_comparisons_without_a_p_value_do_not_count_towards_m():
    runs = runs_of(*paired([0.01, 0.02, 0.03]), *paired([0.05], norm="ln")[1::2])  # ln has a single seed
    out = compare(runs, {"s": "bn"}).set_index("norm")
    assert out.loc["gn", "p_holm"] == pytest.approx(out.loc["gn", "p_value"])  # m = 1, not 2


def test_significant_after_holm():
    # differences 0.10, 0.11, 0.12: mean 0.11, sd 0.01, t = 0.11 / (0.01 / sqrt 3) = 19.05,
    # p = 1 - t / sqrt(2 + t^2) = 0.00274 < 0.05
    row = compare(runs_of(*paired([0.10, 0.11, 0.12])), {"s": "bn"}).iloc[0]
    t = 0.11 / (0.01 / math.sqrt(3))
    assert row["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t**2), rel=1e-6)
    assert row["significant"]


# ---------------------------------------------------------------------------------------------------------
# pairing, exclusions and notes


def test_pairs_by_seed_only_where_both_completed():
    rows = [
        *paired([0.01, 0.02, 0.03]),  # seeds 0, 1, 2 of both norms
        run("gn", 3, 0.99),  # seed 3 only for gn: not a pair, not counted
        run("bn", 4, 0.50),
        run("gn", 4, 0.10, status="diverged"),  # seed 4: gn diverged -> excluded and counted
        run("bn", 5, 0.10, status="diverged"),
        run("gn", 5, 0.60),  # seed 5: the reference diverged -> excluded and counted
    ]
    rows.reverse()  # pairing goes by seed, not by row order
    row = compare(runs_of(*rows), {"s": "bn"}).iloc[0]
    assert row["n_pairs"] == 3 and row["n_excluded"] == 2
    assert row["mean_diff"] == pytest.approx(0.02)
    assert row["p_value"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-6)


def test_one_seed_gives_a_note_and_nan():
    row = compare(runs_of(*paired([0.02])), {"s": "bn"}).iloc[0]
    assert row["n_pairs"] == 1 and row["note"] == "needs >= 2 seeds"
    for column in ("mean_diff", "ci95_low", "ci95_high", "t", "p_value", "p_holm"):
        assert np.isnan(row[column]), column
    assert not row["significant"]


def test_reference_not_run_in_a_group_gives_a_note():
    runs = runs_of(
        *paired([0.01, 0.02, 0.03]), run("gn", 0, 0.8, batch_size=8), run("gn", 1, 0.8, batch_size=8)
    )
    out = compare(runs, {"s": "bn"})
    small = out[out["batch_size"] == 8].iloc[0]
    assert small["note"] == "reference norm 'bn' not run in this group"
    assert small["n_pairs"] == 0 and np.isnan(small["p_value"]) and not small["significant"]
    assert out.loc[out["batch_size"] == 128, "p_holm"].item() == pytest.approx(
        out.loc[out["batch_size"] == 128, "p_value"].item()
    )


def test_zero_variance_of_differences():
    # 0.95 - 0.93 and 0.93 - 0.91 are not equal in binary floating point; the test must not see a variance
    runs = runs_of(
        *paired([0.02, 0.02, 0.02], norm="gn", base=(0.93, 0.91, 0.89)),
        *paired([0.0, 0.0, 0.0], norm="ln", base=(0.93, 0.91, 0.89))[1::2],
    )
    out = compare(runs, {"s": "bn"}).set_index("norm")
    gn, ln = out.loc["gn"], out.loc["ln"]
    assert gn["mean_diff"] == pytest.approx(0.02) and np.isnan(gn["t"]) and np.isnan(gn["p_value"])
    assert "zero variance of differences" in gn["note"] and not gn["significant"]
    assert ln["p_value"] == 1.0 and ln["p_holm"] == 1.0 and ln["mean_diff"] == 0.0
    assert "all differences are 0" in ln["note"]


def test_columns_and_order():
    rows = []
    for depth in (2, 1):
        for b in (128, 8):
            for norm in ("ln", "bn", "gn"):  # first appearance: ln, bn, gn
                rows += [run(norm, s, 0.9 - 0.01 * s + (norm == "gn") * 0.01 * s, depth=depth, batch_size=b)
                         for s in range(3)]  # fmt: skip
    runs = runs_of(*rows)
    out = compare(runs, {"s": "bn"})
    assert list(out.columns) == COMPARISON_COLUMNS
    keys = list(zip(out["depth"], out["batch_size"], out["norm"], strict=True))
    assert keys == [(d, b, n) for d in (1, 2) for b in (8, 128) for n in ("ln", "gn")]
    by_order = compare(runs, {"s": "bn"}, norm_order=["bn", "gn", "ln"])
    assert by_order["norm"].tolist()[:2] == ["gn", "ln"]


def test_bad_input_names_the_problem():
    runs = runs_of(*paired([0.01, 0.02]))
    with pytest.raises(ValueError, match="lack column.*status"):
        compare(runs.drop(columns="status"), {"s": "bn"})
    with pytest.raises(ValueError, match="lack column.*test_loss"):
        compare(runs, {"s": "bn"}, metric="test_loss")
    with pytest.raises(ValueError, match=r"no reference norm for study 's' \(reference has: other\)"):
        compare(runs, {"other": "bn"})
    with pytest.raises(ValueError, match=r"reference norm 'bnn' .* \(choose from: bn, gn\)"):
        compare(runs, {"s": "bnn"})
    with pytest.raises(
        ValueError, match=r"more than one row for a run \(2 such rows\), e.g. study=s, dataset=cifar10"
    ):
        compare(pd.concat([runs, runs.iloc[:1]]), {"s": "bn"})


def test_empty_runs_give_an_empty_table(tmp_path):
    out = write_comparisons(runs_of(*paired([0.01]))[0:0], {}, tmp_path / "c.csv")
    assert out.empty and list(pd.read_csv(tmp_path / "c.csv").columns) == COMPARISON_COLUMNS


def test_write_comparisons_round_trips(tmp_path):
    path = tmp_path / "out" / "comparisons.csv"
    out = write_comparisons(runs_of(*paired([0.01, 0.02, 0.03])), {"s": "bn"}, path)
    back = pd.read_csv(path)
    assert list(back.columns) == COMPARISON_COLUMNS
    assert back["p_value"].tolist() == pytest.approx(out["p_value"].tolist())
    assert [p.name for p in path.parent.iterdir()] == ["comparisons.csv"]  # no temporary file left


# ---------------------------------------------------------------------------------------------------------
# sentences


def test_describe_wording():
    runs = runs_of(
        *paired([0.01, 0.02, 0.03], depth=2),  # p = 0.074: not significant
        *paired([0.10, 0.11, 0.12], norm="ln", depth=2)[1::2],  # p = 0.0027: significant
        *paired([0.05], norm="gn", batch_size=8, depth=2),
        run("gn", 1, 0.5, batch_size=8, depth=2, status="diverged"),
        run("bn", 1, 0.5, batch_size=8, depth=2),
    )
    out = compare(runs, {"s": "bn"})
    sentences = dict(zip(zip(out["batch_size"], out["norm"], strict=True), describe(out), strict=True))
    # Holm with m = 2 (the single-seed gn at batch 8 has no p-value): ln's p = 0.0027 ranks first, x 2;
    # gn's p = 0.07418 ranks second, x 1
    t_ln = 0.11 / (0.01 / math.sqrt(3))
    p_ln = 2 * (1 - t_ln / math.sqrt(2 + t_ln**2))
    p_gn = 1 - 2 * math.sqrt(3) / math.sqrt(14)
    assert sentences[(128, "gn")] == (
        "ResNet-14, batch 128: gn − bn = +0.020 test accuracy (95% CI −0.005 to +0.045, 3 seeds), "
        f"p = {p_gn:.3f} (Holm): not significant at 5%."
    )
    assert sentences[(128, "ln")].startswith(
        "ResNet-14, batch 128: ln − bn = +0.110 test accuracy (95% CI +0.085 to"
    )
    assert sentences[(128, "ln")].endswith(f"p = {p_ln:.3f} (Holm): significant at 5%.")
    assert sentences[(8, "gn")] == (
        "ResNet-14, batch 8: gn − bn: needs >= 2 seeds (1 paired seed; 1 excluded: diverged or no value)."
    )


def test_describe_names_the_study_only_when_several():
    runs = runs_of(
        *paired([0.01, 0.02, 0.03], study="a"), *paired([0.01, 0.02, 0.03], study="b", model="cnn")
    )
    lines = describe(compare(runs, {"a": "bn", "b": "bn"}))
    assert lines[0].startswith("a, ResNet-8, batch 128: gn − bn")
    assert lines[1].startswith("b, small CNN of the MNIST study, batch 128: gn − bn")  # one size: no depth
    assert describe(compare(runs_of(*paired([0.01, 0.02])), {"s": "bn"}))[0].startswith(
        "ResNet-8, batch 128:"
    )


def test_describe_reference_missing_and_zero_variance():
    runs = runs_of(
        *paired([0.02, 0.02, 0.02], base=(0.93, 0.91, 0.89)),
        run("gn", 0, 0.8, batch_size=8),
    )
    lines = describe(compare(runs, {"s": "bn"}))
    assert (
        lines[0]
        == "ResNet-8, batch 8: gn − bn: reference norm 'bn' not run in this group, nothing to compare."
    )
    assert "zero variance of differences" in lines[1] and "significance not assessed" in lines[1]


def test_describe_keeps_p_on_the_right_side_of_5_percent():
    out = compare(runs_of(*paired([0.01, 0.02, 0.03])), {"s": "bn"})
    out.loc[0, ["p_holm", "significant"]] = [0.04996, True]
    assert "p = 0.04996 (Holm): significant" in describe(out)[0]  # not "p = 0.050"
    out.loc[0, ["p_holm", "significant"]] = [0.0004, True]
    assert "p < 0.001 (Holm): significant" in describe(out)[0]


# ---------------------------------------------------------------------------------------------------------
# forest plot


def _comparisons() -> pd.DataFrame:
    runs = runs_of(
        *paired([0.01, 0.02, 0.03], batch_size=8),
        *paired([0.10, 0.11, 0.12], norm="ln", batch_size=8)[1::2],
        *paired([0.01, 0.02, 0.03], batch_size=128),
        *paired([0.05], norm="ln", batch_size=128)[1::2],  # one seed: a row with its note, no CI
        *paired([0.01, 0.02, 0.03], study="other"),
    )
    return compare(runs, {"s": "bn", "other": "bn"})


def _points(fig: Figure) -> list:
    """The mean-difference markers (not the CI caps, not the legend's empty handles)."""
    return [
        line for line in fig.axes[0].get_lines() if line.get_marker() == "o" and len(line.get_xdata()) == 1
    ]


def test_forest_plot_renders_one_row_per_comparison(tmp_path):
    comparisons = _comparisons()
    fig = plots.forest_plot(comparisons, "s")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["gn vs bn b=8", "ln vs bn b=8", "gn vs bn b=128", "ln vs bn b=128"]  # depth is constant
    assert ax.get_xlabel() == "difference in test accuracy (norm − reference)"
    assert any("needs >= 2 seeds" in t.get_text() for t in ax.texts)
    filled = [point.get_markerfacecolor() != "white" for point in _points(fig)]
    assert filled == [
        False,
        True,
        False,
    ]  # gn b=8 (p = 3 x 0.074), ln b=8 (3 x 0.0027), gn b=128; ln b=128 has no CI
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["significant (Holm p < 0.05)", "not significant"]
    path = plots.save(fig, tmp_path / "forest.png")
    assert matplotlib.image.imread(path).ndim == 3

    one = plots.forest_plot(comparisons, "other")  # nothing varies: labels are norm vs reference only
    assert [t.get_text() for t in one.axes[0].get_yticklabels()] == ["gn vs bn"]


def test_forest_plot_colours_by_norm():
    fig = plots.forest_plot(_comparisons(), "s")
    lines = _points(fig)
    assert lines[0].get_color() == plots._norm_colour("gn") and lines[1].get_color() == plots._norm_colour(
        "ln"
    )


def test_forest_plot_empty_states(tmp_path):
    comparisons = _comparisons()
    few = compare(runs_of(*paired([0.02])), {"s": "bn"})
    for data, study, message in (
        (few, "s", "needs >= 2 paired seeds"),
        (comparisons, "nowhere", "no comparisons for study 'nowhere'"),
        (comparisons.iloc[0:0], "s", "no comparisons"),
    ):
        fig = plots.forest_plot(data, study, title="t")
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any(message in t for t in texts), texts
        plots.save(fig, tmp_path / f"{study}.png")
    with pytest.raises(ValueError, match="lacks column.*p_holm"):
        plots.forest_plot(comparisons.drop(columns="p_holm"), "s")
