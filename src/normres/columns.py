"""Columns of the files the stages hand each other (``docs/architecture.md``), without torch: the
aggregation, plots and report read them on machines and in jobs that never import torch."""

from __future__ import annotations

HISTORY_COLUMNS = [
    "epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
    "test_accuracy", "feat_p1", "feat_p20", "feat_p80", "feat_p99", "seconds", "images_per_s",
]  # fmt: skip

# metrics.csv: one row per (split, statistics); statistics "as_trained" is the model as saved,
# "precise" and "batch" the other choices of batch-norm statistics (normres.bnstats).
METRIC_COLUMNS = ["split", "statistics", "accuracy", "micro_f1", "macro_f1", "loss"]
METRICS = METRIC_COLUMNS[2:]
STATISTICS = ("as_trained", "precise", "batch")

# robustness.csv: one row per (corruption, severity, adapted).
ROBUSTNESS_COLUMNS = ["corruption", "severity", "adapted", "accuracy", "loss", "images"]

RUN_KEYS = ["study", "dataset", "model", "norm", "depth", "batch_size", "seed"]
CONDITION = ["study", "dataset", "model", "norm", "depth", "batch_size"]


def metric_column(split: str, statistics: str, metric: str) -> str:
    """The runs.csv column of one metrics.csv value: ``test_accuracy``, ``test_precise_accuracy``."""
    return f"{split}_{metric}" if statistics == "as_trained" else f"{split}_{statistics}_{metric}"


# runs.csv metric columns, in order
RUN_METRICS = [metric_column(s, "as_trained", m) for s in ("train", "val", "test") for m in METRICS] + [
    metric_column("test", s, m) for s in STATISTICS[1:] for m in METRICS
]
CORRUPTION_METRICS = ["corruption_accuracy", "corruption_accuracy_adapted"]
