import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from normres import train as T
from normres.augment import Augmentation
from normres.evaluate import evaluate_run, predict_csv
from normres.io import read_json
from normres.models import build_model, load_model

from conftest import settings_for, train_one_epoch_then_stop

TIMING = ["seconds", "images_per_s"]


def run(tmp_path, prepared, name="run", **kw):
    settings = settings_for(**kw)
    record = T.train_run(settings, prepared, tmp_path / name, threads=1)
    return settings, record, tmp_path / name


def test_train_run_writes_model_history_and_record(tmp_path, prepared):
    settings, record, out = run(tmp_path, prepared, eval_test_every_epoch=True)
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == T.HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2]
    assert history["test_accuracy"].notna().all()
    assert (history["feat_p1"] <= history["feat_p20"]).all() and (history["feat_p80"] <= history["feat_p99"]).all()
    rec = read_json(out / "run.json")
    assert rec["status"] == "completed" and rec["epochs_completed"] == 2
    assert rec["settings"] == settings.to_dict()
    assert rec["runtime"]["deterministic"] and not rec["runtime"]["tf32"] and rec["runtime"]["device"] == "cpu"
    assert rec["versions"]["torch"] == torch.__version__
    for key in ("git_commit", "hardware", "wall_seconds", "versions", "started_at", "finished_at"):
        assert key in rec
    assert rec["hardware"]["torch_threads"] == 1
    assert not (out / "checkpoint.pt").exists() and not (out / "progress.json").exists()
    model, blob = load_model(out / "model.pt", expect={"norm": "bn"})
    assert blob["dataset"] == "fashion_mnist"


def test_training_learns(tmp_path, prepared):
    _, _, out = run(tmp_path, prepared, epochs=4, augment={})
    h = pd.read_csv(out / "history.csv")
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert h["val_accuracy"].iloc[-1] > 0.3  # 10 classes: chance is 0.1


