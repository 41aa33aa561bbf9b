"""Where jobs compute (issue #11 on the CPU): a job given a GPU that CUDA cannot use stops with the
reason; the CPU stays possible on purpose; the train rule declares its GPU."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from normres import device as dev
from normres.errors import DeviceError

from conftest import REPO


@pytest.fixture
def no_gpu_variables(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "NORMRES_DEVICE", *dev._SLURM_GPU_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dev, "Path", lambda p: type("P", (), {"exists": lambda self: False})())


@pytest.mark.parametrize("variable, value", [("CUDA_VISIBLE_DEVICES", "0"), ("SLURM_JOB_GPUS", "1"),
                                             ("CUDA_VISIBLE_DEVICES", "GPU-5f1e")])  # fmt: skip
def test_a_job_given_a_gpu_that_cuda_cannot_use_fails_with_the_reason(monkeypatch, no_gpu_variables, variable, value):
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(dev, "_cuda_problem", lambda: "CUDA cannot start: Found no NVIDIA driver on your system")
    with pytest.raises(DeviceError) as err:
        dev.select_device()
    message = str(err.value)
    assert f"{variable}={value}" in message and "Found no NVIDIA driver" in message and "NORMRES_DEVICE=cpu" in message


def test_the_cpu_stays_possible_on_purpose(monkeypatch, no_gpu_variables):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(dev, "_cuda_problem", lambda: "no driver")
    assert dev.select_device("cpu").type == "cpu"
    monkeypatch.setenv("NORMRES_DEVICE", "cpu")
    assert dev.select_device().type == "cpu"


def test_no_gpu_given_means_the_cpu(no_gpu_variables, monkeypatch):
    assert dev.select_device().type == "cpu"
    for hidden in ("", "-1", "NoDevFiles"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert dev.gpu_allotted() is None


def test_asking_for_cuda_without_it_is_named(no_gpu_variables, monkeypatch):
    monkeypatch.setattr(dev, "_cuda_problem", lambda: "CUDA found no device")
    with pytest.raises(DeviceError, match="device 'cuda' was asked for, but CUDA found no device"):
        dev.select_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a working GPU")
def test_the_real_cuda_problem_is_described_here():
    problem = dev._cuda_problem()
    assert problem and len(problem) > 10  # e.g. "CUDA cannot start: Found no NVIDIA driver on your system"


def test_deterministic_cuda_settings_and_tf32_off(monkeypatch):
    code = (
        "import os, torch; from normres.device import configure_torch; "
        "r = configure_torch(1, torch.device('cuda'), deterministic=True, tf32=False); "
        "print(os.environ['CUBLAS_WORKSPACE_CONFIG'], torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, "
        "torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled(), "
        "torch.is_deterministic_algorithms_warn_only_enabled(), r['tf32'])"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == [":4096:8", "True", "False", "False", "False", "True", "False", "False"]


def test_the_train_rule_declares_a_gpu_resource():
    """snakemake --cores 8 on a one-GPU workstation must not start 8 jobs on the GPU: the train rule
    asks for `gpu` (1 where this machine has NVIDIA GPUs), limited with --resources gpu=N."""
    text = (REPO / "workflow/rules/train.smk").read_text()
    assert re.search(r"resources:\s+gpu=train_gpus\(\)", text)
    assert "--resources gpu=" in (REPO / "README.md").read_text()


def _bench():
    """benchmarks/bench.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks/bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_benchmarks_cpu_rows_run_on_the_cpu(monkeypatch, tmp_path):
    """On a GPU machine the bench's CPU rows (end-to-end epoch, peak RSS, parallel jobs) must not
    silently run on the GPU: each training job it starts names its device."""
    bench = _bench()
    started = []
    monkeypatch.setattr(bench.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    bench.train_job(tmp_path, tmp_path / "out", 1, 100, None, "cpu")
    assert started[0][started[0].index("--device") + 1] == "cpu"
    source = (REPO / "benchmarks/bench.py").read_text()
    calls = re.findall(r"(?<!def )train_job\(([^()]*)\)", source)
    assert len(calls) == 4 and all(args.endswith(('"cpu"', '"cuda"')) for args in calls), calls


def test_the_benchmarks_peak_rss_is_the_jobs_own(tmp_path):
    """Linux carries a process's RSS high-water mark across fork and exec, so a job started straight
    from the benchmark (which holds compiled models) was charged for the benchmark's memory; the
    launcher it starts jobs through reports the job's own peak."""
    bench = _bench()
    held = bytearray(600 * 1024**2)
    held[:: 4096] = b"\x01" * len(held[:: 4096])  # resident in this process
    small = "import pathlib; pathlib.Path('history.csv').write_text('seconds\\n1\\n')"
    proc = subprocess.Popen([sys.executable, "-c", bench.MEASURED, sys.executable, "-c", small], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _, rss_gb = bench.finish(proc, tmp_path)
    assert 0.001 < rss_gb < 0.2, rss_gb  # a bare interpreter: some MB, not this process's 600+
    del held
