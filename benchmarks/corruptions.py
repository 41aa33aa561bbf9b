"""Time building a full corrupted test set: every corruption at every severity.

What is measured: wall and process CPU time of ``build_corrupted_set`` on N uint8 images (default
10,000 of shape 3x32x32, CIFAR-10's test split; ``--gray`` for 1x28x28), all 8 corruptions x 5
severities, on the CPU with the given torch threads; then the time per corruption (all five
severities). The images are smooth random fields (bilinearly enlarged 8x8 noise), so JPEG and
the blur see image-like content rather than white noise. The set's size in memory is printed too.

    PYTHONPATH=src python benchmarks/corruptions.py               # 10,000 x 3x32x32, 2 threads
    PYTHONPATH=src python benchmarks/corruptions.py --gray --n 10000
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from normres.corruptions import CORRUPTION_NAMES, SEVERITIES, build_corrupted_set


def smooth_images(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, channels, 8, 8), generator=g)  # (n, C, 8, 8)
    fine = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)  # (n, C, side, side)
    return fine.mul(255).round().to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of images (default: 10000)")
    parser.add_argument("--gray", action="store_true", help="1x28x28 images instead of 3x32x32")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    channels, side = (1, 28) if args.gray else (3, 32)
    x = smooth_images(args.n, channels, side)

    wall, cpu = time.perf_counter(), time.process_time()
    built = build_corrupted_set(x, CORRUPTION_NAMES, SEVERITIES, seed=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    size = sum(t.nbytes for t in built["images"].values())
    print(
        f"{args.n} x {channels}x{side}x{side}, {len(CORRUPTION_NAMES)} corruptions x {len(SEVERITIES)} "
        f"severities, {args.threads} threads: {wall:.1f} s wall, {cpu:.1f} s CPU, {size / 2**20:.0f} MiB"
    )
    for name in CORRUPTION_NAMES:
        t = time.perf_counter()
        build_corrupted_set(x, [name], SEVERITIES, seed=0)
        print(f"  {name:15s} {time.perf_counter() - t:6.2f} s")


if __name__ == "__main__":
    main()
