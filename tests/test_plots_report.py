"""Figures (normres.plots) and the HTML report (normres.report) on small synthetic results in the
formats of docs/architecture.md: two studies, several norms, two seeds, one diverged run."""

from __future__ import annotations

import base64
import html
import io
import os
import re

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from normres import plots, report

EPOCHS = 6
HISTORY_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "feat_p1",
    "feat_p20",
    "feat_p80",
    "feat_p99",
    "seconds",
    "images_per_s",
]
# (study, dataset, model, norm, depth, batch_size); the diverged run is nn at b=128, seed 1
CONDITIONS = [
    ("cifar_batch", "cifar10", "resnet", norm, 1, b) for norm in ("bn", "gn", "nn") for b in (8, 128)
] + [("cifar_depth", "cifar10", "resnet", norm, n, 128) for norm in ("bn", "ln") for n in (1, 2)]
DIVERGED = ("cifar_batch", "nn", 1, 128, 1)
SEEDS = (0, 1)


def _history(rng: np.random.Generator, diverged: bool, per_epoch_test: bool) -> pd.DataFrame:
    epoch = np.arange(1, EPOCHS + 1)
    loss = 2.0 * np.exp(-epoch / 3) + rng.uniform(0, 0.05, EPOCHS)
    acc = 1 - loss / 2.3
    rows = pd.DataFrame(
        {
            "epoch": epoch,
            "lr": 0.1,
            "train_loss": loss * 0.9,
            "train_accuracy": acc + 0.02,
            "val_loss": loss,
            "val_accuracy": acc,
            "test_loss": loss if per_epoch_test else np.nan,
            "test_accuracy": acc if per_epoch_test else np.nan,
            "feat_p1": 0.0,
            "feat_p20": 0.1 * epoch,
            "feat_p80": 1.0 * epoch,
            "feat_p99": 3.0 * epoch,
            "seconds": 1.5,
            "images_per_s": 1000.0,
        }
    )
    if diverged:  # the loss explodes at epoch 3, then the run stops: no rows after, NaN in the last one
        rows.loc[2, ["train_loss", "val_loss"]] = [1e9, 1e12]
        rows.loc[3, ["train_loss", "val_loss", "val_accuracy", "feat_p99"]] = np.nan
        rows = rows.iloc[:4]
    return rows[HISTORY_COLUMNS]


@pytest.fixture(scope="module")
def results() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    histories, runs = [], []
    for study, dataset, model, norm, depth, b in CONDITIONS:
        for seed in SEEDS:
            diverged = (study, norm, depth, b, seed) == DIVERGED
            hist = _history(rng, diverged, per_epoch_test=study == "cifar_depth")
            keys = {
                "study": study,
                "dataset": dataset,
                "model": model,
                "norm": norm,
                "depth": depth,
                "batch_size": b,
                "seed": seed,
            }
            histories.append(hist.assign(**keys)[[*keys, *HISTORY_COLUMNS]])
            acc = np.nan if diverged else 0.8 + 0.01 * depth + rng.uniform(0, 0.02)
            runs.append(
                {
                    **keys,
                    "status": "diverged" if diverged else "completed",
                    "epochs": len(hist),
                    "wall_seconds": 9.0 * len(hist),
                    **{
                        f"{s}_{m}": acc
                        for s in ("train", "val", "test")
                        for m in ("accuracy", "micro_f1", "macro_f1")
                    },
                    **{f"{s}_loss": 0.5 for s in ("train", "val", "test")},
                    "run_dir": f"results/runs/{study}/{norm}/n{depth}_b{b}/seed{seed}",
                }
            )
    runs_df = pd.DataFrame(runs)
    keys = ["study", "dataset", "model", "norm", "depth", "batch_size"]
    summary = []
    for metric in ("test_accuracy", "test_micro_f1", "test_macro_f1", "test_loss"):
        stats = runs_df.groupby(keys)[metric].agg(["count", "mean", "std"]).reset_index()
        half = 12.71 * stats["std"] / np.sqrt(stats["count"])  # t(0.975, 1) for two seeds
        summary.append(
            stats.rename(columns={"count": "n"}).assign(
                metric=metric, ci95_low=stats["mean"] - half, ci95_high=stats["mean"] + half
            )
        )
    n_diverged = (
        runs_df.assign(d=runs_df["status"] == "diverged").groupby(keys)["d"].sum().rename("n_diverged")
    )
    summary_df = pd.concat(summary).merge(n_diverged.reset_index(), on=keys)
    summary_df = summary_df[[*keys, "metric", "n", "n_diverged", "mean", "std", "ci95_low", "ci95_high"]]
    frames = {"histories": pd.concat(histories, ignore_index=True), "runs": runs_df, "summary": summary_df}
    # through CSV and back, so dtypes (NaN, strings, inf) are what the workflow will read
    return {name: pd.read_csv(io.StringIO(df.to_csv(index=False))) for name, df in frames.items()}


