"""The fused implementation shared by the hand-written norms (``bn``, ``in``, ``ln``, ``gn``, ``bin``,
and from :mod:`normres.norms.literature` ``brn``, ``gbn`` and ``frn``).

They differ only in which (sample, channel) slabs are pooled into one set of statistics (ghost batch
norm pools the slabs of each group of samples; filter response norm takes each slab's mean square,
uncentred), and in an optional per-channel threshold after the affine (FRN's TLU):

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

Statistics are computed in float32 (float64 for float64 inputs), also under autocast:
:func:`float32_statistics` switches autocast off inside a layer's forward, since autocast would
otherwise run the group pooling (a matmul) in bfloat16 and the statistics would follow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Pooling kinds understood by the fused function. A "group" pooling carries its group count.
BATCH = "batch"  # per channel, over (N, H, W)
BATCH_FIXED = "batch_fixed"  # per channel, running statistics (constants w.r.t. x)
INSTANCE = "instance"  # per (n, c), over (H, W)
GROUP = "group"  # per (n, group), over (C / G, H, W); LN is one group
GHOST = "ghost"  # per (ghost batch, c), over (samples of the ghost batch, H, W)
INSTANCE_RMS = "instance_rms"  # per (n, c), the mean square over (H, W) (no centring: FRN)

_UNCENTRED = (INSTANCE_RMS,)  # kinds whose mean is 0 by definition (no mean term in backward)


# --------------------------------------------------------------------------------------------
# statistics


def stats_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Slabs whose mean dominates their spread (E[x^2] > this * var) lose too many digits in the
# one-pass E[x^2] - E[x]^2 formula; their moments are recomputed in two passes.
_CANCELLATION_RATIO = 1e3
# Below this many elements (a batch of 2-4 CIFAR feature maps) the two-pass moments are computed
# directly: per-op overhead, not memory traffic, sets the time there (a batch-2 ResNet-14 step).
_TWO_PASS_BELOW = 1 << 16


def _slab_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) biased variance and mean over (H, W), in the statistics dtype; each (N, C)."""
    dtype = stats_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    if x.is_cuda:  # one Welford kernel, exact and fast on GPUs
        return torch.var_mean(x, dim=(2, 3), correction=0)
    # On CPUs torch.var_mean (Welford) is ~25x slower than a sum; sum and sum of squares take
    # one cheap pass each.
    hw = x.shape[2] * x.shape[3]
    mean = x.sum((2, 3)).div_(hw)  # (N, C)
    if x.numel() <= _TWO_PASS_BELOW:  # small batches: the exact two passes take fewer ops than the check
        return _sum_squares_hw(x - mean[..., None, None]).div_(hw), mean
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


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for NHWC-strided x (and plain NCHW otherwise), so that x's layout is kept."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def compiling() -> bool:
    """True while torch.compile traces: the norms then take their composite form (see module doc)."""
    return torch.compiler.is_compiling()


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) (var, mean) of ``x``, each (N, C).

    Eager: constants to autograd (the fused function differentiates them analytically). While
    compiling: one ``var_mean`` that autograd differentiates, so the compiler sees plain ops it
    can fuse, with no data-dependent branch to split its graph.
    """
    if compiling():
        return torch.var_mean(x.to(stats_dtype(x)), dim=(2, 3), correction=0)
    with torch.no_grad():
        return _slab_moments(x)


def mean_squares(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean of x^2 over (H, W) and a zero mean, each (N, C): the uncentred statistics of
    :data:`INSTANCE_RMS`, in the (var, mean) form of :func:`moments`.

    One pass over x (no mean is needed). Eager: constants to autograd; while compiling, plain ops.
    """
    dtype = stats_dtype(x)
    hw = x.shape[2] * x.shape[3]
    if compiling():
        nu2 = x.to(dtype).square().mean((2, 3))
    else:
        with torch.no_grad():
            nu2 = _sum_squares_hw(x if x.dtype == dtype else x.to(dtype)).div_(hw)
    return nu2, torch.zeros_like(nu2)


