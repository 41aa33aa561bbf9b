"""Time one ResNet-14 train step per normalization layer, relative to ``nn.BatchNorm2d``.

What is measured: forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay 5e-4,
plus ``clamp_gates_`` on the batch-instance gates, as the trainer does) of
``normres.models.build_model("resnet", norm, 2, 3, 10, options)`` -- the CIFAR ResNet-14 of the
study (3 stages of 16/32/64 channels, 2 basic blocks each, a norm after every conv and in the
projection shortcuts, channels_last; gn with 8 groups) -- on a random batch of 128 32x32x3
images, eager (not compiled), on the CPU with 2 threads. Norms are interleaved within each round so
drift in machine load hits all of them alike. The table gives wall time per step (median, min, max
over rounds) and three ratios to ``torch_bn``: the median over rounds of (time / torch_bn's time in
the same round), the ratio of the minima (the least disturbed rounds; the most robust figure when
other processes share the CPU), and the median per-round ratio of process CPU time.

    PYTHONPATH=src python benchmarks/norm_step.py            # 7 rounds x 3 steps
    PYTHONPATH=src python benchmarks/norm_step.py --quick    # 3 rounds x 2 steps, batch 64
    PYTHONPATH=src python benchmarks/norm_step.py --norms torch_bn brn gbn frn evonorm_b0 evonorm_s0
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from normres.models import build_model
from normres.norms import clamp_gates_, gate_parameters
from normres.registry import NORMS

DEFAULT_NORMS = ["torch_bn", "bn", "in", "ln", "gn", "bin"]


def build(norm: str, options: dict) -> nn.Module:
    """The study's ResNet-14 (n = 2) with layer ``norm``, in train mode."""
    return build_model("resnet", norm, 2, 3, 10, options).train()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds x 2 steps, batch 64 (default: off)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default: 7, quick: 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round and norm (default: 3, quick: 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: 128, quick: 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument(
        "--norms",
        nargs="+",
        default=DEFAULT_NORMS,
        choices=list(NORMS),
        metavar="NORM",
        help=f"norms to time, from: {', '.join(NORMS)}; torch_bn is always added as the baseline "
        f"(default: {' '.join(DEFAULT_NORMS)})",
    )
    parser.add_argument("--gn-groups", type=int, default=8, help="groups for gn (default: 8)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    steps = args.steps or (2 if args.quick else 3)
    batch = args.batch_size or (64 if args.quick else 128)
    norms = ["torch_bn"] + [n for n in args.norms if n != "torch_bn"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    setups = {}
    for norm in norms:
        torch.manual_seed(0)
        model = build(norm, {"groups": args.gn_groups} if norm == "gn" else {})
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        setups[norm] = (model, opt, gate_parameters(model))

    def step(norm: str) -> None:
        model, opt, gates = setups[norm]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if gates:
            clamp_gates_(gates)

    for norm in norms:  # warm-up: allocator, first-call overheads
        for _ in range(2):
            step(norm)

    wall: dict[str, list[float]] = {n: [] for n in norms}
    cpu: dict[str, list[float]] = {n: [] for n in norms}
    for _ in range(rounds):
        for norm in norms:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(norm)
            wall[norm].append((time.perf_counter() - start_wall) / steps)
            cpu[norm].append((time.process_time() - start_cpu) / steps)

    def ratio(times: dict[str, list[float]], norm: str) -> float:
        """Median over rounds of the time relative to torch_bn in the same round."""
        return statistics.median(t / b for t, b in zip(times[norm], times["torch_bn"]))

    print(
        f"normres ResNet-14 (channels_last, eager), batch {batch}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {rounds} rounds x {steps} steps"
    )
    print(
        f"{'norm':<12}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'x bn (median)':>15}{'x bn (min)':>12}"
        f"{'x bn (cpu)':>12}"
    )
    for norm in norms:
        print(
            f"{norm:<12}{1e3 * statistics.median(wall[norm]):>11.1f}{1e3 * min(wall[norm]):>9.1f}"
            f"{1e3 * max(wall[norm]):>9.1f}{ratio(wall, norm):>15.2f}"
            f"{min(wall[norm]) / min(wall['torch_bn']):>12.2f}{ratio(cpu, norm):>12.2f}"
        )


if __name__ == "__main__":
    main()
