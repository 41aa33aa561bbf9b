"""Normalization layers, looked up by name.

Every constructor in :data:`NORMS` takes ``num_channels`` first and keyword options after it, so
model code can take a norm name (or a ``norm_layer`` callable) instead of switching on names.

The hand-written norms (``bn``, ``in``, ``ln``, ``gn``, ``bin``) share one fused implementation,
:class:`_FusedNormFunction`. They differ only in which (sample, channel) slabs are pooled into one
set of statistics:

* forward: per-(n, c) moments over (H, W) (on CPUs a sum and a sum of squares, one cheap pass each,
  because ``torch.var_mean`` is ~25x slower there; ``torch.var_mean`` on GPUs), pooled into the
  grouping's statistics with the law of total variance; normalization and affine are folded into
  one per-(n, c) scale and shift, applied as ``x * a + b``. Batch-instance norm takes both of its
  statistics from the same moments and still applies a single scale and shift;
* backward: the per-(n, c) sums ``t1 = sum_hw dy`` and ``t2 = sum_hw dy * x``, from which every
  gradient follows analytically (derivation in ``_FusedNormFunction.backward``);
  ``dx = dy * A + x * B + C`` with per-(n, c) coefficients, written into one buffer.

Composite versions (``x.mean()``/``x.var()`` and autograd) were measured earlier in the project
at 1.6-1.8x ``nn.BatchNorm2d`` per ResNet train step, batch-instance norm built from two of them at
2.8x; these measure 1.0-1.1x on a 2-core CPU (``benchmarks/norm_step.py``).

Under ``torch.compile`` the same arithmetic takes a composite form instead: per-(n, c) moments from
one ``var_mean`` and ``y = x * a + b`` from plain differentiable ops, so that the compiler sees the
whole graph (no data-dependent branch, no opaque autograd function), generates the backward itself
and fuses both with the neighbouring pointwise ops (ReLU, residual additions). Compiled ResNet-14
steps then run at 0.7x the eager NCHW ``nn.BatchNorm2d`` step for every norm (``make bench``).
Both forms are tested against torch's layers.

Every layer keeps the memory layout it is given (NCHW or channels_last, which the models use).

None of them calls torch's normalization kernels. Statistics are computed in float32 (float64 for
float64 inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normres.specs import (
    NORM_OPTIONS,
    check_eps,
    check_momentum,
    check_name,
    check_norm,
    check_options,
    resolve_groups,
)

__all__ = [
    "NORMS",
    "NORM_OPTIONS",
    "BatchInstanceNorm",
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "check_norm",
    "clamp_gates_",
    "describe",
    "gate_parameters",
    "make_norm",
    "resolve_groups",
]

DEFAULT_EPS = 1e-5
DEFAULT_MOMENTUM = 0.1

# Pooling kinds understood by the fused function. A "group" pooling carries its group count.
_BATCH = "batch"  # per channel, over (N, H, W)
_BATCH_FIXED = "batch_fixed"  # per channel, running statistics (constants w.r.t. x)
_INSTANCE = "instance"  # per (n, c), over (H, W)
_GROUP = "group"  # per (n, group), over (C / G, H, W); LN is one group


# --------------------------------------------------------------------------------------------
# statistics


def _stats_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Slabs whose mean dominates their spread (E[x^2] > this * var) lose too many digits in the
# one-pass E[x^2] - E[x]^2 formula; their moments are recomputed in two passes.
_CANCELLATION_RATIO = 1e3


def _slab_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) biased variance and mean over (H, W), in the statistics dtype; each (N, C)."""
    dtype = _stats_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    if x.is_cuda:  # one Welford kernel, exact and fast on GPUs
        return torch.var_mean(x, dim=(2, 3), correction=0)
    # On CPUs torch.var_mean (Welford) is ~25x slower than a sum; sum and sum of squares take
    # one cheap pass each.
    hw = x.shape[2] * x.shape[3]
    mean = x.sum((2, 3)).div_(hw)  # (N, C)
    mean_sq = _sum_squares_hw(x).div_(hw)
    var = torch.addcmul(mean_sq, mean, mean, value=-1.0).clamp_(min=0.0)
    if bool(torch.gt(mean_sq, var * _CANCELLATION_RATIO).any()):  # rare: exact, two passes
        var = _sum_squares_hw(x - mean[..., None, None]).div_(hw)
    return var, mean