def _legend_texts(fig: Figure) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _data_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.axison and (ax.lines or ax.patches or ax.collections or ax.images)]


def _check_png(path) -> None:
    """A written figure: a readable, non-blank PNG of sensible size with the usual file permissions."""
    assert path.is_file()
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "PNG must get the usual permissions"
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 400, image.shape
    assert image[..., :3].std() > 0.01, "blank image"


def test_curves_skip_empty_split_and_mark_diverged(results):
    batch = results["histories"].query("study == 'cifar_batch'")
    fig = plots.curves(batch, "loss", runs=results["runs"], title="loss <batch>")
    assert fig.get_suptitle() == "loss <batch>"
    axes = _data_axes(fig)
    assert len(axes) == 1, "test split has no data in this study and must be skipped"
    assert axes[0].get_xlabel() == "epoch" and "loss" in axes[0].get_ylabel()
    labels = _legend_texts(fig)
    assert {"bn b=8", "bn b=128", "gn b=8", "nn b=128", "nn b=128 (diverged)"} <= set(labels)
    assert not any("n=" in label for label in labels), "depth does not vary in this study"
    # the exploded loss (1e12) must not set the y-range
    assert axes[0].get_ylim()[1] < 10


def test_curves_both_splits_and_labels_with_depth(results):
    fig = plots.curves(results["histories"].query("study == 'cifar_depth'"), "accuracy")
    axes = _data_axes(fig)
    assert [ax.get_title() for ax in axes] == ["val split", "test split"]
    assert {"bn depth 1", "bn depth 2", "ln depth 1", "ln depth 2"} == set(_legend_texts(fig))
    # two seeds: a ±1 std band per line
    assert all(len(ax.collections) == 4 for ax in axes)


def test_curves_mixed_studies_label_with_study_and_reject_bad_metric(results):
    fig = plots.curves(results["histories"], "accuracy")
    assert any(label.startswith("cifar_depth: ") for label in _legend_texts(fig))
    with pytest.raises(ValueError, match="unknown metric 'f1'.*loss, accuracy"):
        plots.curves(results["histories"], "f1")


def test_feature_percentiles_one_panel_per_condition(results):
    depth = results["histories"].query("study == 'cifar_depth'")
    fig = plots.feature_percentiles(depth, title="features")
    axes = _data_axes(fig)
    assert fig.get_suptitle() == "features"
    assert sorted(ax.get_title() for ax in axes) == ["bn depth 1", "bn depth 2", "ln depth 1", "ln depth 2"]
    assert all(len(ax.lines) == 4 for ax in axes)
    assert set(_legend_texts(fig)) == {"p1", "p20", "p80", "p99"}
    batch = plots.feature_percentiles(
        results["histories"].query("study == 'cifar_batch'"), runs=results["runs"]
    )
    assert "nn b=128 (1 diverged)" in [ax.get_title() for ax in batch.axes]


def test_small_batch_error_against_batch_size_with_ci_bands(results):
    fig = plots.small_batch(results["runs"].query("study == 'cifar_batch'"))
    (ax,) = _data_axes(fig)
    assert fig.get_suptitle() and ax.get_xlabel().startswith("batch size") and ax.get_xscale() == "log"
    assert "test error" in ax.get_ylabel()
    assert {"bn", "gn", "nn", "diverged run"} == set(_legend_texts(fig))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "128"]
    assert len(ax.collections) >= 2, "a 95% CI band per line with two seeds"
    bn = results["runs"].query("study == 'cifar_batch' and norm == 'bn' and batch_size == 8")
    line = next(line for line in ax.lines if line.get_label() == "bn")
    assert line.get_ydata()[0] == pytest.approx(1 - bn["test_accuracy"].mean())


