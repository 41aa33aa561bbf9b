"""The first thing to run on a GPU machine (``make gpu-check``): is normres's GPU path right, and how fast?

1. the device: name, compute capability, memory, driver, torch and CUDA/cuDNN versions, and whether
   this torch build supports the GPU (``normres.device``);
2. ``tests/test_gpu.py`` (norms on CUDA, bf16 statistics, data on the device, divergence, determinism,
   resume, compile, evaluation on the CPU);
3. host synchronisations in a 40-step training epoch (``torch.cuda.set_sync_debug_mode``): the loop
   should read the GPU only at its divergence check (step 32) and at the epoch's end;
4. one ResNet-14 epoch of CIFAR-shaped data (40k random images, batch 128, crop + flip, 10k
   validation), eager and compiled, float32 and bf16 autocast: epoch seconds and images/s;
5. that model evaluated on the CPU, as a CPU-only login node or test job would.

Where no GPU is usable it says why and exits 0. It takes a few minutes (compilation dominates) and
stops well inside 10.

    python benchmarks/gpu_check.py            # everything
    python benchmarks/gpu_check.py --quick    # 8k images per epoch, no compile
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device_report() -> str | None:
    """Print what the GPU is; return the reason it cannot be used, or None."""
    from normres.device import _cuda_problem

    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    problem = _cuda_problem()
    if problem:
        return problem
    p = torch.cuda.get_device_properties(0)
    driver = "unknown"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else driver
    print(f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{torch.cuda.device_count()} device(s), driver {driver}; torch supports {', '.join(torch.cuda.get_arch_list())}")  # fmt: skip
    return None


def host_syncs(steps: int = 40) -> int:
    """Synchronising CUDA calls in one training epoch of ``steps`` steps (ResNet-14, batch 128)."""
    from normres import train as T
    from normres.augment import Augmentation
    from normres.config import OptimizerSettings
    from normres.models import build_model

    cuda = torch.device("cuda")
    model = build_model("resnet", "bn", 2, 3, 10).to(cuda)
    opt = T.make_optimizer(model, OptimizerSettings("sgd", 0.1, 0.9, False, 1e-4, 10.0))
    x = torch.randint(0, 256, (steps * 128, 3, 32, 32), dtype=torch.uint8, device=cuda)
    y = torch.arange(steps * 128, device=cuda) % 10
    aug = Augmentation(mean=(0.5,) * 3, std=(0.25,) * 3, crop_pad=4, flip=True)
    T.train_one_epoch(model, opt, x[:1280], y[:1280], 128, aug, T.epoch_generator(0, 0, cuda))  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            T.train_one_epoch(model, opt, x, y, 128, aug, T.epoch_generator(0, 1, cuda))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    for w in syncs:
        print(f"    sync: {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}")
    return len(syncs)


def epochs(quick: bool) -> None:
    from normres.config import RunSpec, validate_config
    from normres.evaluate import evaluate_run
    from normres.train import train_run

    work = Path(tempfile.mkdtemp(prefix="normres-gpu-check-"))
    try:
        n_train = 18000 if quick else 50000
        g = torch.Generator().manual_seed(0)
        data = work / "cifar10" / "data.pt"
        data.parent.mkdir(parents=True)
        torch.save({"name": "cifar10", "classes": [f"c{i}" for i in range(10)],
                    "train_x": torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
                    "train_y": torch.randint(0, 10, (n_train,), generator=g),
                    "test_x": torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8, generator=g),
                    "test_y": torch.randint(0, 10, (10000,), generator=g)}, data)  # fmt: skip
        variants = [(False, False), (False, True)] + ([] if quick else [(True, False), (True, True)])
        first = None
        for compiled, bf16 in variants:
            study = {"dataset": "cifar10", "model": "resnet", "seeds": [0], "epochs": 1, "val_size": 10000,
                     "grid": [{"norm": ["torch_bn"], "depth": [2], "batch_size": [128]}], "optimizer": {"lr": 0.1},
                     "augment": {"crop_pad": 4, "flip": True}, "compile": compiled, "bf16": bf16}  # fmt: skip
            settings = validate_config({"studies": {"gpu": study}}).run_settings(RunSpec("gpu", "torch_bn", 2, 128, 0))
            out = work / f"run-{compiled}-{bf16}"
            t0 = time.perf_counter()
            record = train_run(settings, data, out, threads=8, device="cuda", log=lambda _: None)
            history = __import__("pandas").read_csv(out / "history.csv").iloc[-1]
            print(f"  ResNet-14, {n_train - 10000} images, {'compiled' if compiled else 'eager'}, "
                  f"{'bf16' if bf16 else 'fp32'}: epoch {history['seconds']:.1f} s "
                  f"({history['images_per_s']:.0f} img/s train), compile {record['compile_seconds']:.1f} s, "
                  f"job {time.perf_counter() - t0:.1f} s", flush=True)
            first = first or (settings, out)
        settings, out = first
        t0 = time.perf_counter()
        metrics = evaluate_run(settings, out / "model.pt", data, out / "p.csv", out / "m.csv", threads=4, device="cpu")
        print(f"  that model on the CPU: test accuracy {metrics['accuracy'].iloc[-1]:.3f} (random labels: ~0.1), "
              f"{time.perf_counter() - t0:.1f} s for train/val/test", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller epochs, no compile (default: off)")
    args = parser.parse_args(argv)
    print("== device", flush=True)
    problem = device_report()
    if problem:
        print(f"no usable GPU here ({problem}): nothing to check. Run this on a GPU machine.")
        return 0
    print("== tests/test_gpu.py", flush=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests/test_gpu.py")])
    print("== host synchronisations in a 40-step epoch (expected: the check at step 32 and the epoch's end)", flush=True)
    print(f"  {host_syncs()} synchronising calls", flush=True)
    print("== one ResNet-14 epoch of CIFAR-shaped data", flush=True)
    epochs(args.quick)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