def _sum_squares_hw(x: Tensor) -> Tensor:
    """Per-(n, c) sum of x^2 over (H, W), (N, C), in either memory layout."""
    n, c, h, w = x.shape
    if x.is_contiguous():  # vector_norm does not materialise x * x
        return torch.linalg.vector_norm(x.view(n, c, h * w), dim=2).square_()
    # channels_last: vector_norm over the non-innermost (H, W) runs ~10x slower than x * x + sum
    return torch.mul(x, x).sum((2, 3))


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for NHWC-strided x (and plain NCHW otherwise), so that x's layout is kept."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _compiling() -> bool:
    """True while torch.compile traces: the norms then take their composite form (see module doc)."""
    return torch.compiler.is_compiling()


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) (var, mean) of ``x``, each (N, C).

    Eager: constants to autograd (the fused function differentiates them analytically). While
    compiling: one ``var_mean`` that autograd differentiates, so the compiler sees plain ops it
    can fuse, with no data-dependent branch to split its graph.
    """
    if _compiling():
        return torch.var_mean(x.to(_stats_dtype(x)), dim=(2, 3), correction=0)
    with torch.no_grad():
        return _slab_moments(x)


def _pool(var: Tensor, mean: Tensor, kind: str, averaging: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pool per-(n, c) moments into the statistics of a grouping (law of total variance).

    Returns (var, mean) shaped to broadcast against (N, C): (1, C) for batch pooling, (N, C)
    otherwise. All slabs have the same H*W, so pooled moments are plain averages.
    """
    if kind == _INSTANCE:
        return var, mean
    if kind == _BATCH:
        pooled_mean = mean.mean(0, keepdim=True)  # (1, C)
        pooled_var = var.mean(0, keepdim=True) + (mean - pooled_mean).square().mean(0, keepdim=True)
        return pooled_var, pooled_mean
    if kind == _GROUP:
        pooled_mean = _group_average(mean, averaging)  # (N, C)
        pooled_var = _group_average(var, averaging) + _group_average((mean - pooled_mean).square(), averaging)
        return pooled_var, pooled_mean
    raise AssertionError(f"unknown pooling {kind!r}")


def group_averaging_matrix(num_channels: int, groups: int) -> Tensor:
    """(C, C) block-diagonal matrix: ``t @ it`` averages (N, C) values over each group's channels.

    A matmul instead of view/mean/expand: the same arithmetic, but torch.compile fuses the
    reshaping version into the large reductions over x, which made compiled ResNet-14 with
    8-group gn 1.6x slower than with this one (2-core CPU).
    """
    size = num_channels // groups
    group = torch.arange(num_channels) // size  # (C,) group of each channel
    return (group[:, None] == group[None, :]).float() / size


def _group_average(t: Tensor, averaging: Tensor) -> Tensor:
    """(N, C) values averaged over the channels of each group, broadcast back to (N, C)."""
    return t @ averaging.to(t.dtype)


def _group_mean(t: Tensor, kind: str, averaging: Tensor | None, shape: torch.Size) -> Tensor:
    """Sum per-(n, c) values over the slabs of each group, divided by the group's element count."""
    n, _, h, w = shape
    if kind == _INSTANCE:
        return t / (h * w)
    if kind == _BATCH:
        return t.sum(0, keepdim=True) / (n * h * w)
    return _group_average(t, averaging) / (h * w)  # slabs are averaged: divide by H*W only


# --------------------------------------------------------------------------------------------
# the fused function