def test_depth_effect_uses_6n_plus_2_and_skips_cnn(results):
    runs = results["runs"]
    fig = plots.depth_effect(runs)
    (ax,) = _data_axes(fig)
    assert {"bn", "ln"} == set(_legend_texts(fig))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "14"]
    assert "6n" in ax.get_xlabel()
    as_cnn = runs.assign(model=np.where(runs["study"] == "cifar_depth", "cnn", runs["model"]))
    assert "no norm was run at more than one depth" in _all_text(plots.depth_effect(as_cnn))


def _all_text(fig: Figure) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_effect_empty_states(results):
    single = results["runs"].query("batch_size == 128 and depth == 1")
    fig = plots.small_batch(single)
    assert "no norm was run at more than one batch size" in _all_text(fig)
    assert fig.get_suptitle()
    assert "more than one depth" in _all_text(plots.depth_effect(single))


def test_final_accuracy_grouped_by_study(results, tmp_path):
    fig = plots.final_accuracy(results["summary"], runs=results["runs"])
    (ax,) = _data_axes(fig)
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[0] == "cifar_batch" and "cifar_depth" in ticks
    assert sum("(1 diverged)" in t for t in ticks) == 1
    assert {"bn", "gn", "nn", "ln", "has diverged seeds"} <= set(_legend_texts(fig))
    bars = [p for p in ax.patches if p.get_width() > 0]
    assert len(bars) == 10  # 10 conditions, all with at least one finished seed
    bn = results["summary"].query(
        "study == 'cifar_depth' and norm == 'bn' and depth == 2 and metric == 'test_accuracy'"
    )
    assert any(np.isclose(p.get_width(), bn["mean"].iloc[0]) for p in bars)
    assert plots.save(fig, tmp_path / "final.png") == tmp_path / "final.png"
    _check_png(tmp_path / "final.png")
    # without n_diverged in the summary, the diverged seeds are counted in runs
    fallback = plots.final_accuracy(results["summary"].drop(columns="n_diverged"), runs=results["runs"])
    assert sum("(1 diverged)" in t.get_text() for t in fallback.axes[0].get_yticklabels()) == 1


def test_select_misclassified_only_wrong_rows_by_confidence():
    predictions = pd.DataFrame(
        {
            "index": np.arange(20),
            "label": [i % 3 for i in range(20)],
            "prediction": [0] * 20,
            "confidence": [0.5] * 10 + list(np.linspace(0.9, 0.6, 10)),
        }
    )
    chosen = plots.select_misclassified(predictions, k=5)
    assert (chosen["label"] != chosen["prediction"]).all()
    assert chosen["confidence"].is_monotonic_decreasing
    assert list(chosen["index"]) == [10, 11, 13, 14, 16]
    # ties in confidence: lowest index first
    assert list(plots.select_misclassified(predictions.iloc[:10], k=3)["index"]) == [1, 2, 4]


def test_misclassified_grid_cells_and_empty_states(tmp_path):
    classes = ["zero", "one", "two"]
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    fig = plots.misclassified_grid(rgb, [0] * 10, [1] * 10, classes, "worst")
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert len(titles) == 10 and all("true: zero" in t and "pred: one" in t for t in titles)
    assert fig.axes[0].images[0].get_array().shape == (8, 8, 3)
    grey = plots.misclassified_grid(rgb[:3, :1], [2, 2, 2], [0, 1, 0], classes, "grey")
    assert len([ax for ax in grey.axes if ax.images]) == 3 and len(grey.axes) == 10
    assert grey.axes[0].images[0].get_array().ndim == 2
    assert all(not ax.axison for ax in grey.axes[3:]), "unused cells are blank"
    empty = plots.misclassified_grid(np.zeros((0, 1, 8, 8), np.uint8), [], [], classes, "none")
    assert "no misclassified test images" in _all_text(empty)
    with pytest.raises(ValueError, match="uint8"):
        plots.misclassified_grid(rgb.astype(np.float32), [0] * 10, [1] * 10, classes, "float")

    torch = pytest.importorskip("torch")
    predictions = pd.DataFrame(
        {
            "index": [0, 1, 2, 3],
            "label": [0, 1, 2, 0],
            "prediction": [0, 2, 1, 1],
            "confidence": [0.9, 0.8, 0.95, 0.7],
        }
    )
    path = plots.render_misclassified(predictions, torch.from_numpy(rgb), classes, "run", tmp_path / "m.png")
    assert matplotlib.image.imread(path).shape[0] > 200


