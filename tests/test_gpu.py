"""The GPU path, item by item of issue #11: norms on CUDA against torch's layers and under bf16
autocast (statistics float32), data and augmentation resident on the device, divergence with the
32-step check (last finite state kept), deterministic CUDA runs with TF32 recorded, a checkpoint
refused on another device type, torch.compile on CUDA, and a CUDA-trained model evaluated on the CPU.
Skipped where CUDA is absent (CI and the project's CPU machines; every item has a CPU counterpart
in the normal suite); run on a GPU machine with ``python -m pytest -q tests/test_gpu.py`` or
``make gpu-check``."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from normres import registry as R
from normres import train as T
from normres.augment import Augmentation
from normres.datasets import batches, load_run_data
from normres.device import select_device
from normres.evaluate import evaluate_run
from normres.models import build_model, is_finite, load_model
from normres.norms import make_norm

from conftest import make_prepared, settings_for, train_one_epoch_then_stop
from test_norms import SMALL_OPTIONS, _assert_close, _forward_backward, _input, _randomise_affine, _reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
TIMING = ["seconds", "images_per_s"]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", ["bn", "in", "ln", "gn"])
def test_norms_on_cuda_match_torch(name, layout):
    """The CUDA branch of the moments (one var_mean) against torch's CUDA layers, both layouts."""
    options = SMALL_OPTIONS.get(name, {})
    ours, ref = make_norm(name, 8, **options).to(CUDA), _reference(name, 8, **options).to(CUDA)
    _randomise_affine(ours, ref)
    x = _input((6, 8, 5, 7)).to(CUDA).contiguous(memory_format=layout)
    dy = torch.randn(6, 8, 5, 7, generator=torch.Generator().manual_seed(2)).to(CUDA)
    y, dx, grads = _forward_backward(ours, x, dy)
    y_ref, dx_ref, grads_ref = _forward_backward(ref, x, dy)
    assert y.is_contiguous(memory_format=layout)
    _assert_close(y, y_ref)
    _assert_close(dx, dx_ref)
    for key in ("weight", "bias"):
        _assert_close(grads[key], grads_ref[key])


@pytest.mark.parametrize("name", list(R.NORMS))
def test_every_norm_on_cuda_matches_the_cpu(name):
    options = {"groups": 4} if name in ("gn", "evonorm_s0") else {}
    torch.manual_seed(0)
    cpu = make_norm(name, 8, **options)
    gpu = make_norm(name, 8, **options).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    x, dy = _input((6, 8, 5, 7)), torch.randn(6, 8, 5, 7, generator=torch.Generator().manual_seed(3))
    y, dx, grads = _forward_backward(cpu, x, dy)
    y_g, dx_g, grads_g = _forward_backward(gpu, x.to(CUDA), dy.to(CUDA))
    _assert_close(y_g.cpu(), y, scale_tol=1e-4)
    _assert_close(dx_g.cpu(), dx, scale_tol=1e-4)
    for key in grads:
        _assert_close(grads_g[key].cpu(), grads[key], scale_tol=1e-4)


@pytest.mark.parametrize("name", list(R.NORMS))
def test_statistics_stay_float32_under_cuda_autocast(name):
    """Item 1 on the GPU: bf16 inputs under CUDA autocast, statistics in float32 (output error at the
    bf16 rounding of the output, not at bf16 statistics' ~1%)."""
    layer = make_norm(name, 16, **({"groups": 4} if name in ("gn", "evonorm_s0") else {})).to(CUDA)
    x = (torch.randn(8, 16, 6, 6, device=CUDA) + 4.0).bfloat16()
    reference = layer(x.float())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    error = (y.float() - reference).abs().mean() / reference.abs().mean().clamp(min=1e-6)
    assert error < 3e-3, f"{name}: relative error {float(error):.4f} under CUDA autocast"


def test_run_data_and_augmentation_stay_on_the_gpu(prepared):
    settings = settings_for()
    data = load_run_data(prepared, settings, CUDA)
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert getattr(data, field).is_cuda, field
    assert data.train_x.dtype == torch.uint8  # uint8 on the device; floats only per batch
    aug = Augmentation(mean=data.mean, std=data.std, rotation=7, brightness=0.2, contrast=0.2)
    idx = next(batches(len(data.train_x), 16, T.epoch_generator(0, 0, CUDA)))
    assert idx.is_cuda
    xb = aug(data.train_x[idx], T.epoch_generator(0, 0, CUDA))
    assert xb.is_cuda and xb.dtype == torch.float32 and xb.shape == (16, 1, 28, 28)


def test_cpu_generator_draws_the_same_augmentation_for_a_gpu_batch():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = Augmentation(mean=(0.5,) * 3, std=(0.25,) * 3, crop_pad=4, flip=True)
    on_cpu = aug(x, torch.Generator().manual_seed(5))
    on_gpu = aug(x.to(CUDA), torch.Generator().manual_seed(5))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