def test_same_seed_same_result(tmp_path, prepared):
    _, _, a = run(tmp_path, prepared, name="a")
    _, _, b = run(tmp_path, prepared, name="b")
    ha, hb = (pd.read_csv(d / "history.csv").drop(columns=TIMING) for d in (a, b))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    sa, sb = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_after_interruption_is_identical(tmp_path, prepared, monkeypatch):
    _, _, whole = run(tmp_path, prepared, name="whole", epochs=3)
    original = T.train_one_epoch
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(T, "train_one_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, prepared, name="cut", epochs=3)
    out = tmp_path / "cut"
    assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
    progress = read_json(out / "progress.json")  # what `normres status` reads
    assert progress["epoch"] == 1 and progress["epochs"] == 3 and progress["images_per_s"] > 0
    monkeypatch.setattr(T, "train_one_epoch", original)
    _, record, _ = run(tmp_path, prepared, name="cut", epochs=3)
    assert record["resumed_at_epochs"] == [1]
    ha, hb = (pd.read_csv(d / "history.csv").drop(columns=TIMING) for d in (whole, out))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path, prepared, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    torch.save({"format": T.CHECKPOINT_FORMAT, "settings": {"other": 1}, "epoch": 1}, out / "checkpoint.pt")
    _, record, _ = run(tmp_path, prepared, name="r")
    assert record["resumed_at_epochs"] == []
    assert (out / "checkpoint.stale.pt").exists()


def test_checkpoint_of_another_device_type_is_kept_and_refused(tmp_path, prepared, monkeypatch):
    """CUDA and the CPU draw batch order and augmentation from different random streams: a checkpoint
    written on one is never resumed on the other (nor thrown away)."""
    settings = settings_for(epochs=2)
    out = tmp_path / "r"
    train_one_epoch_then_stop(monkeypatch, settings, prepared, out)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["device_type"] == "cpu"
    ck["device_type"] = "cuda"
    torch.save(ck, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="written by this run on cuda, but this job runs on cpu"):
        T.train_run(settings, prepared, out, threads=1)
    assert (out / "checkpoint.pt").exists() and not (out / "checkpoint.stale.pt").exists()


def test_lr_schedule():
    from normres.config import ScheduleSettings

    sched = ScheduleSettings("multistep", (75, 95), 0.1)
    assert T.lr_at(0, 0.1, sched, 100) == 0.1
    assert T.lr_at(74, 0.1, sched, 100) == 0.1
    assert math.isclose(T.lr_at(75, 0.1, sched, 100), 0.01)
    assert math.isclose(T.lr_at(99, 0.1, sched, 100), 0.001)
    assert T.lr_at(50, 0.1, ScheduleSettings("cosine", (), 0.1), 100) == pytest.approx(0.05)


def test_gates_get_own_lr_and_no_weight_decay_and_stay_in_range(tmp_path, prepared):
    settings, record, out = run(tmp_path, prepared, norm="bin", optimizer={"lr": 0.5, "gate_lr_mult": 10})
    model, _ = load_model(out / "model.pt")
    from normres.norms import gate_parameters

    rhos = torch.cat([p.detach().flatten() for p in gate_parameters(model)])
    assert rhos.numel() > 0 and rhos.min() >= 0 and rhos.max() <= 1
    opt = T.make_optimizer(model, settings.optimizer)
    gate_group = opt.param_groups[1]
    assert gate_group["weight_decay"] == 0 and gate_group["lr_mult"] == 10
    T.set_lr(opt, 0.1)
    assert gate_group["lr"] == pytest.approx(1.0)


def test_divergence_is_recorded_and_the_saved_weights_are_finite(tmp_path, prepared):
    from normres.models import is_finite

    _, record, out = run(tmp_path, prepared, norm="nn", optimizer={"lr": 1e6, "momentum": 0.9})
    assert record["status"] == "diverged"
    assert (out / "model.pt").exists() and (out / "history.csv").exists()
    assert is_finite(load_model(out / "model.pt")[0])


def test_a_gpu_style_check_every_32_steps_keeps_the_last_finite_state():
    """With the GPU's check interval (32), up to 31 updates can follow the first non-finite loss; the
    model must come back to its state at the last check whose losses were all finite."""
    model = build_model("cnn", "brn", 1, 1, 10)  # running statistics and a step counter
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randint(0, 256, (64 * 8, 1, 28, 28), dtype=torch.uint8), torch.arange(64 * 8) % 10
    augment = Augmentation(mean=(0.5,), std=(0.25,))
    states, poisoned = [], 40

    def tracking(xb, generator):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        if len(states) > poisoned:  # from step 41 on, the inputs are NaN: losses NaN, updates NaN
            return torch.full((len(xb), 1, 28, 28), math.nan)
        return augment(xb, generator)

    with pytest.raises(T.Diverged, match="weights restored to step 31"):
        T.train_one_epoch(model, opt, x, y, 8, tracking, torch.Generator().manual_seed(0), check_every=32)
    assert len(states) == 64  # the check at step 64 found the NaNs of steps 41-64
    # the state at the check of step 32, the last whose losses were all finite: its weights (before
    # step 32's update) and its buffers (after step 32's forward), counters included
    params = dict(model.named_parameters())
    for key, value in model.state_dict().items():
        assert torch.isfinite(value.float()).all(), key
        assert torch.equal(value, (states[31] if key in params else states[32])[key]), key


@pytest.mark.parametrize("check_every", [1, 3, 1000])
def test_divergence_between_checks_is_still_found(check_every):
    """GPUs check the loss only every few steps (no host sync per step); a NaN in between, or
    after the last check of the epoch, must still end the epoch as diverged."""
    model = build_model("cnn", "nn", 1, 1, 10)
    with torch.no_grad():
        model.fc.bias.fill_(math.nan)  # every loss is NaN from the first step on
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) % 10
    augment = Augmentation(mean=(0.5,), std=(0.25,))
    with pytest.raises(T.Diverged, match="non-finite"):
        T.train_one_epoch(model, opt, x, y, 8, augment, torch.Generator().manual_seed(0), check_every=check_every)
    assert T.divergence_check_interval(torch.device("cpu")) == 1  # CPUs stop at the first bad step


def test_l1_penalty_shrinks_weights(tmp_path, prepared):
    _, _, plain = run(tmp_path, prepared, name="plain", optimizer={"lr": 0.05, "weight_decay": 0.0})
    _, _, l1 = run(tmp_path, prepared, name="l1", optimizer={"lr": 0.05, "weight_decay": 0.0}, l1={"bn": 0.01})
    norm = lambda d: sum(v.abs().sum() for k, v in torch.load(d / "model.pt", weights_only=True)["state_dict"].items() if "weight" in k)
    assert norm(l1) < norm(plain)


def test_load_model_refuses_other_architecture(tmp_path, prepared):
    _, _, out = run(tmp_path, prepared)
    with pytest.raises(ValueError, match="norm='bn', but norm='gn' was expected"):
        load_model(out / "model.pt", expect={"norm": "gn"})