class _FusedNormFunction(torch.autograd.Function):
    """y = x * a + b with a, b per (n, c), from one or two normalization branches.

    Branch k normalizes with statistics ``mean_k, rstd_k`` (shaped to broadcast against (N, C))
    pooled according to ``kinds[k]``; the branches are mixed with per-channel weights
    (``rho, 1 - rho`` for batch-instance norm, 1 for a single branch) and the per-channel affine:

        y = weight * sum_k w_k * (x - mean_k) * rstd_k + bias

    The statistics are passed in already computed (the caller also needs them for running
    averages) and must not require grad; their dependence on x is handled analytically in
    backward. ``rho`` is None for single-branch norms.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rho, means, rstds, kinds, averaging):  # type: ignore[override]
        scale, shift = _fold_affine(weight, bias, rho, means, rstds)
        c = x.shape[1]
        # One mul and one in-place add: on CPUs addcmul with a broadcast first operand is not
        # vectorised and costs 2x. Half/bfloat16 inputs are scaled in float32 (promotion), since
        # x * a + b cancels badly in low precision when the mean is large.
        y = torch.mul(x, scale.view(-1, c, 1, 1)).add_(shift.view(-1, c, 1, 1))  # (N, C, H, W)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        ctx.kinds, ctx.averaging = kinds, averaging
        ctx.has_rho = rho is not None
        ctx.save_for_backward(x, weight, rho if rho is not None else weight, *means, *rstds)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        # For one branch normalizing over a set S of K elements, with xh = (x - mu) * r and
        # g = dy * gamma' (gamma' = gamma * w_k):
        #     dx = r * (g - mean_S(g) - xh * mean_S(g * xh))
        # Over one (n, c) slab mu and r are constant, so with t1 = sum_hw dy, t2 = sum_hw dy * x:
        #     sum_hw g = gamma' * t1,   sum_hw g * xh = gamma' * p,   p = r * (t2 - mu * t1)
        # and dx = dy * A + x * B + C with per-(n, c)
        #     A = r * gamma',  B = -r^2 * H,  C = r * (mu * r * H - G),
        #     G = mean_S(gamma' * t1),  H = mean_S(gamma' * p).
        # Fixed (running) statistics do not depend on x: only the A term remains.
        # Parameter gradients: d_bias = sum_n t1, d_weight = sum_n sum_k w_k * p_k,
        # d_rho = sum_n gamma * (p_batch - p_instance).
        x, weight, rho, *stats = ctx.saved_tensors
        kinds, averaging = ctx.kinds, ctx.averaging
        means, rstds = stats[: len(kinds)], stats[len(kinds) :]
        if not ctx.has_rho:
            rho = None
        dtype = means[0].dtype
        n, c, h, w = x.shape
        in_dtype = x.dtype
        dy = dy.contiguous(memory_format=_memory_format(x))  # buffers below follow x's layout
        if in_dtype != dtype:  # half / bfloat16: reduce and combine in float32
            x, dy = x.to(dtype), dy.to(dtype)
        t1 = dy.sum(dim=(2, 3))  # (N, C)
        # dy * x goes into the buffer that later holds dx: one allocation for backward.
        # (bmm/vecdot over an (N*C, H*W) view are no faster on CPUs, and bmm is 3x slower
        # for H*W >= 512.)
        buf = torch.mul(dy, x)
        t2 = buf.sum(dim=(2, 3))

        coef_a = coef_b = coef_c = None
        ps = []
        for gamma_k, kind, mean, rstd in zip(
            _branch_gammas(weight, rho, len(kinds), dtype), kinds, means, rstds
        ):
            p = torch.addcmul(t2, mean, t1, value=-1.0).mul_(rstd)  # (N, C): sum_hw dy * xh
            ps.append(p)
            a_k = gamma_k * rstd
            coef_a = a_k if coef_a is None else coef_a + a_k
            if kind == _BATCH_FIXED:
                continue
            mean_g = _group_mean(gamma_k * t1, kind, averaging, x.shape)
            r_mean_gxh = _group_mean(gamma_k * p, kind, averaging, x.shape) * rstd  # r * H
            b_k = -rstd * r_mean_gxh
            c_k = torch.addcmul(-mean_g, mean, r_mean_gxh).mul_(rstd)
            coef_b = b_k if coef_b is None else coef_b + b_k
            coef_c = c_k if coef_c is None else coef_c + c_k

        dx = d_weight = d_bias = d_rho = None
        if ctx.needs_input_grad[0]:
            a = coef_a.view(-1, c, 1, 1)
            if coef_b is None:  # only fixed statistics: dx = dy * A
                dx = torch.mul(dy, a, out=buf)
            else:  # dx = x * B + C + dy * A, three passes over buf, no further allocation
                dx = torch.mul(x, coef_b.view(-1, c, 1, 1), out=buf)
                dx.add_(coef_c.view(-1, c, 1, 1)).addcmul_(dy, a)
            if in_dtype != dtype:
                dx = dx.to(in_dtype)
        if ctx.needs_input_grad[1]:
            mixed = ps[0] if rho is None else torch.lerp(ps[1], ps[0], rho.to(dtype))  # sum_k w_k p_k
            d_weight = mixed.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            d_bias = t1.sum(0).to(weight.dtype)
        if rho is not None and ctx.needs_input_grad[3]:
            d_rho = ((ps[0] - ps[1]).sum(0) * weight.to(dtype)).to(rho.dtype)
        return dx, d_weight, d_bias, d_rho, None, None, None, None


def _fold_affine(
    weight: Tensor, bias: Tensor, rho: Tensor | None, means: tuple[Tensor, ...], rstds: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """Per-(n, c) scale and shift, each (N|1, C), with y = x * scale + shift:
    scale = sum_k gamma_k * rstd_k and shift = bias - sum_k gamma_k * rstd_k * mean_k."""
    dtype = means[0].dtype
    scale = shift = None
    for gamma_k, mean, rstd in zip(_branch_gammas(weight, rho, len(means), dtype), means, rstds):
        a_k = gamma_k * rstd
        scale = a_k if scale is None else scale + a_k
        shift = -a_k * mean if shift is None else shift - a_k * mean
    return scale, shift + bias.to(dtype)


def _branch_gammas(weight: Tensor, rho: Tensor | None, branches: int, dtype: torch.dtype) -> list[Tensor]:
    """Per-channel (C,) weight of each branch: gamma, or gamma * rho and gamma * (1 - rho)."""
    gamma = weight if weight.dtype == dtype else weight.to(dtype)
    if rho is None:
        return [gamma] * branches
    gamma_rho = gamma * rho.to(dtype)
    return [gamma_rho, gamma - gamma_rho]


def _fused_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    stats: list[tuple[Tensor, Tensor]],
    kinds: tuple[str, ...],
    eps: float,
    *,
    rho: Tensor | None = None,
    averaging: Tensor | None = None,
) -> Tensor:
    """Normalize ``x`` given (var, mean) per branch, each (N|1, C): y = x * a + b per (n, c).

    Eager: :class:`_FusedNormFunction` with its analytic backward. While compiling, the same
    scale and shift from plain differentiable ops: the compiler generates and fuses the backward
    itself, which beats an opaque custom function it cannot fuse across.
    """
    if _compiling():
        return _composite_norm(x, weight, bias, stats, eps, rho)
    with torch.no_grad():
        means = tuple(mean for _, mean in stats)
        rstds = tuple(torch.rsqrt(var + eps) for var, _ in stats)
    return _FusedNormFunction.apply(x, weight, bias, rho, means, rstds, kinds, averaging)


def _composite_norm(
    x: Tensor, weight: Tensor, bias: Tensor, stats: list[tuple[Tensor, Tensor]], eps: float, rho: Tensor | None
) -> Tensor:
    """The forward of :class:`_FusedNormFunction` from differentiable ops (statistics included)."""
    means = tuple(mean for _, mean in stats)
    rstds = tuple(torch.rsqrt(var + eps) for var, _ in stats)
    scale, shift = _fold_affine(weight, bias, rho, means, rstds)
    c = x.shape[1]
    return (x * scale.view(-1, c, 1, 1) + shift.view(-1, c, 1, 1)).to(x.dtype)  # (N, C, H, W)


# --------------------------------------------------------------------------------------------
# modules


def _check_input(x: Tensor, num_channels: int, name: str) -> Tensor:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != num_channels:
        raise ValueError(f"{name}: expected {num_channels} channels, got {x.shape[1]}")
    return x.contiguous(memory_format=_memory_format(x))  # NCHW or channels_last, as given


class _AffineNorm(nn.Module):
    """Shared parameters: per-channel weight (gamma, ones) and bias (beta, zeros)."""

    def __init__(self, num_channels: int, eps: float) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        check_eps(eps)
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
        check_momentum(momentum)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _batch_stats(self, var: Tensor, mean: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel (1, C) batch statistics; updates the running averages."""
        bvar, bmean = _pool(var, mean, _BATCH)
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

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.num_channels, "bn")
        if self.training:
            stats = self._batch_stats(*_moments(x), x)
            return _fused_norm(x, self.weight, self.bias, [stats], (_BATCH,), self.eps)
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

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.num_channels, "in")
        stats = _moments(x)
        return _fused_norm(x, self.weight, self.bias, [stats], (_INSTANCE,), self.eps)


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

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.num_channels, "gn")
        stats = _pool(*_moments(x), _GROUP, self.averaging)
        return _fused_norm(x, self.weight, self.bias, [stats], (_GROUP,), self.eps, averaging=self.averaging)

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

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.num_channels, "bin")
        var, mean = _moments(x)
        if self.training:
            batch, kind = self._batch_stats(var, mean, x), _BATCH
        else:
            batch, kind = self._running_stats(), _BATCH_FIXED
        return _fused_norm(
            x, self.weight, self.bias, [batch, (var, mean)], (kind, _INSTANCE), self.eps, rho=self.rho
        )