@pytest.fixture(scope="module")
def tables(results) -> plots.Tables:
    from normres.significance import compare

    runs = results["runs"].copy()
    rng = np.random.default_rng(3)
    running = runs["norm"].isin(["bn"])  # the layers with running statistics
    runs["test_precise_accuracy"] = np.where(running, runs["test_accuracy"] + 0.01, np.nan)
    runs["test_batch_accuracy"] = np.where(running, runs["test_accuracy"] - 0.05, np.nan)
    rows = []
    for r in runs.itertuples():
        for corruption in ("gaussian_noise", "contrast"):
            for severity in (0, 1, 3, 5):
                if severity == 0 and corruption != "gaussian_noise":
                    continue
                name = "clean" if severity == 0 else corruption
                for adapted in (False, True) if r.norm == "bn" else (False,):
                    acc = max(0.1, r.test_accuracy - 0.1 * severity + (0.05 if adapted else 0) + rng.uniform(0, 0.01)) if r.status == "completed" else np.nan
                    rows.append({**{k: getattr(r, k) for k in ("study", "dataset", "model", "norm", "depth", "batch_size", "seed", "status")},
                                 "corruption": name, "severity": severity, "adapted": adapted, "accuracy": acc, "loss": 1.0, "images": 100})
    robustness = pd.DataFrame(rows)
    comparisons = compare(runs, {"cifar_batch": "bn", "cifar_depth": "bn"})
    return plots.Tables(runs, results["summary"], results["histories"], robustness, comparisons)


@pytest.fixture(scope="module")
def standard_figures(tables, tmp_path_factory) -> dict:
    """Every registry figure for both studies (and the ones across studies)."""
    from normres.registry import FIGURES

    out = tmp_path_factory.mktemp("figures")
    wanted = [(f.name, None, out / f"{f.name}.png") for f in FIGURES.values() if f.scope == "all"]
    wanted += [(f.name, s, out / f"{s}_{f.name}.png") for f in FIGURES.values() if f.scope == "study"
               for s in ("cifar_batch", "cifar_depth")]
    return plots.draw_figures(tables, wanted)


def test_every_registry_figure_is_drawn(standard_figures):
    from normres.registry import FIGURES

    per_study = [f.name for f in FIGURES.values() if f.scope == "study"]
    assert len(standard_figures) == 2 * len(per_study) + len(FIGURES) - len(per_study)
    for name, path in standard_figures.items():
        assert path.name == f"{name}.png"
        _check_png(path)


def test_bn_statistics_figure_has_three_bars_per_condition(tables):
    fig = plots.bn_statistics(tables.runs.query("study == 'cifar_batch'"))
    (ax,) = _data_axes(fig)
    assert set(_legend_texts(fig)) == {"EMA (as trained)", "PreciseBN", "test-batch statistics"}
    assert len([p for p in ax.patches if p.get_height() > 0]) == 3 * 2  # bn at batch 8 and 128
    none = plots.bn_statistics(tables.runs.query("norm == 'gn'"))
    assert "no completed run of a layer with running statistics" in _all_text(none)


def test_robustness_figures(tables):
    fig = plots.robustness_severity(tables.robustness.query("study == 'cifar_batch'"))
    (ax,) = _data_axes(fig)
    labels = set(_legend_texts(fig))
    assert {"bn b=8", "bn b=8 (adapted)", "gn b=8"} <= labels and "gn b=8 (adapted)" not in labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "1", "3", "5"]
    heat = plots.robustness_heatmap(tables.robustness.query("study == 'cifar_batch'"))
    image = heat.axes[0].images[0].get_array()
    assert image.shape == (3, 6)  # two corruptions and their mean, 3 norms x 2 batch sizes
    assert "no robustness results" in _all_text(plots.robustness_heatmap(tables.robustness.iloc[0:0]))


