"""Training throughput of normres against this machine's floor, with every target of issue #3.

What is measured, on the machine it runs on (CPU unless a GPU is present for the GPU line):

* **floor**: forward + backward + SGD step of ResNet-14 (n=2) with ``nn.BatchNorm2d``, eager, on one
  batch of 128 random 32x32x3 images already in memory, with 2 threads, in PyTorch's default NCHW
  layout. normres trains in channels_last (``normres.models``), which is faster on these CPUs: the
  same step in that layout is reported beside the floor;
* **eager norms**: the same step with each of normres's own layers (the classic hand-written ones
  and the literature's: every registry layer but ``torch_bn`` and ``nn``), relative to ``torch_bn`` in
  the same (channels_last) layout (target <= 1.3);
* **compiled**: the step under ``torch.compile`` for every norm, relative to the eager floor
  (target <= 0.95) and, for information, to eager ``torch_bn`` in channels_last; compile time
  reported separately (cold: the benchmark compiles into an empty
  inductor cache, as a first run on a fresh machine does);
* **end-to-end epoch**: a real ``normres train`` job (augmentation, validation of 10k images,
  history written) on a CIFAR-shaped dataset of random uint8 images, relative to the floor's time for
  the same number of training images (target <= 1.15), and, for the epoch's own overhead, relative to
  the channels_last step's time (both measured before and after the job, as the load of these
  machines drifts); the same job's **peak RSS** (target <= 1.5 GB);
* **parallel jobs**: two ``threads=1`` training jobs at once against one alone (target >= 1.7x);
* **small batches**: images/s of the real train loop (:func:`normres.train.train_one_epoch`, crop +
  flip, 2 threads) for ResNet-14 at batch 8 and 2 relative to batch 128, for torch_bn and gn
  (targets >= 0.4 and >= 0.15);
* **workflow overhead**: ``snakemake -n`` of the full default study, and a rerun with nothing to do
  of a study with the default study's every run, rule and figure, but tiny jobs on Fashion-MNIST
  (trained first, for real; target <= 5 s each);
* **GPU** (only where CUDA is available): ResNet-14 epoch seconds with data and augmentation on the GPU.

Every row says which device it measured: the CPU rows start their jobs with ``--device cpu``, also on
a machine with a GPU. Step timings are interleaved across variants and reported as medians over
rounds, because these machines are noisy. ``--quick`` shrinks everything so that CI can check that the benchmark works; its
ratios are indicative only.

    python benchmarks/bench.py            # the full benchmark (~40 min on 2 cores)
    python benchmarks/bench.py --no-rerun # without the rerun row, which trains 168 tiny runs first (~12 min)
    python benchmarks/bench.py --quick    # smoke mode (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from normres import registry as R
from normres.models import build_model, set_memory_format
from normres.norms import clamp_gates_, gate_parameters

REPO = Path(__file__).resolve().parents[1]
OWN = [n for n in R.NORMS if n not in ("torch_bn", "nn")]  # normres's own layers, classic and literature
NORM_OPTIONS = {"gn": {"groups": 8}, "evonorm_s0": {"groups": 8}}


# ------------------------------------------------------------------------------------------------
# train steps


def make_step(norm: str, batch: int, compiled: bool = False, nchw: bool = False):
    """One train step of ResNet-14 with ``norm``, in channels_last as normres trains (NCHW if asked)."""
    torch.manual_seed(0)
    model = build_model("resnet", norm, 2, 3, 10, NORM_OPTIONS.get(norm, {}))
    if nchw:
        model = set_memory_format(model, torch.contiguous_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if compiled:
        torch._dynamo.reset()  # a fresh compile per variant: dynamo falls back to eager after 8 of one frame
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    gates = gate_parameters(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        clamp_gates_(gates)

    t0 = time.perf_counter()
    step()  # first call: compilation (compiled) or allocator warm-up (eager)
    first = time.perf_counter() - t0
    step()
    return step, first


def interleaved(steps: dict, rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per step for each variant, ``rounds`` samples each, variants interleaved per round."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            times[name].append((time.perf_counter() - t0) / reps)
    return times


def ratio_to(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of the per-round ratio: robust to load drifting between rounds."""
    return statistics.median(t / b for t, b in zip(times[name], times[base]))


