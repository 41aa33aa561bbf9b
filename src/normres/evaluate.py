"""Testing trained models into CSVs, and labelling CSVs of raw pixel rows.

Metrics come from scikit-learn (accuracy, micro- and macro-averaged F1); the loss is the mean
cross-entropy of the model's logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import Tensor

from normres import data as D
from normres.io import read_json, write_csv
from normres.train import EvalResult, configure_torch, evaluate, load_model, load_run_data, select_device

METRIC_COLUMNS = ["split", "accuracy", "micro_f1", "macro_f1", "loss"]


def classification_metrics(labels: Tensor, result: EvalResult, num_classes: int) -> dict[str, float]:
    y, p = labels.cpu().numpy(), result.predictions.numpy()
    every = list(range(num_classes))
    return {
        "accuracy": float(accuracy_score(y, p)),
        "micro_f1": float(f1_score(y, p, average="micro", labels=every, zero_division=0)),
        "macro_f1": float(f1_score(y, p, average="macro", labels=every, zero_division=0)),
        "loss": result.loss,
    }


def evaluate_run(
    model_path: str | Path,
    run_record: str | Path,
    data_path: str | Path,
    predictions_out: str | Path,
    metrics_out: str | Path,
    threads: int = 1,
    device: str | None = None,
) -> pd.DataFrame:
    """Evaluate a trained run on train/val/test; write test predictions and the metrics table."""
    configure_torch(threads)
    dev = select_device(device)
    settings = read_json(run_record)["settings"]
    expect = {k: settings[k] for k in ("model", "norm", "depth")}
    model, _ = load_model(model_path, expect=expect)
    model.to(dev)
    data = load_run_data(data_path, settings, dev)
    rows = []
    for split, x, y in (
        ("train", data.train_x, data.train_y),
        ("val", data.val_x, data.val_y),
        ("test", data.test_x, data.test_y),
    ):
        result = evaluate(model, x, y, data.normalize)
        rows.append({"split": split, **classification_metrics(y, result, data.spec.num_classes)})
        if split == "test":
            predictions = pd.DataFrame(
                {
                    "index": range(len(y)),
                    "label": y.cpu().numpy(),
                    "prediction": result.predictions.numpy(),
                    "confidence": result.confidence.numpy(),
                }
            )
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    write_csv(predictions, predictions_out)
    write_csv(metrics, metrics_out)
    return metrics


@torch.inference_mode()
def predict_csv(model_path: str | Path, csv_in: str | Path, csv_out: str | Path, batch_size: int = 1000) -> pd.DataFrame:
    """Label a CSV of raw pixel rows (one image a row, values 0-255) with a trained model.

    Writes ``row, prediction, class, confidence``; nothing is written if the input is invalid.
    """
    model, blob = load_model(model_path)
    spec = D.DATASETS[blob["dataset"]]
    x = D.read_pixel_csv(csv_in, spec)  # (N, C, H, W) uint8
    preds, confs = [], []
    for start in range(0, len(x), batch_size):
        prob = model(D.normalize(x[start : start + batch_size], spec.mean, spec.std)).softmax(1)
        conf, pred = prob.max(1)
        preds.append(pred)
        confs.append(conf)
    pred = torch.cat(preds)
    classes = blob["classes"]
    out = pd.DataFrame(
        {
            "row": range(len(pred)),
            "prediction": pred.numpy(),
            "class": [classes[i] for i in pred.tolist()],
            "confidence": torch.cat(confs).numpy(),
        }
    )
    write_csv(out, csv_out)
    return out


def metrics_table(metrics_csv: str | Path) -> Mapping[str, Any]:
    """Read a metrics.csv into ``{"test_accuracy": ..., "val_loss": ...}``; errors name the file."""
    path = Path(metrics_csv)
    df = pd.read_csv(path)
    missing = set(METRIC_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)} (expected {METRIC_COLUMNS})")
    return {f"{r.split}_{m}": float(getattr(r, m)) for r in df.itertuples() for m in METRIC_COLUMNS[1:]}