def _record(commit: str, torch_version: str, seconds: float, finished: str) -> dict:
    return {
        "versions": {"torch": torch_version, "numpy": "2.1.0"},
        "git_commit": commit,
        "hardware": {"device": "cuda", "gpu": "H100"},
        "wall_seconds": seconds,
        "finished_at": finished,
        "status": "completed",
    }


def test_collect_provenance():
    prov = report.collect_provenance(
        [
            _record("abc", "2.4.0", 3600, "2025-01-02T10:00:00"),
            _record("abc", "2.5.0", 1800.4, "2025-01-01T09:00:00"),
            {"git_commit": "def"},
        ]
    )
    assert prov["n_runs"] == 3
    assert prov["versions"] == {"numpy": ["2.1.0"], "torch": ["2.4.0", "2.5.0"]}
    assert prov["mixed_versions"] == ["torch"]
    assert prov["git_commits"] == [{"value": "abc", "runs": 2}, {"value": "def", "runs": 1}]
    assert prov["hardware"][0] == {"value": "device: cuda, gpu: H100", "runs": 2}
    assert prov["total_wall_seconds"] == pytest.approx(5400.4) and prov["total_compute"] == "1h 30m 00s"
    assert (prov["first_started"], prov["last_finished"]) == ("2025-01-01T09:00:00", "2025-01-02T10:00:00")


def test_report_is_self_contained_and_escaped(results, standard_figures, tmp_path):
    runs = results["runs"].copy()
    summary = results["summary"].copy()
    evil = "<script>alert(1)</script>"
    runs.loc[runs["norm"] == "ln", "norm"] = evil
    summary.loc[summary["norm"] == "ln", "norm"] = evil
    figures = {name: path for name, path in standard_figures.items()}
    rng = np.random.default_rng(2)
    grid = plots.misclassified_grid(
        rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8),
        [0, 1, 2, 0],
        [1, 2, 0, 2],
        ["a", "b", "c"],
        "grid",
    )
    figures["cifar_batch_bn_n1_b8_seed0_misclassified"] = plots.save(grid, tmp_path / "mis.png")
    prov = report.collect_provenance([_record("abc123", "2.4.0", 60, "2025-01-01T00:00:00")])
    setup = {
        "cifar_batch": {"epochs": 6, "norms": ["bn", "gn", "nn"], "batch_sizes": [8, 128]},
        "cifar_depth": {"epochs": 6, "lr": "0.1 & cosine"},
    }

    out = report.build_report(runs, summary, figures, prov, setup, tmp_path / "out" / "report.html")
    assert "Study cifar_batch. Loss per epoch" in out.read_text(encoding="utf-8")  # captions of normres.captions
    text = out.read_text(encoding="utf-8")
    assert list(out.parent.iterdir()) == [out], "one file, no temporaries"

    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == len(figures)
    assert all(base64.b64decode(u).startswith(b"\x89PNG") for u in uris)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text, re.IGNORECASE)
    assert "<link" not in text and "<script" not in text.replace(html.escape(evil), "")
    assert html.escape(evil) in text
    assert "0.1 &amp; cosine" in text
    for section in ("Setup", "Results", "Figures", "Provenance", "Most confidently misclassified"):
        assert section in text
    # summary numbers: the mean and 95% CI of one condition, formatted as in the table
    row = summary.query(
        "study == 'cifar_depth' and norm == 'bn' and depth == 2 and metric == 'test_accuracy'"
    ).iloc[0]
    assert f"{row['mean']:.4f} ± {row['std']:.4f}" in text
    assert f"[{row['ci95_low']:.4f}, {row['ci95_high']:.4f}]" in text
    assert text.count('<tr class="diverged">') == 2  # one summary row, one run row
    assert "1 diverged" in text and "abc123" in text and "torch" in text and "2.4.0" in text


def test_report_rejects_missing_figure(results, tmp_path):
    with pytest.raises(FileNotFoundError, match="loss"):
        report.build_report(
            results["runs"], results["summary"], {"loss": tmp_path / "none.png"}, {}, {}, tmp_path / "r.html"
        )


def test_settings_text_shows_unset_values():
    from normres.report import _describe

    assert _describe({"test_subset": None, "optimizer": {"lr": 0.1, "reference_batch_size": None}}) == (
        "optimizer: {lr: 0.1, reference_batch_size: –}, test_subset: –"
    )
