"""Testing trained models into CSVs, and labelling CSVs of raw pixel rows.

Metrics: accuracy, micro- and macro-averaged F1 (from one confusion matrix, the definitions of
scikit-learn's ``f1_score`` with ``zero_division=0``, which the tests check against), and the
mean cross-entropy of the model's logits.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from normres import data as D
from normres.io import read_json, write_csv
from normres.specs import METRIC_COLUMNS
from normres.train import (
    EvalResult,
    configure_torch,
    eval_batch_size,
    evaluate,
    load_model,
    load_run_data,
    select_device,
)



def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    labels, predictions = labels.cpu().long(), predictions.cpu().long()
    flat = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)


def classification_metrics(labels: Tensor, result: EvalResult, num_classes: int) -> dict[str, float]:
    """Accuracy, micro and macro F1 over all ``num_classes`` classes, and the loss.

    Per class F1 = 2 TP / (2 TP + FP + FN), 0 for a class neither present nor predicted; micro F1
    pools TP/FP/FN over classes, which for single-label predictions equals the accuracy.
    """
    cm = confusion_matrix(labels, result.predictions, num_classes).double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    per_class = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    total = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "accuracy": float(tp.sum() / cm.sum().clamp(min=1)),
        "micro_f1": float(2 * tp.sum() / total) if total > 0 else 0.0,
        "macro_f1": float(per_class.mean()),
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
def predict_csv(
    model_path: str | Path, csv_in: str | Path, csv_out: str | Path, batch_size: int | None = None
) -> pd.DataFrame:
    """Label a CSV of raw pixel rows (one image a row, values 0-255) with a trained model.

    Writes ``row, prediction, class, confidence``; nothing is written if the input is invalid.
    """
    model, blob = load_model(model_path)
    spec = D.DATASETS[blob["dataset"]]
    x = D.read_pixel_csv(csv_in, spec)  # (N, C, H, W) uint8
    batch_size = batch_size or eval_batch_size(x.device)
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
