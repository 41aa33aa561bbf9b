"""Shared fixtures: tiny prepared datasets in the real on-disk format, and study settings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from normres.config import RunSettings, RunSpec, validate_config

FASHION = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


def make_prepared(path: Path, name: str = "fashion_mnist", n_train: int = 240, n_test: int = 120) -> Path:
    """A learnable synthetic dataset: each class is a bright square of its own size (GAP can count area)."""
    c, h, w = (3, 32, 32) if name == "cifar10" else (1, 28, 28)
    g = torch.Generator().manual_seed(0)

    def images(n):
        y = torch.arange(n) % 10
        x = torch.randint(0, 60, (n, c, h, w), generator=g, dtype=torch.uint8)
        for i, label in enumerate(y.tolist()):
            side = 3 + 2 * label
            x[i, :, 2 : 2 + side, 2 : 2 + side] = 250
        return x, y

    train_x, train_y = images(n_train)
    test_x, test_y = images(n_test)
    blob = {
        "name": name,
        "classes": [f"class{i}" for i in range(10)],
        "train_x": train_x,
        "train_y": train_y,
        "test_x": test_x,
        "test_y": test_y,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return path


@pytest.fixture
def prepared(tmp_path) -> Path:
    return make_prepared(tmp_path / "fashion_mnist" / "data.pt")


TINY_STUDY = {
    "dataset": "fashion_mnist",
    "model": "cnn",
    "grid": [{"norm": ["bn"], "depth": [1], "batch_size": [32]}],
    "seeds": [0],
    "epochs": 2,
    "val_size": 40,
    "optimizer": {"lr": 0.05},
    "augment": {"rotation": 5, "brightness": 0.1, "contrast": 0.1},
}


def settings_for(norm="bn", model="cnn", depth=1, batch_size=32, seed=0, **study_overrides) -> RunSettings:
    study = copy.deepcopy(TINY_STUDY)
    study.update(model=model, grid=[{"norm": [norm], "depth": [depth], "batch_size": [batch_size]}])
    study.update(study_overrides)
    config = validate_config({"studies": {"t": study}})
    return config.run_settings(RunSpec("t", norm, depth, batch_size, seed))


def train_one_epoch_then_stop(monkeypatch, settings, data, out, **kw) -> None:
    """Train ``settings`` for one epoch into ``out`` and stop the job there, as a kill would: a
    checkpoint of epoch 1 is left behind."""
    from normres import train as T

    original, calls = T.train_one_epoch, {"n": 0}

    def stop_after_one(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(T, "train_one_epoch", stop_after_one)
        with pytest.raises(KeyboardInterrupt):
            T.train_run(settings, data, out, threads=1, **kw)