def test_test_run_and_predict_csv(tmp_path, prepared):
    from normres.config import BnStatisticsSettings
    from normres.datasets import load_prepared
    from normres.pixels import write_pixel_csv

    settings, _, out = run(tmp_path, prepared)
    metrics = evaluate_run(settings, out / "model.pt", prepared, out / "predictions.csv", out / "metrics.csv",
                           bn_statistics=BnStatisticsSettings(precise_images=100, batch_size=16))
    assert metrics["split"].tolist() == ["train", "val", "test", "test", "test"]
    assert metrics["statistics"].tolist() == ["as_trained"] * 3 + ["precise", "batch"]
    assert metrics["accuracy"].between(0, 1).all()
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns) == ["index", "label", "prediction", "confidence"]
    test = metrics[(metrics.split == "test") & (metrics.statistics == "as_trained")]
    assert test["accuracy"].item() == pytest.approx((preds.label == preds.prediction).mean())
    test_x = load_prepared(prepared).test_x[:7]
    write_pixel_csv(tmp_path / "pixels.csv", test_x)
    labelled = predict_csv(out / "model.pt", tmp_path / "pixels.csv", tmp_path / "labels.csv")
    assert len(labelled) == 7
    assert labelled["prediction"].tolist() == preds["prediction"].iloc[:7].tolist()


def test_test_subset_evaluates_the_first_test_images(tmp_path, prepared):
    from normres.datasets import load_prepared

    settings, _, out = run(tmp_path, prepared, test_subset=9)
    evaluate_run(settings, out / "model.pt", prepared, out / "predictions.csv", out / "metrics.csv")
    preds = pd.read_csv(out / "predictions.csv")
    assert preds["index"].tolist() == list(range(9))
    assert preds["label"].tolist() == load_prepared(prepared).test_y[:9].tolist()


def test_test_subset_larger_than_the_test_split_is_named(tmp_path, prepared):
    with pytest.raises(ValueError, match="test_subset 200 exceeds the 120 test images"):
        run(tmp_path, prepared, test_subset=200)


def test_a_model_with_non_finite_weights_is_not_scored(tmp_path, prepared):
    settings, _, out = run(tmp_path, prepared)
    blob = torch.load(out / "model.pt", weights_only=True)
    blob["state_dict"]["fc.bias"][0] = math.nan
    torch.save(blob, out / "model.pt")
    metrics = evaluate_run(settings, out / "model.pt", prepared, out / "predictions.csv", out / "metrics.csv")
    assert metrics["accuracy"].isna().all()


def test_compile_model_leaves_the_model_as_it_was():
    model = build_model("cnn", "bin", 1, 1, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    step, seconds = T.compile_model(model, x, y)
    assert seconds > 0
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics included
    torch.testing.assert_close(step(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compile_switch_trains_like_eager(tmp_path, prepared):
    """`compile: true` trains through torch.compile (inductor) to the eager run's numbers, partial
    last batch included, and reports compile time apart from the epochs."""
    _, eager, a = run(tmp_path, prepared, name="eager", norm="gn", norm_options={"gn": {"groups": 4}}, epochs=1)
    _, compiled, b = run(tmp_path, prepared, name="compiled", norm="gn", norm_options={"gn": {"groups": 4}}, epochs=1, compile=True)
    assert eager["compile_seconds"] == 0 and compiled["compile_seconds"] > 0
    ha, hb = (pd.read_csv(d / "history.csv") for d in (a, b))
    for column in ("train_loss", "val_loss", "feat_p1", "feat_p99"):
        assert hb[column].iloc[0] == pytest.approx(ha[column].iloc[0], rel=1e-3, abs=1e-4), column


def test_configure_torch_follows_threads_and_is_deterministic_without_nan_filling():
    import subprocess
    import sys

    # a fresh interpreter: these are process-wide settings
    code = (
        "import sys, torch; from normres.device import configure_torch; configure_torch(1, torch.device('cpu')); "
        "print(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), "
        "torch.utils.deterministic.fill_uninitialized_memory, 'torch._inductor' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "True", "False", "False"]


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_cpu_training_job_keeps_triton_out_unless_it_compiles(tmp_path, prepared, compile_):
    """A training job's process (standalone) on the CPU without compile never imports triton, which
    torch.optim's import of dynamo would otherwise map in (~100 MB); a compiling one leaves it be."""
    import subprocess
    import sys

    pytest.importorskip("triton")  # installed with torch's CUDA wheels, as pinned here
    code = (
        "import sys, json; from conftest import settings_for; from normres.train import train_run; "
        f"s = settings_for(epochs=1, compile={compile_}); "
        f"train_run(s, {str(prepared)!r}, {str(tmp_path / 'run')!r}, device='cpu', standalone=True, log=lambda m: None); "
        "t = sys.modules.get('triton', 'never imported'); print(json.dumps('blocked' if t is None else str(type(t))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = out.stdout.split()[-1]
    assert (result == '"blocked"') == (not compile_), result
    assert (tmp_path / "run" / "model.pt").exists()
