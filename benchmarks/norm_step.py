"""Time one ResNet-14 train step per normalization layer, relative to ``nn.BatchNorm2d``.

What is measured: forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay 5e-4,
plus ``clamp_gates_`` for batch-instance norm, as the trainer does) of a CIFAR ResNet-14
(3 stages of 16/32/64 channels, 2 basic blocks each, a norm after every conv; gn with 8 groups) on a
random batch of 128 32x32x3 images, on the CPU with 2 threads. The model is
``normres.models.build_model("resnet", norm, 2, 3, 10, options)`` when that imports, else a minimal
inline ResNet-14 (parameter-free shortcuts). Norms are interleaved within each round so
drift in machine load hits all of them alike. The table gives wall time per step (median, min, max
over rounds) and three ratios to ``torch_bn``: the median over rounds of (time / torch_bn's time in
the same round), the ratio of the minima (the least disturbed rounds; the most robust figure when
other processes share the CPU), and the median per-round ratio of process CPU time.

    PYTHONPATH=src python benchmarks/norm_step.py            # 7 rounds x 3 steps
    PYTHONPATH=src python benchmarks/norm_step.py --quick    # 3 rounds x 2 steps, batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from normres.norms import NORMS, clamp_gates_, make_norm


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, options: dict) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, cout, **options)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, cout, **options)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            # Option A shortcut (He et al. 2016, CIFAR): subsample and zero-pad channels.
            pad = cout - cin
            self.shortcut = _PadShortcut(stride, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PadShortcut(nn.Module):
    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class _InlineResNet(nn.Module):
    """Minimal CIFAR ResNet-(6n+2), used when ``normres.models`` is not importable."""

    def __init__(
        self, norm: str, options: dict, n: int = 2, in_channels: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.stem_norm = make_norm(norm, 16, **options)
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, norm, options))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_norm(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def build(norm: str, options: dict) -> tuple[nn.Module, str]:
    try:
        from normres.models import build_model
    except ImportError:
        return _InlineResNet(norm, options), "inline ResNet-14"
    return build_model("resnet", norm, 2, 3, 10, options), "normres.models ResNet-14"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds x 2 steps, batch 64 (default: off)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default: 7, quick: 3)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per round and norm (default: 3, quick: 2)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: 128, quick: 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument(
        "--norms",
        nargs="+",
        default=["torch_bn", "bn", "in", "ln", "gn", "bin"],
        choices=sorted(NORMS),
        help="norms to time; torch_bn is always added as the baseline (default: all but nn)",
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
        model, source = build(norm, {"groups": args.gn_groups} if norm == "gn" else {})
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        setups[norm] = (model, opt)

    def step(norm: str) -> None:
        model, opt = setups[norm]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        clamp_gates_(model)

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
        f"{source}, batch {batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{rounds} rounds x {steps} steps"
    )
    print(
        f"{'norm':<10}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'x bn (median)':>15}{'x bn (min)':>12}{'x bn (cpu)':>12}"
    )
    for norm in norms:
        print(
            f"{norm:<10}{1e3 * statistics.median(wall[norm]):>11.1f}{1e3 * min(wall[norm]):>9.1f}"
            f"{1e3 * max(wall[norm]):>9.1f}{ratio(wall, norm):>15.2f}"
            f"{min(wall[norm]) / min(wall['torch_bn']):>12.2f}{ratio(cpu, norm):>12.2f}"
        )


if __name__ == "__main__":
    main()
