"""The seven layers of the CIFAR study: batch, instance, layer, group and batch-instance norm
written by hand (one fused implementation, :mod:`normres.norms.fused`), PyTorch's BatchNorm2d, and
none. Their names, options and citations are in :mod:`normres.registry`.

Every layer keeps the memory layout it is given (NCHW or channels_last, which the models use). None
of the hand-written ones calls torch's normalization kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normres.norms.fused import (
    BATCH,
    BATCH_FIXED,
    GROUP,
    INSTANCE,
    check_input,
    float32_statistics,
    fused_norm,
    group_averaging_matrix,
    moments,
    pool,
)
from normres.registry import resolve_groups

__all__ = ["BatchInstanceNorm", "BatchNorm", "GroupNorm", "Identity", "InstanceNorm", "LayerNorm", "TorchBatchNorm"]

DEFAULT_EPS = 1e-5
DEFAULT_MOMENTUM = 0.1


class _AffineNorm(nn.Module):
    """Shared parameters: per-channel weight (gamma, ones) and bias (beta, zeros)."""

    def __init__(self, num_channels: int, eps: float) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class _RunningStats(_AffineNorm):
    """Adds BatchNorm2d-style running statistics (unbiased running variance)."""

    def __init__(self, num_channels: int, eps: float, momentum: float | None) -> None:
        super().__init__(num_channels, eps)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _batch_stats(self, var: Tensor, mean: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel (1, C) batch statistics; updates the running averages."""
        bvar, bmean = pool(var, mean, BATCH)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if count < 2:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel when training, "
                f"got input shape {tuple(x.shape)}"
            )
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            unbiased = bvar[0] * (count / (count - 1))
            self.running_mean.lerp_(bmean[0].to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return bvar, bmean

    def reset_running_stats(self) -> None:
        """Back to the initial statistics (as ``nn.BatchNorm2d``; PreciseBN starts from here)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def _running_stats(self) -> tuple[Tensor, Tensor]:
        dtype = torch.float64 if self.running_var.dtype == torch.float64 else torch.float32
        return self.running_var.to(dtype)[None], self.running_mean.to(dtype)[None]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}"


class BatchNorm(_RunningStats):
    """Batch normalization (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network
    Training by Reducing Internal Covariate Shift").

    Statistics per channel over (N, H, W); running mean and unbiased running variance for eval
    mode, updated with ``momentum`` (None: cumulative average), as ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = DEFAULT_EPS,
        momentum: float | None = DEFAULT_MOMENTUM,
    ) -> None:
        super().__init__(num_channels, eps, momentum)

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        if self.training:
            stats = self._batch_stats(*moments(x), x)
            return fused_norm(x, self.weight, self.bias, [stats], (BATCH,), self.eps)
        # Eval: a fixed per-channel affine; plain autograd ops handle its (trivial) gradient.
        var, mean = self._running_stats()
        scale = self.weight * torch.rsqrt(var[0] + self.eps)  # (C,)
        shift = self.bias - mean[0] * scale
        y = torch.mul(x, scale[:, None, None]).add_(shift[:, None, None])  # float32 for half x
        return y.to(x.dtype)


class InstanceNorm(_AffineNorm):
    """Instance normalization (Ulyanov et al. 2016, "Instance Normalization: The Missing
    Ingredient for Fast Stylization").

    Statistics per (sample, channel) over (H, W), in training and eval alike (no running
    statistics), with a per-channel affine: ``nn.InstanceNorm2d(C, affine=True)``.
    """

    def __init__(self, num_channels: int, *, eps: float = DEFAULT_EPS) -> None:
        super().__init__(num_channels, eps)

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        stats = moments(x)
        return fused_norm(x, self.weight, self.bias, [stats], (INSTANCE,), self.eps)


class GroupNorm(_AffineNorm):
    """Group normalization (Wu & He 2018, "Group Normalization").

    Statistics per sample over each group of ``num_channels / groups`` channels and (H, W), with a
    per-channel affine: ``nn.GroupNorm(groups, C)``. Give ``groups`` (default 32) or
    ``channels_per_group``, not both.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        groups: int | None = None,
        channels_per_group: int | None = None,
        eps: float = DEFAULT_EPS,
    ) -> None:
        resolved = resolve_groups(num_channels, groups, channels_per_group)
        super().__init__(num_channels, eps)
        self.groups = resolved
        # built once: rebuilding it in every pooling cost gn ~3% of a ResNet-14 step
        self.register_buffer("averaging", group_averaging_matrix(num_channels, resolved), persistent=False)

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        stats = pool(*moments(x), GROUP, self.averaging)
        return fused_norm(x, self.weight, self.bias, [stats], (GROUP,), self.eps, averaging=self.averaging)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"


class LayerNorm(GroupNorm):
    """Layer normalization (Ba et al. 2016, "Layer Normalization") for conv features.

    Statistics per sample over (C, H, W), with a per-channel affine: ``nn.GroupNorm(1, C)``.
    """

    def __init__(self, num_channels: int, *, eps: float = DEFAULT_EPS) -> None:
        super().__init__(num_channels, groups=1, eps=eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class BatchInstanceNorm(_RunningStats):
    """Batch-instance normalization (Nam & Kim 2018, "Batch-Instance Normalization for
    Adaptively Style-Invariant Neural Networks").

    ``y = weight * (rho * x_bn + (1 - rho) * x_in) + bias`` with a per-channel gate ``rho``
    initialised to 1 (pure batch norm, as in the paper) and kept in [0, 1] by
    :func:`clamp_gates_` after each optimizer step. The batch branch keeps running statistics
    like :class:`BatchNorm` and uses them in eval mode; the instance branch always uses the
    sample's own statistics. Both branches come from the same per-(n, c) moments and are
    applied in one pass.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = DEFAULT_EPS,
        momentum: float | None = DEFAULT_MOMENTUM,
    ) -> None:
        super().__init__(num_channels, eps, momentum)
        self.rho = nn.Parameter(torch.ones(num_channels))

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        var, mean = moments(x)
        if self.training:
            batch, kind = self._batch_stats(var, mean, x), BATCH
        else:
            batch, kind = self._running_stats(), BATCH_FIXED
        return fused_norm(
            x, self.weight, self.bias, [batch, (var, mean)], (kind, INSTANCE), self.eps, rho=self.rho
        )


class TorchBatchNorm(nn.BatchNorm2d):
    """PyTorch's ``nn.BatchNorm2d`` (the reference and speed baseline), its statistics kept in float32
    under autocast like every other layer's."""

    def __init__(self, num_channels: int, *, eps: float = DEFAULT_EPS, momentum: float | None = DEFAULT_MOMENTUM) -> None:
        super().__init__(num_channels, eps=eps, momentum=momentum)

    forward = float32_statistics(nn.BatchNorm2d.forward)


class Identity(nn.Identity):
    """No normalization; ``num_channels`` and ``eps`` are accepted so that configs stay uniform."""

    def __init__(self, num_channels: int, *, eps: float = DEFAULT_EPS) -> None:
        del num_channels, eps
        super().__init__()