# --------------------------------------------------------------------------------------------
# registry


def _torch_batch_norm(
    num_channels: int, *, eps: float = DEFAULT_EPS, momentum: float | None = DEFAULT_MOMENTUM
) -> nn.Module:
    """PyTorch's ``nn.BatchNorm2d`` (the reference and speed baseline)."""
    return nn.BatchNorm2d(num_channels, eps=eps, momentum=momentum)


def _identity(num_channels: int, *, eps: float = DEFAULT_EPS) -> nn.Module:
    """No normalization; ``num_channels`` and ``eps`` are accepted so configs stay uniform."""
    del num_channels, eps
    return nn.Identity()


NORMS: dict[str, Callable[..., nn.Module]] = {
    "torch_bn": _torch_batch_norm,
    "bn": BatchNorm,
    "in": InstanceNorm,
    "ln": LayerNorm,
    "gn": GroupNorm,
    "bin": BatchInstanceNorm,
    "nn": _identity,
}

_DESCRIPTIONS: dict[str, str] = {
    "torch_bn": "PyTorch's BatchNorm2d: statistics per channel over the batch and spatial axes "
    "(N, H, W), running averages in eval mode.",
    "bn": "Batch norm: statistics per channel over the batch and spatial axes (N, H, W), "
    "running averages in eval mode.",
    "in": "Instance norm: statistics per sample and channel over the spatial axes (H, W), "
    "in training and eval alike.",
    "ln": "Layer norm: statistics per sample over all channels and spatial axes (C, H, W).",
    "gn": "Group norm: statistics per sample over each group of channels and the spatial axes "
    "(C/G, H, W).",
    "bin": "Batch-instance norm: a learned per-channel mix rho of batch statistics over (N, H, W) "
    "and instance statistics over (H, W).",
    "nn": "No normalization: the identity, no statistics.",
}


def make_norm(name: str, num_channels: int, **options: Any) -> nn.Module:
    """Build norm ``name`` for ``num_channels`` channels; ValueError for unknown names/options."""
    check_name(name)
    check_options(name, options)
    return NORMS[name](num_channels, **options)


def describe(name: str) -> str:
    """One sentence saying which axes the statistics of norm ``name`` span."""
    check_name(name)
    return _DESCRIPTIONS[name]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``rho`` gates of every :class:`BatchInstanceNorm` in ``model`` (own lr, no decay)."""
    return [m.rho for m in model.modules() if isinstance(m, BatchInstanceNorm)]


@torch.no_grad()
def clamp_gates_(model: nn.Module) -> None:
    """Clamp every batch-instance gate ``rho`` into [0, 1] in place (call after each step)."""
    for rho in gate_parameters(model):
        rho.clamp_(0.0, 1.0)
