"""Testing trained models into CSVs, and labelling CSVs of raw pixel rows.

Metrics: accuracy, micro- and macro-averaged F1 (from one confusion matrix, the definitions of
scikit-learn's ``f1_score`` with ``zero_division=0``, which the tests check against), and the
mean cross-entropy of the model's logits.

For layers with running statistics the test split is also scored with two other choices of
statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; :mod:`normres.bnstats`):
PreciseBN statistics recomputed over training images, and the test batch's own statistics. They
are rows of ``metrics.csv`` with ``statistics`` ``precise`` and ``batch``; ``as_trained`` rows use
the model as it was saved (for batch norm: its running, EMA, averages). The model file is never
changed: recalibrated statistics live in copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from normres import registry as R
from normres.augment import normalize
from normres.columns import METRIC_COLUMNS, METRICS
from normres.config import BnStatisticsSettings, RunSettings
from normres.datasets import load_run_data
from normres.device import configure_torch, select_device
from normres.io import write_csv
from normres.models import feature_quantiles, is_finite, load_model
from normres.pixels import read_pixel_csv

__all__ = [
    "METRIC_COLUMNS",
    "EvalResult",
    "classification_metrics",
    "confusion_matrix",
    "eval_batch_size",
    "evaluate",
    "evaluate_run",
    "predict_csv",
    "user_norms_of",
]



def eval_batch_size(device: torch.device) -> int:
    """Images per evaluation batch. On CPUs batches of ~128 keep feature maps in cache: batches
    of 1000 evaluate at half the speed and add 0.5 GB to a CIFAR job's peak memory. GPUs want
    large batches."""
    return 1000 if device.type == "cuda" else 128


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: Tensor  # (N,) int64
    confidence: Tensor  # (N,) float32, softmax probability of the prediction
    feature_quantiles: list[float] | None = None


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    normalize: Callable[[Tensor], Tensor],
    with_features: bool = False,
    batch_size: int | None = None,
    order: Tensor | None = None,
    set_eval: bool = True,
) -> EvalResult:
    """Loss, accuracy and predictions of ``model`` on uint8 images ``x``, in eval mode unless
    ``set_eval`` is False (the test-batch statistics keep their layers in train mode).

    ``order``: a permutation to form the batches in (for batch statistics, whose batches should
    be a random mix); predictions come back in the order of ``x`` all the same.
    """
    from normres.train import cross_entropy

    if set_eval:
        model.eval()
    batch_size = batch_size or eval_batch_size(x.device)
    if order is not None:
        order = order.to(x.device)
        x, y = x[order], y[order]
    losses, preds, confs, feats = [], [], [], []
    for start in range(0, len(x), batch_size):
        xb = normalize(x[start : start + batch_size])
        f = model.features(xb)  # (B, F)
        logits = model.head(f).float()
        losses.append(cross_entropy(logits, y[start : start + batch_size], reduction="sum"))
        conf, pred = logits.softmax(1).max(1)
        preds.append(pred)
        confs.append(conf)
        if with_features:
            feats.append(f.float())
    n = max(len(x), 1)
    pred, conf = torch.cat(preds).cpu(), torch.cat(confs).float().cpu()
    accuracy = (pred == y.cpu()).float().mean().item()
    if order is not None:  # back to the order of the images given
        inverse = torch.argsort(order.cpu())
        pred, conf = pred[inverse], conf[inverse]
    return EvalResult(
        loss=torch.stack(losses).sum().item() / n,
        accuracy=accuracy,
        predictions=pred,
        confidence=conf,
        feature_quantiles=feature_quantiles(torch.cat(feats)) if with_features else None,
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


def user_norms_of(settings: RunSettings) -> dict[str, R.NormDef]:
    """The user layer of a run, as its settings (from the user's config) name it."""
    if settings.norm_class is None:
        return {}
    return {settings.norm: R.user_norm(settings.norm, settings.norm_class, settings.norm_sha256)}


def evaluate_run(
    settings: RunSettings,
    model_path: str | Path,
    data_path: str | Path,
    predictions_out: str | Path,
    metrics_out: str | Path,
    bn_statistics: BnStatisticsSettings | None = None,
    threads: int = 1,
    device: str | None = None,
) -> pd.DataFrame:
    """Evaluate a trained run on train/val/test; write test predictions and the metrics table.

    ``bn_statistics``: also score the test split with PreciseBN and test-batch statistics (for
    layers with running statistics). A model whose weights are not finite is not scored: its
    metrics are NaN (normres keeps a diverged run's last finite weights, so this only happens to
    models from elsewhere).
    """
    from normres.bnstats import batch_statistics_model, precise_statistics_model

    dev = select_device(device)
    configure_torch(threads, dev, settings.deterministic, settings.tf32)
    model, _ = load_model(model_path, expect={"model": settings.model, "norm": settings.norm, "depth": settings.depth},
                          user_norms=user_norms_of(settings))  # fmt: skip
    model.to(dev).eval()
    data = load_run_data(data_path, settings, dev)
    finite = is_finite(model)
    k = data.dataset.num_classes
    rows = []

    def score(split: str, statistics: str, net: nn.Module, x: Tensor, y: Tensor, **kw) -> EvalResult | None:
        if not finite:
            rows.append({"split": split, "statistics": statistics, **dict.fromkeys(METRICS, math.nan)})
            return None
        result = evaluate(net, x, y, data.normalize, **kw)
        rows.append({"split": split, "statistics": statistics, **classification_metrics(y, result, k)})
        return result

    for split, x, y in (("train", data.train_x, data.train_y), ("val", data.val_x, data.val_y)):
        score(split, "as_trained", model, x, y)
    test = score("test", "as_trained", model, data.test_x, data.test_y)
    if bn_statistics is not None:
        precise = precise_statistics_model(model, data.train_x, data.normalize, settings.batch_size,
                                           bn_statistics.precise_images, seed=settings.seed)  # fmt: skip
        score("test", "precise", precise, data.test_x, data.test_y)
        batch_model, order = batch_statistics_model(model, len(data.test_x), seed=settings.seed)
        score("test", "batch", batch_model, data.test_x, data.test_y, batch_size=bn_statistics.batch_size, order=order,
              set_eval=False)
    y = data.test_y.cpu()
    predictions = pd.DataFrame(
        {
            "index": range(len(y)),
            "label": y.numpy(),
            "prediction": test.predictions.numpy() if test else -1,
            "confidence": test.confidence.numpy() if test else math.nan,
        }
    )
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    write_csv(predictions, predictions_out)
    write_csv(metrics, metrics_out)
    return metrics


@torch.inference_mode()
def predict_csv(
    model_path: str | Path,
    csv_in: str | Path,
    csv_out: str | Path,
    user_norms: dict[str, R.NormDef] | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Label a CSV of raw pixel rows (one image a row, values 0-255) with a trained model.

    Writes ``row, prediction, class, confidence``; nothing is written if the input is invalid. A
    model of a user layer needs that layer's entry (``user_norms``, from the user's config or
    command line).
    """
    model, blob = load_model(model_path, user_norms=user_norms)
    dataset = R.get_dataset(blob["dataset"])
    x = read_pixel_csv(csv_in, dataset)  # (N, C, H, W) uint8
    mean, std = tuple(blob["input"]["mean"]), tuple(blob["input"]["std"])
    batch_size = batch_size or eval_batch_size(x.device)
    preds, confs = [], []
    for start in range(0, len(x), batch_size):
        prob = model(normalize(x[start : start + batch_size], mean, std)).softmax(1)
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