def test_no_host_sync_between_divergence_checks():
    """The train loop reads nothing back from the GPU between its checks every 32 steps."""
    model = build_model("cnn", "gn", 1, 1, 10, {"groups": 4}).to(CUDA)
    opt = T.make_optimizer(model, settings_for(norm="gn", norm_options={"gn": {"groups": 4}}).optimizer)
    x = torch.randint(0, 256, (31 * 8, 1, 28, 28), dtype=torch.uint8, device=CUDA)
    y = torch.arange(31 * 8, device=CUDA) % 10
    aug = Augmentation(mean=(0.5,), std=(0.25,))
    T.train_one_epoch(model, opt, x, y, 8, aug, T.epoch_generator(0, 0, CUDA))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gen = T.epoch_generator(0, 1, CUDA)
        for idx in list(batches(len(x), 8, gen, shuffle=True))[:31]:  # the loop's body, no check reached
            logits = model(aug(x[idx], gen))
            loss = T.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("bf16", [False, True])
def test_train_run_on_cuda(tmp_path, prepared, bf16):
    settings = settings_for(norm="gn", norm_options={"gn": {"groups": 4}}, bf16=bf16)
    record = T.train_run(settings, prepared, tmp_path / "run", threads=1)
    assert record["hardware"]["device"] == "cuda" and record["status"] == "completed"
    assert record["runtime"]["deterministic"] and record["runtime"]["tf32"] is False
    assert record["runtime"]["cublas_workspace_config"] == ":4096:8"
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["train_loss"].map(math.isfinite).all()
    assert history["val_accuracy"].iloc[-1] > 0.2  # the synthetic squares are learnable (chance 0.1)


def test_cuda_runs_are_deterministic(tmp_path, prepared):
    """Same settings, same GPU: bit-identical histories and weights (deterministic algorithms, cuBLAS
    workspace, cuDNN deterministic kernels)."""
    settings = settings_for(norm="bn", epochs=2)
    for name in ("a", "b"):
        T.train_run(settings, prepared, tmp_path / name, threads=1)
    ha, hb = (pd.read_csv(tmp_path / d / "history.csv").drop(columns=TIMING) for d in ("a", "b"))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    sa, sb = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"] for d in ("a", "b"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tf32_is_a_recorded_choice(tmp_path, prepared):
    record = T.train_run(settings_for(tf32=True, epochs=1), prepared, tmp_path / "run", threads=1)
    assert record["runtime"]["tf32"] is True and record["settings"]["tf32"] is True


def test_divergence_on_cuda_keeps_finite_weights(tmp_path):
    """Enough steps per epoch (100) that the 32-step check is reached mid-epoch; the saved model is
    the last finite state, and the test rule scores finite weights."""
    data = make_prepared(tmp_path / "fashion_mnist" / "data.pt", n_train=840, n_test=120)
    settings = settings_for(norm="nn", batch_size=8, val_size=40, optimizer={"lr": 1e6, "momentum": 0.9})
    record = T.train_run(settings, data, tmp_path / "run", threads=1)
    assert record["status"] == "diverged"
    model, _ = load_model(tmp_path / "run" / "model.pt")
    assert is_finite(model)


def test_a_cuda_checkpoint_is_not_resumed_on_the_cpu(tmp_path, prepared, monkeypatch):
    train_one_epoch_then_stop(monkeypatch, settings_for(), prepared, tmp_path / "run")  # on CUDA
    with pytest.raises(ValueError, match="written by this run on cuda, but this job runs on cpu"):
        T.train_run(settings_for(), prepared, tmp_path / "run", threads=1, device="cpu")


def test_compile_on_cuda_trains_like_eager(tmp_path, prepared):
    settings = settings_for(norm="gn", norm_options={"gn": {"groups": 4}}, epochs=1)
    eager = T.train_run(settings, prepared, tmp_path / "eager", threads=1)
    compiled = T.train_run(settings.with_changes(compile=True), prepared, tmp_path / "compiled", threads=1)
    assert compiled["compile_seconds"] > 0 and eager["compile_seconds"] == 0
    ha, hb = (pd.read_csv(tmp_path / d / "history.csv") for d in ("eager", "compiled"))
    assert hb["train_loss"].iloc[0] == pytest.approx(ha["train_loss"].iloc[0], rel=1e-2)


def test_a_cuda_trained_model_is_evaluated_on_a_cpu_only_node(tmp_path, prepared):
    settings = settings_for(norm="bn", epochs=1)
    out = tmp_path / "run"
    T.train_run(settings, prepared, out, threads=1)
    metrics = evaluate_run(settings, out / "model.pt", prepared, out / "predictions.csv", out / "metrics.csv", device="cpu")
    assert metrics["accuracy"].notna().all()


def test_a_job_given_a_gpu_uses_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("NORMRES_DEVICE", raising=False)
    assert select_device().type == "cuda"