# ------------------------------------------------------------------------------------------------
# training jobs as the workflow runs them


def synthetic_cifar(path: Path, n_train: int, n_test: int) -> Path:
    g = torch.Generator().manual_seed(0)
    blob = {
        "name": "cifar10",
        "classes": [f"c{i}" for i in range(10)],
        "train_x": torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        "train_y": torch.randint(0, 10, (n_train,), generator=g),
        "test_x": torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        "test_y": torch.randint(0, 10, (n_test,), generator=g),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return path


def train_job(resources: Path, out: Path, threads: int, val_size: int, subset: int | None, device: str):
    """Start one ``normres train`` job (CIFAR protocol, 1 epoch) on ``device`` as the workflow would."""
    cmd = [sys.executable, "-m", "normres.cli", "train", "--dataset", "cifar10", "--model", "resnet",
           "--norm", "torch_bn", "--depth", "2", "--epochs", "1", "--batch-size", "128", "--device", device,
           "--val-size", str(val_size), "--threads", str(threads), "--resources", str(resources), "--out", str(out)]  # fmt: skip
    if subset:
        cmd += ["--train-subset", str(subset)]
    return subprocess.Popen([sys.executable, "-c", MEASURED, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Runs a command as its own child and prints that child's peak RSS. A process's ru_maxrss starts at
# the RSS of the process it was forked from (Linux carries the high-water mark across exec), so a
# job started straight from this benchmark, which holds compiled models, would be charged for them.
# Forked from this small launcher instead, the job's figure is its own.
MEASURED = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def small_batch_images_per_s(norm: str, batch: int, images: int, rounds: int) -> float:
    """Best images/s over ``rounds`` epochs of the real train loop (crop + flip, 2 threads) on random
    CIFAR-shaped uint8 images, ResNet-14 in channels_last."""
    from normres.augment import Augmentation
    from normres.config import OptimizerSettings
    from normres.train import make_optimizer, train_one_epoch

    torch.manual_seed(0)
    model = build_model("resnet", norm, 2, 3, 10, NORM_OPTIONS.get(norm, {}))
    opt = make_optimizer(model, OptimizerSettings("sgd", 0.01, 0.9, False, 1e-4, 10.0))
    aug = Augmentation(mean=(0.5,) * 3, std=(0.25,) * 3, crop_pad=4, flip=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(images) % 10
    train_one_epoch(model, opt, x[: 4 * batch], y[: 4 * batch], batch, aug, torch.Generator().manual_seed(0))  # warm-up
    epochs = [train_one_epoch(model, opt, x, y, batch, aug, torch.Generator().manual_seed(r)) for r in range(rounds)]
    return max(e.images / e.seconds for e in epochs)


def finish(proc: subprocess.Popen, out: Path) -> tuple[pd.Series, float]:
    """The job's last history row and its own peak RSS in GB (from its rusage, reported by the
    launcher of :data:`MEASURED`)."""
    stdout, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"training job failed:\n{err}")
    return pd.read_csv(out / "history.csv").iloc[-1], int(stdout.split()[-1]) / 1024**2  # KiB -> GiB


def default_study_shaped(config_path: Path) -> dict:
    """The default study's grid (every run, rule and figure) with tiny jobs on Fashion-MNIST.

    A rerun with nothing to do costs what the DAG costs: the number of jobs and files, not their
    size. CIFAR-10 and MNIST cannot be fetched here, so every study reads the Fashion-MNIST that
    Debian ships, for one epoch on a few images.
    """
    config = yaml.safe_load(config_path.read_text())
    config["data"] = {"mirrors": [], "download": False}
    for study in config["studies"].values():
        study.update(dataset="fashion_mnist", epochs=1, val_size=64, train_subset=128, test_subset=128, protocol=None)
        study["schedule"] = {"name": "constant"}
        study["eval_test_every_epoch"] = False
    return config


def snakemake_seconds(args: list[str], cwd: Path) -> float:
    snakemake = str(Path(sys.executable).parent / "snakemake")
    t0 = time.perf_counter()
    proc = subprocess.run([snakemake, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: small sizes, few rounds (default: off)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default: 7; quick: 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--no-rerun", action="store_true",
                   help="skip the nothing-to-do rerun of the default study (it first trains all its runs, tiny: ~20 min)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (2 if quick else 7)
    reps = 1 if quick else 3
    batch = 32 if quick else 128
    torch.set_num_threads(2)
    rows: list[tuple[str, float, str, float | None, bool | None]] = []  # name, value, target text, ratio, ok

    def add(name, value, target_text="", ratio=None, ok=None, device="cpu"):
        value, ratio, ok = float(value), None if ratio is None else float(ratio), None if ok is None else bool(ok)
        name = f"[{device}] {name}"
        rows.append((name, value, target_text, ratio, ok))
        print(f"  {name}: {value:.3f}" + (f"  (ratio {ratio:.2f}, target {target_text})" if ratio is not None else ""), flush=True)

    print(f"normres benchmark ({'quick' if quick else 'full'}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, batch {batch}, {rounds} rounds", flush=True)  # fmt: skip

    # 1. floor (NCHW) and every norm eager as trained (channels_last), interleaved
    eager = {"floor": make_step("torch_bn", batch, nchw=True)[0]}
    eager |= {norm: make_step(norm, batch)[0] for norm in ["torch_bn", "nn", *OWN]}
    t = interleaved(eager, rounds, reps)
    floor = statistics.median(t["floor"])
    step_cl = statistics.median(t["torch_bn"])
    add("floor: torch_bn eager NCHW img/s", batch / floor)
    add("torch_bn eager channels_last img/s", batch / step_cl)
    add("no norm eager channels_last img/s", batch / statistics.median(t["nn"]))
    for norm in OWN:
        r = ratio_to(t, norm, "torch_bn")
        add(f"eager {norm} step / torch_bn step", r, "<= 1.30", r, r <= 1.30)

    # 2. torch.compile, every norm, against the eager floor; cold compiles (an empty cache)
    work = Path(tempfile.mkdtemp(prefix="normres-bench-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")
    try:
        for norm in [] if args.no_compile else ["torch_bn", *OWN, "nn"][: 2 if quick else None]:
            step, compile_s = make_step(norm, batch, compiled=True)
            tc = interleaved({"compiled": step, "floor": eager["floor"], "torch_bn": eager["torch_bn"]}, rounds, reps)
            r = ratio_to(tc, "compiled", "floor")
            add(f"compiled {norm} step / eager floor", r, "<= 0.95", r, r <= 0.95)
            # the stricter comparison: against torch's eager kernels in the layout normres trains in
            add(f"compiled {norm} step / eager torch_bn channels_last step", ratio_to(tc, "compiled", "torch_bn"))
            add(f"compile seconds {norm}", compile_s)

        n_train, val = (2560, 1000) if quick else (50000, 10000)
        resources = work / "resources"
        synthetic_cifar(resources / "cifar10" / "data.pt", n_train, 10000 if not quick else 1000)

        # 3. end-to-end epoch + peak RSS of one CIFAR-shaped job (2 threads)
        hist, rss = finish(train_job(resources, work / "e2e", 2, val, None, "cpu"), work / "e2e")
        images = n_train - val
        after = interleaved({k: eager[k] for k in ("floor", "torch_bn")}, rounds, reps)
        floor_e2e = statistics.median(t["floor"] + after["floor"])
        step_cl_e2e = statistics.median(t["torch_bn"] + after["torch_bn"])
        e2e_ratio = hist["seconds"] / (images * floor_e2e / batch)  # floor time for as many training images
        add("end-to-end epoch seconds", hist["seconds"])
        add("end-to-end epoch / floor time", e2e_ratio, "<= 1.15", e2e_ratio, e2e_ratio <= 1.15)
        add("end-to-end epoch / channels_last step time", hist["seconds"] / (images * step_cl_e2e / batch))
        add("peak RSS of one training job (GB)", rss, "<= 1.5", rss / 1.5, rss <= 1.5)

        # 4. two threads=1 jobs at once vs one alone (train images/s from their histories)
        subset = 1280 if quick else 10240
        alone = finish(train_job(resources, work / "alone", 1, val, subset, "cpu"), work / "alone")[0]["images_per_s"]
        procs = [(train_job(resources, work / f"par{i}", 1, val, subset, "cpu"), work / f"par{i}") for i in range(2)]
        together = sum(finish(p, out)[0]["images_per_s"] for p, out in procs)
        r = together / alone
        add("two 1-thread jobs / one job (img/s)", r, ">= 1.70", r, r >= 1.70)

        # 4b. small batches: the train loop's images/s at batch 8 and 2 against batch 128. The targets are
        # the loop's (measured with torch's kernels); gn's rows show what a hand-written layer adds.
        for norm in ("torch_bn", "gn"):
            speed = {b: small_batch_images_per_s(norm, b, n, 1 if quick else 5)
                     for b, n in ((128, 256 if quick else 1280), (8, 64 if quick else 400), (2, 24 if quick else 200))}  # fmt: skip
            add(f"{norm} ResNet-14 train loop img/s at batch 128", speed[128])
            for b, target in ((8, 0.4), (2, 0.15)):
                r = speed[b] / speed[128]
                name = f"{norm} ResNet-14 train loop at batch {b} / batch 128 (img/s)"
                if norm == "torch_bn":
                    add(name, speed[b], f">= {target}", r, r >= target)
                else:
                    add(f"{name}, ratio {r:.2f}", speed[b])

        # 5. workflow overhead: dry run of the full default study; rerun with nothing to do
        dry = snakemake_seconds(["-n", "--cores", "2", "--quiet", "rules"], REPO)
        add("dry run of the default study (s)", dry, "<= 5", dry / 5, dry <= 5)
        if not quick and not args.no_rerun:
            wd = work / "wf"
            wd.mkdir()
            for name in ("Snakefile", "config.yaml"):
                shutil.copy(REPO / name, wd / name)
            shutil.copytree(REPO / "workflow", wd / "workflow", symlinks=True)
            shutil.copytree(REPO / "examples", wd / "examples")
            (wd / "shaped.yaml").write_text(yaml.safe_dump(default_study_shaped(REPO / "config.yaml")))
            t0 = time.perf_counter()
            snakemake_seconds(["--cores", "2", "--configfile", "shaped.yaml"], wd)
            runs = len(list((wd / "results" / "runs").glob("*/*/*/seed*/metrics.csv")))
            print(f"  (the default study's {runs} runs, tiny, trained in {time.perf_counter() - t0:.0f} s)", flush=True)
            noop = snakemake_seconds(["--cores", "2", "--configfile", "shaped.yaml"], wd)
            add(f"rerun of the default study ({runs} runs) with nothing to do (s)", noop, "<= 5", noop / 5, noop <= 5)

        # 6. GPU, where there is one
        if torch.cuda.is_available():
            hist, _ = finish(train_job(resources, work / "gpu", 8, val, None, "cuda"), work / "gpu")
            add(f"ResNet-14 epoch seconds ({torch.cuda.get_device_name()})", hist["seconds"], device="cuda")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n| measure | value | target | ratio | met |\n| --- | ---: | --- | ---: | --- |")
    for name, value, target, ratio, ok in rows:
        met = "" if ok is None else ("yes" if ok else "**no**")
        print(f"| {name} | {value:.3f} | {target} | {'' if ratio is None else f'{ratio:.2f}'} | {met} |")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(["measure", "value", "target", "ratio", "met"], r)) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
