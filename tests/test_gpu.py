"""The GPU path: norms on CUDA against torch's layers, data and augmentation resident on the device,
bf16 autocast. Skipped where CUDA is absent (CI and the project's CPU machines); run on a GPU
machine with ``python -m pytest -q tests/test_gpu.py``."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from normres import data as D
from normres import train as T
from normres.models import build_model
from normres.norms import make_norm

from conftest import settings_for
from test_norms import SMALL_OPTIONS, _assert_close, _forward_backward, _input, _randomise_affine, _reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


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


def test_bin_on_cuda_matches_cpu():
    cpu, gpu = make_norm("bin", 8), make_norm("bin", 8).to(CUDA)
    with torch.no_grad():
        for m in (cpu, gpu):
            m.rho.copy_(torch.linspace(0, 1, 8))
    x, dy = _input((6, 8, 5, 7)), torch.randn(6, 8, 5, 7, generator=torch.Generator().manual_seed(3))
    y, dx, grads = _forward_backward(cpu, x, dy)
    y_g, dx_g, grads_g = _forward_backward(gpu, x.to(CUDA), dy.to(CUDA))
    _assert_close(y_g.cpu(), y)
    _assert_close(dx_g.cpu(), dx)
    for key in ("weight", "bias", "rho"):
        _assert_close(grads_g[key].cpu(), grads[key])


def test_run_data_and_augmentation_stay_on_the_gpu(prepared):
    settings = settings_for()
    data = T.load_run_data(prepared, settings, CUDA)
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert getattr(data, field).is_cuda, field
    assert data.train_x.dtype == torch.uint8  # uint8 on the device; floats only per batch
    aug = D.Augmentation.from_options({"rotation": 7, "brightness": 0.2, "contrast": 0.2}, data.spec)
    idx = next(D.batches(len(data.train_x), 16, T.epoch_generator(0, 0, CUDA)))
    assert idx.is_cuda
    xb = aug(data.train_x[idx], T.epoch_generator(0, 0, CUDA))
    assert xb.is_cuda and xb.dtype == torch.float32 and xb.shape == (16, 1, 28, 28)


def test_cpu_generator_draws_the_same_augmentation_for_a_gpu_batch():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = D.Augmentation(mean=(0.5,) * 3, std=(0.25,) * 3, crop_pad=4, flip=True)
    on_cpu = aug(x, torch.Generator().manual_seed(5))
    on_gpu = aug(x.to(CUDA), torch.Generator().manual_seed(5))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


@pytest.mark.parametrize("bf16", [False, True])
def test_train_run_on_cuda(tmp_path, prepared, bf16):
    settings = settings_for(norm="gn", norm_options={"gn": {"groups": 4}}, bf16=bf16)
    record = T.train_run(settings, prepared, tmp_path / "run", threads=1)
    assert record["hardware"]["device"] == "cuda" and record["status"] == "completed"
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["train_loss"].map(math.isfinite).all()
    assert history["val_accuracy"].iloc[-1] > 0.2  # the synthetic squares are learnable (chance 0.1)


def test_bf16_autocast_computes_features_in_bf16():
    model = build_model("resnet", "bn", 1, 3, 10).to(CUDA)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    with T.autocast(CUDA, bf16=True):
        features = model.features(x)
    assert features.dtype == torch.bfloat16
    assert torch.isfinite(features.float()).all()


def test_divergence_is_found_on_cuda_without_a_sync_per_step(tmp_path, prepared):
    settings = settings_for(norm="nn", optimizer={"lr": 1e6})
    record = T.train_run(settings, prepared, tmp_path / "run", threads=1)
    assert record["status"] == "diverged"
