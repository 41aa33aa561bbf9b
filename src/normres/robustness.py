"""Robustness under distribution shift: accuracy on corrupted test images, before and after
test-time adaptation of the normalization statistics.

The corrupted images (Hendrycks & Dietterich 2019; :mod:`normres.corruptions`) are built once per
dataset (:func:`corrupt_dataset`, the workflow's ``corrupt`` rule), seeded, for every corruption
and severity, and cached, so every run sees the same images. :func:`evaluate_robustness` scores a
run on them, and, for layers with running statistics, once more after re-estimating those
statistics on each corrupted set (Schneider et al. 2020, "Improving robustness against common
corruptions by covariate shift adaptation": the target's own statistics, their N = 0 case;
:func:`normres.bnstats.recalibrated`, on a copy of the model). Batch-independent layers (group,
layer, instance norm, FRN, none) have no statistics to re-estimate and are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from normres.bnstats import recalibrated
from normres.columns import ROBUSTNESS_COLUMNS
from normres.config import RobustnessSettings, RunSettings
from normres.corruptions import CORRUPTION_NAMES, SEVERITIES, build_corrupted_set, load_corrupted_set, save_corrupted_set
from normres.datasets import load_prepared, load_run_data
from normres.device import configure_torch, select_device
from normres.errors import DataError
from normres.evaluate import evaluate, user_norms_of
from normres.io import write_csv
from normres.models import load_model
from normres.norms import running_stat_layers

__all__ = ["corrupt_dataset", "evaluate_robustness"]

CORRUPTION_SEED = 0  # one corrupted set per dataset, the same for every study and run


def corrupt_dataset(data_path: str | Path, out: str | Path, images: int, threads: int = 1,
                    log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Every corruption at every severity of the first ``images`` test images of a prepared dataset."""
    torch.set_num_threads(max(1, threads))
    prepared = load_prepared(data_path)
    if images > len(prepared.test_x):
        raise DataError(f"{data_path}: {images} test images asked for, the dataset has {len(prepared.test_x)}")
    corrupted = build_corrupted_set(prepared.test_x[:images], CORRUPTION_NAMES, SEVERITIES, CORRUPTION_SEED)
    save_corrupted_set(corrupted, out)
    log(f"{prepared.name}: {len(CORRUPTION_NAMES)} corruptions x {len(SEVERITIES)} severities of {images} test images -> {out}")
    return Path(out)


def evaluate_robustness(
    settings: RunSettings,
    robustness: RobustnessSettings,
    model_path: str | Path,
    data_path: str | Path,
    corrupted_path: str | Path,
    out: str | Path,
    threads: int = 1,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """``robustness.csv`` of one run: accuracy and loss per corruption and severity (severity 0:
    the same images clean), and, for layers with running statistics, after adaptation."""
    dev = select_device(device)
    configure_torch(threads, dev, settings.deterministic, settings.tf32)
    model, _ = load_model(model_path, expect={"norm": settings.norm, "depth": settings.depth},
                          user_norms=user_norms_of(settings))  # fmt: skip
    model.to(dev).eval()
    data = load_run_data(data_path, settings, dev)
    corrupted = load_corrupted_set(corrupted_path)
    n = robustness.images
    if corrupted.images[corrupted.names[0]].shape[1] < n:
        raise DataError(f"{corrupted_path} holds {corrupted.images[corrupted.names[0]].shape[1]} images, {n} are needed")
    labels = data.test_y[:n]
    adapt = robustness.adapt and bool(running_stat_layers(model))
    rows = []

    def score(name: str, severity: int, adapted: bool, x: torch.Tensor) -> None:
        net = recalibrated(model, x, data.normalize, settings.batch_size) if adapted else model
        result = evaluate(net, x, labels, data.normalize)
        rows.append({"corruption": name, "severity": severity, "adapted": adapted, "accuracy": result.accuracy,
                     "loss": result.loss, "images": n})  # fmt: skip

    clean = data.test_x[:n]
    score("clean", 0, False, clean)
    if adapt:
        score("clean", 0, True, clean)
    for name in robustness.corruptions:
        for severity in robustness.severities:
            x = corrupted.get(name, severity)[:n].to(dev)
            score(name, severity, False, x)
            if adapt:
                score(name, severity, True, x)
        log(f"{name}: " + ", ".join(f"{r['accuracy']:.3f}" for r in rows[-len(robustness.severities) * (1 + adapt):]))
    if not adapt:
        log("no running statistics in this model: nothing to adapt, evaluated as trained")
    table = pd.DataFrame(rows, columns=ROBUSTNESS_COLUMNS)
    write_csv(table, out)
    return table
