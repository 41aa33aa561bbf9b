"""An example of your own normalization layer for normres: RMS normalization for conv features.

Name it in a config and it runs beside the built-in layers, through every stage of the pipeline:

    norms:
      rms: {class: "examples/norms.py:RMSNorm2d", options: {eps: 1.0e-6}}
    studies:
      mine: {grid: [{norm: [torch_bn, gn, rms], depth: [2], batch_size: [128]}], ...}

The contract is timm's: ``Class(num_channels, **options)`` returns an ``nn.Module`` whose forward
keeps the input's shape and memory format (NCHW or channels_last). normres imports the file and
probes the layer on a small batch before any job starts, hashes the file into every run's settings
(edit it and exactly the runs using it rerun), and computes it in float32 under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm2d(nn.Module):
    """Root-mean-square normalization over the channels of each pixel, with a per-channel gain
    (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", NeurIPS, applied per position
    of a conv feature map): ``y = x / sqrt(mean_c(x^2) + eps) * weight``. No mean subtraction, no
    batch statistics."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        rms = torch.rsqrt(x.square().mean(1, keepdim=True) + self.eps)  # (N, 1, H, W)
        return x * rms * self.weight[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"
