import numpy as np
import pandas as pd
import pytest
from scipy import stats

from normres.aggregate import RUN_COLUMNS, mean_ci, summarize, write_tables
from normres.train import train_run
from normres.evaluate import evaluate_run

from conftest import settings_for


def test_mean_ci_matches_scipy():
    x = np.array([0.91, 0.93, 0.92, 0.95])
    mean, std, lo, hi = mean_ci(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean()) and std == pytest.approx(x.std(ddof=1))
    assert (lo, hi) == pytest.approx(ref)
    assert np.isnan(mean_ci(np.array([0.5]))[1])


def test_summary_excludes_but_counts_diverged_runs():
    runs = pd.DataFrame(
        [
            {"study": "s", "dataset": "d", "model": "cnn", "norm": "bn", "depth": 1, "batch_size": 8, "seed": i,
             "status": "diverged" if i == 2 else "completed", "test_accuracy": [0.9, 0.8, 0.1][i]}
            for i in range(3)
        ]
    )
    s = summarize(runs, metrics=["test_accuracy"]).iloc[0]
    assert s["n"] == 2 and s["n_diverged"] == 1 and s["mean"] == pytest.approx(0.85)


def test_tables_from_real_runs(tmp_path, prepared):
    dirs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        train_run(settings_for(seed=seed, epochs=1), prepared, out)
        evaluate_run(settings_for(seed=seed, epochs=1), out / "model.pt", prepared, out / "predictions.csv",
                     out / "metrics.csv")
        dirs.append(out)
    runs = write_tables(dirs, tmp_path / "runs.csv", tmp_path / "summary.csv", tmp_path / "histories.csv")
    assert list(pd.read_csv(tmp_path / "runs.csv").columns) == RUN_COLUMNS
    assert runs["seed"].tolist() == [0, 1]
    summary = pd.read_csv(tmp_path / "summary.csv")
    acc = summary[summary.metric == "test_accuracy"].iloc[0]
    assert acc["n"] == 2 and acc["mean"] == pytest.approx(runs["test_accuracy"].mean())
    hist = pd.read_csv(tmp_path / "histories.csv")
    assert len(hist) == 2 and set(hist["seed"]) == {0, 1}
    assert runs["test_precise_accuracy"].isna().all()  # no batch-statistics analysis was asked for
    assert set(summary["metric"]) == {"train_accuracy", "train_micro_f1", "train_macro_f1", "train_loss",
                                      "val_accuracy", "val_micro_f1", "val_macro_f1", "val_loss",
                                      "test_accuracy", "test_micro_f1", "test_macro_f1", "test_loss"}


def test_missing_metrics_names_the_file(tmp_path, prepared):
    out = tmp_path / "r"
    train_run(settings_for(epochs=1), prepared, out)
    (out / "metrics.csv").write_text("split,accuracy\ntest,0.5\n")
    with pytest.raises(ValueError, match="metrics.csv lacks column\\(s\\) statistics, micro_f1"):
        write_tables([out], tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv")
    assert not (tmp_path / "a.csv").exists()


def test_bad_tables_are_named_not_tracebacks(tmp_path, prepared):
    out = tmp_path / "r"
    train_run(settings_for(epochs=1), prepared, out)
    (out / "metrics.csv").write_bytes(b"\xff\xfe\x00 binary")
    with pytest.raises(ValueError, match="metrics file .*metrics.csv is not a readable CSV file"):
        write_tables([out], tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv")
    (out / "metrics.csv").unlink()
    with pytest.raises(ValueError, match="metrics file .*metrics.csv does not exist"):
        write_tables([out], tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv")


def test_robustness_rows_are_summarised_per_run(tmp_path, prepared):
    from normres.aggregate import robustness_table

    path = tmp_path / "robustness.csv"
    pd.DataFrame(
        [("clean", 0, False, 0.9), ("noise", 1, False, 0.8), ("noise", 3, False, 0.6), ("noise", 1, True, 0.85),
         ("noise", 3, True, 0.75)], columns=["corruption", "severity", "adapted", "accuracy"]
    ).assign(loss=1.0, images=10).to_csv(path, index=False)
    table = robustness_table(path)
    assert table["corruption_accuracy"] == pytest.approx(0.7)  # the clean row is not a corruption
    assert table["corruption_accuracy_adapted"] == pytest.approx(0.8)
