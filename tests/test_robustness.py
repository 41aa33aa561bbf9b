"""Nothing lost: resume after SIGKILL, atomic outputs, safe loading, clear errors for bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from normres.evaluate import predict_csv
from normres.io import UnsafeFileError, atomic_path, load_torch
from normres.models import load_model
from normres.train import train_run

from conftest import make_prepared, settings_for

TIMING = ["seconds", "images_per_s"]
TRAIN_ARGS = ["--dataset", "fashion_mnist", "--model", "cnn", "--norm", "bn", "--depth", "1", "--epochs", "6",
              "--batch-size", "32", "--lr", "0.05", "--milestones", "4", "--val-size", "40", "--crop-pad", "0",
              "--rotation", "5", "--threads", "1"]  # fmt: skip


def train_cli(resources: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "normres.cli", "train", *TRAIN_ARGS, "--resources", str(resources), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_after_checkpoint(proc: subprocess.Popen, ck: Path, newer_than: float = 0.0, extra_delay: float = 0.0) -> None:
    deadline = time.time() + 120
    while not (ck.exists() and ck.stat().st_mtime > newer_than):
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_twice_then_resume_is_bit_identical(tmp_path):
    resources = tmp_path / "resources"
    make_prepared(resources / "fashion_mnist" / "data.pt")
    whole = tmp_path / "whole"
    assert train_cli(resources, whole).wait() == 0

    cut = tmp_path / "cut"
    ck = cut / "checkpoint.pt"
    kill_after_checkpoint(train_cli(resources, cut), ck)  # killed right after epoch 1's checkpoint
    first = torch.load(ck, weights_only=True)["epoch"]
    kill_after_checkpoint(train_cli(resources, cut), ck, newer_than=ck.stat().st_mtime, extra_delay=0.15)
    assert not (cut / "model.pt").exists()
    assert torch.load(ck, weights_only=True)["epoch"] > first
    assert train_cli(resources, cut).wait() == 0

    record = pd.read_json(cut / "run.json", typ="series")
    assert len(record["resumed_at_epochs"]) == 2
    ha, hb = (pd.read_csv(d / "history.csv").drop(columns=TIMING) for d in (whole, cut))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    sa, sb = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (whole, cut))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list(cut.glob(".*.tmp")) and not ck.exists()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and oct(target.stat().st_mode & 0o777) != "0o600"


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"format": "normres-model/1", "state_dict": Payload(marker)}, evil)
    with pytest.raises(UnsafeFileError, match="refusing to load model file .*model.pt"):
        load_model(evil)
    assert not marker.exists()


def test_truncated_and_foreign_files_are_refused(tmp_path, prepared):
    out = tmp_path / "run"
    train_run(settings_for(epochs=1), prepared, out)
    data = (out / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsafeFileError, match="truncated or not a torch file"):
        load_model(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a normres model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="model='cnn', but model='resnet' was expected"):
        load_model(out / "model.pt", expect={"model": "resnet"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_torch(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "no image rows"),
        ("1,2,3\n", "line 1"),
        (",".join(["0"] * 784) + "\n" + ",".join(["0"] * 783 + ["x"]) + "\n", "line 2.*'x'"),
        (",".join(["0"] * 784) + "\n" + ",".join(["0"] * 783 + ["256"]) + "\n", "line 2"),
    ],
)
def test_bad_prediction_csv_names_the_line_and_writes_nothing(tmp_path, prepared, content, needle):
    out = tmp_path / "run"
    train_run(settings_for(epochs=1), prepared, out)
    bad = tmp_path / "in.csv"
    bad.write_text(content)
    with pytest.raises(ValueError, match=needle):
        predict_csv(out / "model.pt", bad, tmp_path / "labels.csv")
    assert not (tmp_path / "labels.csv").exists()