def pool(var: Tensor, mean: Tensor, kind: str, averaging: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pool per-(n, c) moments into the statistics of a grouping (law of total variance).

    Returns (var, mean) shaped to broadcast against (N, C): (1, C) for batch pooling, (N, C)
    otherwise. All slabs have the same H*W, so pooled moments are plain averages. For
    :data:`GHOST`, ``averaging`` is the (N, N) matrix of :func:`ghost_averaging_matrix`; for
    :data:`GROUP`, the (C, C) one of :func:`group_averaging_matrix`. :data:`INSTANCE_RMS` takes
    the output of :func:`mean_squares` as it is.
    """
    if kind in (INSTANCE, INSTANCE_RMS):
        return var, mean
    # pooled var = avg(var) + avg((mean - pooled mean)^2) = avg(var + (mean - pooled mean)^2): the
    # stable form, with one average fewer (a tenth of a batch-2 step's norm time)
    if kind == BATCH:
        pooled_mean = mean.mean(0, keepdim=True)  # (1, C)
        return torch.addcmul(var, mean - pooled_mean, mean - pooled_mean).mean(0, keepdim=True), pooled_mean
    if kind == GROUP:
        pooled_mean = _group_average(mean, averaging)  # (N, C)
        d = mean - pooled_mean
        return _group_average(torch.addcmul(var, d, d), averaging), pooled_mean
    if kind == GHOST:
        pooled_mean = _ghost_average(mean, averaging)  # (N, C)
        d = mean - pooled_mean
        return _ghost_average(torch.addcmul(var, d, d), averaging), pooled_mean
    raise AssertionError(f"unknown pooling {kind!r}")


def ghost_sizes(batch: int, virtual_batch_size: int) -> list[int]:
    """Sizes of the ghost batches of a batch: ``virtual_batch_size`` samples each, in order, and the
    remainder (smaller) last."""
    full, rest = divmod(batch, virtual_batch_size)
    return [virtual_batch_size] * full + ([rest] if rest else [])


def ghost_averaging_matrix(batch: int, virtual_batch_size: int, device=None) -> Tensor:
    """(N, N) block-diagonal matrix: ``m @ t`` averages (N, C) values over each ghost batch's
    samples (consecutive blocks of ``virtual_batch_size``; the last block may be smaller).

    A matmul rather than a reshape, so that a smaller last ghost batch needs no special case.
    """
    ghost = torch.arange(batch, device=device) // virtual_batch_size  # (N,) ghost batch of each sample
    same = ghost[:, None] == ghost[None, :]
    return same.float() / same.sum(1, keepdim=True).float()


def _ghost_average(t: Tensor, averaging: Tensor) -> Tensor:
    """(N, C) values averaged over the samples of each ghost batch, broadcast back to (N, C)."""
    return averaging.to(t.dtype) @ t


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
    if kind in (INSTANCE, INSTANCE_RMS):
        return t / (h * w)
    if kind == BATCH:
        return t.sum(0, keepdim=True) / (n * h * w)
    if kind == GHOST:
        return _ghost_average(t, averaging) / (h * w)
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

    ``tau`` (per channel, or None) adds a thresholded linear unit, z = max(y, tau) (Singh &
    Krishnan 2020's TLU), in the same pass; backward then recovers where y passed from the
    output itself (z > tau), so no mask is stored and no extra tensor is kept alive (the next
    layer keeps z anyway).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rho, means, rstds, kinds, averaging, tau=None):  # type: ignore[override]
        scale, shift = _fold_affine(weight, bias, rho, means, rstds)
        c = x.shape[1]
        # Half/bfloat16 inputs are scaled in float32 (promotion), since x * a + b cancels badly in
        # low precision when the mean is large.
        y = scale_shift(x, scale.view(-1, c, 1, 1), shift.view(-1, c, 1, 1))  # (N, C, H, W)
        if tau is not None:
            y = torch.maximum(y, tau.to(y.dtype).view(1, c, 1, 1), out=y)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        ctx.kinds, ctx.averaging = kinds, averaging
        ctx.has_rho, ctx.has_tau = rho is not None, tau is not None
        ctx.save_for_backward(
            x, weight, rho if rho is not None else weight, tau if tau is not None else weight,
            y if tau is not None else weight, *means, *rstds,
        )  # fmt: skip
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
        # Uncentred statistics (FRN: mu = 0 by definition, no mean subtracted) have no G term: C = 0.
        # A threshold z = max(y, tau) first masks dy to where y passed (z > tau); the rest of dy
        # is tau's gradient.
        x, weight, rho, tau, z, *stats = ctx.saved_tensors
        kinds, averaging = ctx.kinds, ctx.averaging
        means, rstds = stats[: len(kinds)], stats[len(kinds) :]
        if not ctx.has_rho:
            rho = None
        dtype = means[0].dtype
        n, c, h, w = x.shape
        in_dtype = x.dtype
        dy = dy.contiguous(memory_format=memory_format_of(x))  # buffers below follow x's layout
        if in_dtype != dtype:  # half / bfloat16: reduce and combine in float32
            x, dy = x.to(dtype), dy.to(dtype)
        d_tau = None
        if ctx.has_tau:
            t_all = dy.sum(dim=(2, 3))  # (N, C); the part of it not passed is tau's gradient
            # z == tau (as rounded to z's dtype) where the threshold held; one buffer for both passes
            passed = torch.sub(z.to(dtype), tau.to(in_dtype).to(dtype).view(1, c, 1, 1))
            dy = torch.ops.aten.threshold_backward.grad_input(dy, passed, 0.0, grad_input=passed)
        t1 = dy.sum(dim=(2, 3))  # (N, C); with a threshold: of dy where y > tau
        if ctx.has_tau and ctx.needs_input_grad[8]:
            d_tau = (t_all - t1).sum(0).to(tau.dtype)
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
            if kind == BATCH_FIXED:
                continue
            r_mean_gxh = _group_mean(gamma_k * p, kind, averaging, x.shape) * rstd  # r * H
            b_k = -rstd * r_mean_gxh
            coef_b = b_k if coef_b is None else coef_b + b_k
            if kind in _UNCENTRED:
                continue
            mean_g = _group_mean(gamma_k * t1, kind, averaging, x.shape)
            c_k = torch.addcmul(-mean_g, mean, r_mean_gxh).mul_(rstd)
            coef_c = c_k if coef_c is None else coef_c + c_k

        dx = d_weight = d_bias = d_rho = None
        if ctx.needs_input_grad[0]:
            a = coef_a.view(-1, c, 1, 1)
            if coef_b is None:  # only fixed statistics: dx = dy * A
                dx = torch.mul(dy, a, out=buf)
            else:  # dx = x * B + C + dy * A, into buf (no further allocation)
                if coef_c is not None and memory_format_of(x) == torch.channels_last:  # see scale_shift
                    dx = torch.addcmul(coef_c.view(-1, c, 1, 1), x, coef_b.view(-1, c, 1, 1), out=buf)
                else:
                    dx = torch.mul(x, coef_b.view(-1, c, 1, 1), out=buf)
                    if coef_c is not None:
                        dx.add_(coef_c.view(-1, c, 1, 1))
                dx.addcmul_(dy, a)
            if in_dtype != dtype:
                dx = dx.to(in_dtype)
        if ctx.needs_input_grad[1]:
            mixed = ps[0] if rho is None else torch.lerp(ps[1], ps[0], rho.to(dtype))  # sum_k w_k p_k
            d_weight = mixed.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            d_bias = t1.sum(0).to(weight.dtype)
        if rho is not None and ctx.needs_input_grad[3]:
            d_rho = ((ps[0] - ps[1]).sum(0) * weight.to(dtype)).to(rho.dtype)
        return dx, d_weight, d_bias, d_rho, None, None, None, None, d_tau


def _fold_affine(
    weight: Tensor, bias: Tensor, rho: Tensor | None, means: tuple[Tensor, ...], rstds: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """Per-(n, c) scale and shift, each (N|1, C), with y = x * scale + shift:
    scale = sum_k gamma_k * rstd_k and shift = bias - sum_k gamma_k * rstd_k * mean_k."""
    dtype = means[0].dtype
    scale = None
    shift = bias.to(dtype)
    for gamma_k, mean, rstd in zip(_branch_gammas(weight, rho, len(means), dtype), means, rstds):
        a_k = gamma_k * rstd
        scale = a_k if scale is None else scale + a_k
        shift = torch.addcmul(shift, a_k, mean, value=-1.0)  # (N|1, C)
    return scale, shift


def _branch_gammas(weight: Tensor, rho: Tensor | None, branches: int, dtype: torch.dtype) -> list[Tensor]:
    """Per-channel (C,) weight of each branch: gamma, or gamma * rho and gamma * (1 - rho)."""
    gamma = weight if weight.dtype == dtype else weight.to(dtype)
    if rho is None:
        return [gamma] * branches
    gamma_rho = gamma * rho.to(dtype)
    return [gamma_rho, gamma - gamma_rho]


def fused_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    stats: list[tuple[Tensor, Tensor]],
    kinds: tuple[str, ...],
    eps: float,
    *,
    rho: Tensor | None = None,
    averaging: Tensor | None = None,
    tau: Tensor | None = None,
) -> Tensor:
    """Normalize ``x`` given (var, mean) per branch, each (N|1, C): y = x * a + b per (n, c), then
    z = max(y, tau) where a per-channel ``tau`` is given (TLU).

    Eager: :class:`_FusedNormFunction` with its analytic backward. While compiling, the same
    scale and shift from plain differentiable ops: the compiler generates and fuses the backward
    itself, which beats an opaque custom function it cannot fuse across.
    """
    if compiling():
        return _composite_norm(x, weight, bias, stats, eps, rho, tau)
    with torch.no_grad():
        means = tuple(mean for _, mean in stats)
        rstds = tuple(torch.rsqrt(var + eps) for var, _ in stats)
    return _FusedNormFunction.apply(x, weight, bias, rho, means, rstds, kinds, averaging, tau)


def _composite_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    stats: list[tuple[Tensor, Tensor]],
    eps: float | Tensor,
    rho: Tensor | None,
    tau: Tensor | None = None,
) -> Tensor:
    """The forward of :class:`_FusedNormFunction` from differentiable ops (statistics included)."""
    means = tuple(mean for _, mean in stats)
    rstds = tuple(torch.rsqrt(var + eps) for var, _ in stats)
    scale, shift = _fold_affine(weight, bias, rho, means, rstds)
    c = x.shape[1]
    y = x * scale.view(-1, c, 1, 1) + shift.view(-1, c, 1, 1)  # (N, C, H, W)
    if tau is not None:
        y = torch.maximum(y, tau.to(y.dtype).view(1, c, 1, 1))
    return y.to(x.dtype)




def scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` with broadcast (N|1, C, 1, 1) operands, in x's layout.

    channels_last: one addcmul pass (0.7x the time of a mul and an add on a 2-core CPU). NCHW: a mul
    and an in-place add, since there addcmul with a broadcast first operand is not vectorised and
    takes 1.25x as long.
    """
    if memory_format_of(x) == torch.channels_last:
        return torch.addcmul(shift, x, scale)
    return torch.mul(x, scale).add_(shift)


def check_input(x: Tensor, num_channels: int, name: str) -> Tensor:
    """x as a 4-D (N, C, H, W) tensor of ``num_channels`` channels, in its own layout, dense."""
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != num_channels:
        raise ValueError(f"{name}: expected {num_channels} channels, got {x.shape[1]}")
    return x.contiguous(memory_format=memory_format_of(x))  # NCHW or channels_last, as given


def float32_statistics(forward: Callable[[nn.Module, Tensor], Tensor]) -> Callable[[nn.Module, Tensor], Tensor]:
    """Run a norm layer's ``forward`` with autocast off, so that its statistics stay float32.

    The layers handle low-precision inputs themselves (statistics in float32, output in the input's
    dtype); autocast would instead lower their internal matmuls and reductions to bfloat16.
    """

    @functools.wraps(forward)
    def wrapper(self: nn.Module, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return forward(self, x)
        return forward(self, x)

    return wrapper
