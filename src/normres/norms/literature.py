"""Five normalization layers of the literature after 2017: batch renormalization, ghost batch norm,
filter response norm with its TLU, and EvoNorm-B0 and -S0. Their names, options and citations are
in :mod:`normres.registry`.

Batch renorm, ghost batch norm and FRN are per-(n, c) affine maps of x given their statistics, so
they run on the fused function of :mod:`normres.norms.fused` (one pass for the per-(n, c) moments,
one scale-and-shift, an analytic backward from per-(n, c) sums): batch renorm is batch norm with
weight ``gamma * r`` and bias ``beta + gamma * d``; ghost batch norm pools the moments over groups
of samples; FRN takes the mean square without centring and applies its TLU in the same pass.
EvoNorm's output is no affine map of x: each EvoNorm is one autograd function written out here
(:class:`_EvoNormB0Function`, :class:`_EvoNormS0Function`), given the same per-(n, c) moments and
carrying their dependence on x in its backward.

As the classic layers, every layer keeps its input's memory layout, computes its statistics in
float32 (float64 for float64 input) also under autocast, and takes a composite form of plain ops
while torch.compile traces (:func:`normres.norms.fused.compiling`). Layers with running statistics
(``brn``, ``gbn``, ``evonorm_b0``) follow ``nn.BatchNorm2d``'s protocol: ``running_var``,
``momentum`` (None: cumulative average), ``num_batches_tracked`` and ``reset_running_stats()``, so
that PreciseBN and test-time adaptation (:mod:`normres.bnstats`) treat them as batch norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normres.norms import fused
from normres.norms.classic import DEFAULT_EPS, DEFAULT_MOMENTUM, _AffineNorm, _RunningStats
from normres.norms.fused import (
    BATCH,
    GHOST,
    GROUP,
    INSTANCE_RMS,
    check_input,
    float32_statistics,
    fused_norm,
    ghost_averaging_matrix,
    ghost_sizes,
    group_averaging_matrix,
    mean_squares,
    memory_format_of,
    moments,
    pool,
    scale_shift,
    stats_dtype,
)
from normres.registry import resolve_groups

__all__ = ["BatchRenorm", "EvoNormB0", "EvoNormS0", "FilterResponseNorm", "GhostBatchNorm", "evonorm_groups"]


# --------------------------------------------------------------------------------------------
# batch renormalization and ghost batch norm: batch norm with other batch statistics


class _BatchStatistics(_RunningStats):
    """Batch norm's parameters, running statistics and eval mode (running mean and variance)."""

    def _eval(self, x: Tensor) -> Tensor:
        """A fixed per-channel affine from the running statistics (plain autograd ops)."""
        var, mean = self._running_stats()
        scale = self.weight * torch.rsqrt(var[0] + self.eps)  # (C,)
        shift = self.bias - mean[0] * scale
        return torch.mul(x, scale[:, None, None]).add_(shift[:, None, None]).to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """One update of the running averages with per-channel (C,) statistics, as nn.BatchNorm2d."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


class BatchRenorm(_BatchStatistics):
    """Batch renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", NeurIPS).

    Training (Algorithm 1 of the paper), per channel over (N, H, W)::

        sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1 / r_max, r_max),  d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    with r and d constants to autograd (stop-gradient) and the running statistics those before this
    batch's update. Eval: ``gamma * (x - running_mean) / sigma + beta``, which r and d make training
    agree with. The running mean and unbiased variance are updated as batch norm's (``momentum``;
    None: cumulative average). The paper keeps a running sigma instead of a variance; keeping
    nn.BatchNorm2d's buffers lets PreciseBN recompute them like batch norm's.

    The clipping follows the schedule of the paper's experiments: r_max = 1, d_max = 0 (plain batch norm)
    for ``warmup_steps`` = 5000 training steps, then raised linearly to ``r_max`` = 3 over
    ``r_max_ramp_steps`` = 35000 steps (reached at step 40k) and to ``d_max`` = 5 over
    ``d_max_ramp_steps`` = 20000 steps (reached at step 25k). The step count is the buffer
    ``renorm_steps`` (training forward passes, saved with the model, so a resumed run continues the
    schedule exactly); ``reset_running_stats()`` leaves it alone. Until running statistics exist
    (``num_batches_tracked`` is 0: a new layer, or just after ``reset_running_stats()``, as in
    PreciseBN) r = 1 and d = 0: there is nothing to correct towards yet.

    Eager, the layer is batch norm's fused function with weight ``gamma * r`` and bias
    ``beta + gamma * d`` (differentiable in gamma and beta); the schedule and the clipping are tensor
    ops on the step buffer (no Python branch on data, no recompilation per step under torch.compile).
    """

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = DEFAULT_EPS,
        momentum: float | None = DEFAULT_MOMENTUM,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_ramp_steps: int = 35000,
        d_max_ramp_steps: int = 20000,
    ) -> None:
        super().__init__(num_channels, eps, momentum)
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps = warmup_steps
        self.r_max_ramp_steps, self.d_max_ramp_steps = r_max_ramp_steps, d_max_ramp_steps
        self.register_buffer("renorm_steps", torch.tensor(0, dtype=torch.long))

    def limits(self) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) for the next training step, each a 0-d float32 tensor (the schedule)."""
        return self._limits(self.renorm_steps)

    def _limits(self, steps: Tensor) -> tuple[Tensor, Tensor]:
        step = steps.float()
        relax_r = _ramp(step, self.warmup_steps, self.r_max_ramp_steps)
        relax_d = _ramp(step, self.warmup_steps, self.d_max_ramp_steps)
        return 1.0 + (self.r_max - 1.0) * relax_r, self.d_max * relax_d

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        if not self.training:
            return self._eval(x)
        # What r and d correct towards: the running statistics before this batch's update.
        running_mean, running_var, tracked, steps = (
            _snapshot(t) for t in (self.running_mean, self.running_var, self.num_batches_tracked, self.renorm_steps)
        )
        var, mean = self._batch_stats(*moments(x), x)  # (1, C) each; updates the running statistics
        r_max, d_max = self._limits(steps)
        r_max = torch.where(tracked > 0, r_max, 1.0)  # no running statistics yet: r = 1, d = 0
        d_max = torch.where(tracked > 0, d_max, 0.0)
        sigma = torch.sqrt(running_var.to(var.dtype) + self.eps)  # (C,)
        r = torch.clamp(torch.sqrt(var[0].detach() + self.eps) / sigma, 1.0 / r_max, r_max).detach()
        d = torch.clamp((mean[0].detach() - running_mean.to(var.dtype)) / sigma, -d_max, d_max).detach()
        with torch.no_grad():
            self.renorm_steps.add_(1)
        weight = self.weight * r.to(self.weight.dtype)  # r, d: constants to autograd
        bias = self.bias + self.weight * d.to(self.weight.dtype)
        return fused_norm(x, weight, bias, [(var, mean)], (BATCH,), self.eps)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
            f"r_max_ramp_steps={self.r_max_ramp_steps}, d_max_ramp_steps={self.d_max_ramp_steps}"
        )


@torch.library.custom_op("normres::snapshot", mutates_args=())
def _snapshot_op(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot_op.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def _snapshot(t: Tensor) -> Tensor:
    """A copy of buffer ``t`` as it is now, which torch.compile keeps for backward.

    Under torch.compile a plain copy of a buffer the forward then updates is not enough: AOTAutograd's
    partitioner may recompute the copy (and what follows from it, here d) in backward, after the
    update, from the updated buffer -- silently wrong weight gradients (pytorch/pytorch PR #197039,
    "Don't recompute reads of mutated inputs or mutable buffers", open; torch 2.14 is affected). A
    custom op is outside the partitioner's list of recomputable ops, so its output is saved.
    Eager: a plain clone (no custom-op dispatch).
    """
    return _snapshot_op(t) if fused.compiling() else t.detach().clone()


def _ramp(step: Tensor, start: int, length: int) -> Tensor:
    """0 before ``start``, rising linearly to 1 over ``length`` steps (a jump at ``start`` for 0)."""
    if length == 0:
        return (step >= start).float()
    return ((step - start) / length).clamp(0.0, 1.0)


class GhostBatchNorm(_BatchStatistics):
    """Ghost batch normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better:
    closing the generalization gap in large batch training of neural networks", NeurIPS,
    Algorithm 1).

    Training: the batch is split, in order, into ghost batches of ``virtual_batch_size`` samples
    (the last one smaller when the batch size is no multiple of it), and each is normalized with its
    own per-channel statistics over (samples of the ghost batch, H, W); a batch no larger than
    ``virtual_batch_size`` is plain batch norm. Eval: the running statistics, as batch norm.

    The running averages are updated once per training batch with the average over its samples of
    their ghost batch's mean and unbiased variance (so the running mean is the batch mean, and the
    running variance the average within-ghost-batch variance that training normalizes with);
    ``momentum`` is per batch as in ``nn.BatchNorm2d``. Hoffer et al.'s Algorithm 1 applies the
    momentum once per ghost batch instead, and composer's GhostBatchNorm divides it by the number of
    ghost batches and applies it per ghost batch; both agree with this to first order in the
    momentum. The default of 32 samples is composer's.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        virtual_batch_size: int = 32,
        eps: float = DEFAULT_EPS,
        momentum: float | None = DEFAULT_MOMENTUM,
    ) -> None:
        super().__init__(num_channels, eps, momentum)
        self.virtual_batch_size = virtual_batch_size
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}  # per batch shape: see _ghosts

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        if not self.training:
            return self._eval(x)
        n, _, h, w = x.shape
        if n <= self.virtual_batch_size:  # one ghost batch: batch norm
            stats = self._batch_stats(*moments(x), x)
            return fused_norm(x, self.weight, self.bias, [stats], (BATCH,), self.eps)
        sizes = ghost_sizes(n, self.virtual_batch_size)
        if min(sizes) * h * w < 2:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel in every ghost batch, got input "
                f"shape {tuple(x.shape)} with ghost batches of {sizes} samples"
            )
        averaging, unbiased = self._ghosts(sizes, h * w, x.device)
        var, mean = pool(*moments(x), GHOST, averaging)  # (N, C): each sample's ghost batch statistics
        with torch.no_grad():
            self._track(mean.mean(0), (var * unbiased).mean(0))
        return fused_norm(x, self.weight, self.bias, [(var, mean)], (GHOST,), self.eps, averaging=averaging)

    def _ghosts(self, sizes: list[int], hw: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The (N, N) ghost averaging matrix and the (N, 1) unbiasing factors K / (K - 1) of each
        sample's ghost batch (K = its values per channel); built once per batch shape (eager)."""
        key = (tuple(sizes), hw, device)
        if key in self._cache:
            return self._cache[key]
        counts = torch.tensor([s * hw for s in sizes for _ in range(s)], dtype=torch.float32, device=device)
        built = ghost_averaging_matrix(sum(sizes), self.virtual_batch_size, device), (counts / (counts - 1))[:, None]
        if not fused.compiling():  # while tracing: built in the graph, no Python-side cache
            self._cache[key] = built
        return built

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


# --------------------------------------------------------------------------------------------
# filter response normalization


class FilterResponseNorm(_AffineNorm):
    """Filter response normalization with the thresholded linear unit (Singh & Krishnan 2020,
    "Filter Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep
    Neural Networks", CVPR; its equations and Listing 1, the TensorFlow reference).

    Per sample and channel, no mean subtracted::

        nu2 = mean_{H,W}(x^2),  y = gamma * x / sqrt(nu2 + eps) + beta,  z = max(y, tau)

    with a learned per-channel threshold tau (zeros) and the paper's eps = 1e-6. The TLU is the
    layer's activation (``includes_activation``); ``apply_act=False`` (no activation follows, e.g.
    before a residual addition) leaves it out and keeps the normalization. ``learned_eps=True`` is
    the paper's variant for small activation maps: eps + |eps_l| with a learned scalar eps_l
    initialised to 1e-4 (as TensorFlow Addons' FilterResponseNormalization); that variant runs as
    plain autograd ops. Batch-independent; no running statistics, the same in train and eval mode.
    """

    def __init__(
        self, num_channels: int, *, eps: float = 1e-6, learned_eps: bool = False, apply_act: bool = True
    ) -> None:
        super().__init__(num_channels, eps)
        self.learned_eps, self.apply_act = learned_eps, apply_act
        self.tau = nn.Parameter(torch.zeros(num_channels)) if apply_act else None
        self.eps_learned = nn.Parameter(torch.full((1,), 1e-4)) if learned_eps else None

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        if self.eps_learned is None:
            stats = mean_squares(x)  # (nu2, 0), each (N, C)
            return fused_norm(x, self.weight, self.bias, [stats], (INSTANCE_RMS,), self.eps, tau=self.tau)
        nu2 = x.to(stats_dtype(x)).square().mean((2, 3))  # (N, C), differentiable
        eps = self.eps + self.eps_learned.abs().to(nu2.dtype)
        return fused._composite_norm(x, self.weight, self.bias, [(nu2, torch.zeros_like(nu2))], eps, None, self.tau)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learned_eps={self.learned_eps}, apply_act={self.apply_act}"


# --------------------------------------------------------------------------------------------
# EvoNorm


def evonorm_groups(num_channels: int, groups: int | None = None, channels_per_group: int | None = None) -> int:
    """EvoNorm-S0's group count: as group norm's when ``groups`` or ``channels_per_group`` is given
    (:func:`normres.registry.resolve_groups`, errors included); without either, the reference
    implementation's rule (tensorflow/tpu ``_group_std``): 32 groups, or the largest number below
    32 that divides ``num_channels`` (16 groups of 1 channel for 16 channels, 32 for 64)."""
    if groups is None and channels_per_group is None:
        count = min(32, num_channels)
        while num_channels % count:
            count -= 1
        return count
    return resolve_groups(num_channels, groups, channels_per_group)


class EvoNormB0(nn.Module):
    """EvoNorm-B0 (Liu, Brock, Simonyan & Le 2020, "Evolving Normalization-Activation Layers",
    NeurIPS; the paper's definition and its reference implementation, tensorflow/tpu
    ``models/official/resnet/resnet_model.py``, ``evonorm``).

    A batch-dependent normalization-activation layer::

        y = x / max(sqrt(s2_B + eps), v * x + sqrt(s2_I + eps)) * gamma + beta

    with s2_B the per-channel variance over (N, H, W) in training and the running variance in eval
    mode, s2_I the per-(n, c) variance over (H, W), and learned per-channel v (ones), gamma (ones)
    and beta (zeros); eps = 1e-5 and momentum 0.1 (decay 0.9) as in the reference. Only the variance
    is tracked (buffer ``running_var``, unbiased as nn.BatchNorm2d's, where the reference keeps the
    biased one); ``momentum`` None gives a cumulative average, so PreciseBN applies. Both variances
    are differentiated in training (as in the reference).

    ``apply_act=False`` (no activation follows: before a residual addition, in a projection
    shortcut). The reference implementation then applies only the affine, ``x * gamma + beta``,
    with no normalization at all (timm's EvoNorm2dB0 does the same) -- but it refuses EvoNorm in
    post-activation ResNets ("Evonorms require the pre-activation form"), the only place where such
    layers occur, so it never runs that case. normres's CIFAR ResNet is post-activation; a plain
    affine there would leave the residual branch and the shortcut projection of every block
    unnormalized, so the study would compare a half-normalized network. This layer therefore keeps
    the normalization and drops only the term that makes it an activation: v = 0, i.e.
    ``y = x / max(sqrt(s2_B + eps), sqrt(s2_I + eps)) * gamma + beta`` -- a per-(n, c) scale, odd in
    x (no rectification), and the B0 formula itself at v = 0. It has no parameter v.

    Eager, one autograd function (:class:`_EvoNormB0Function`) with the backward written out, the
    statistics' dependence on x included; while compiling, the formula as plain ops.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = DEFAULT_EPS,
        momentum: float | None = DEFAULT_MOMENTUM,
        apply_act: bool = True,
    ) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels, self.eps, self.momentum, self.apply_act = num_channels, eps, momentum, apply_act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.v = nn.Parameter(torch.ones(num_channels)) if apply_act else None
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Back to the initial variance (as ``nn.BatchNorm2d``; PreciseBN starts from here)."""
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        var, mean = moments(x)  # (N, C) each; eager: constants (the function differentiates them)
        batch_mean = None
        if self.training:
            batch_var, batch_mean = pool(var, mean, BATCH)  # (1, C) each
            self._track(batch_var[0].detach(), x)
        else:
            batch_var = self.running_var.to(var.dtype)[None]
        dtype = var.dtype
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        v = None if self.v is None else self.v.to(dtype)
        if fused.compiling():  # the formula itself; autograd through var_mean
            return _evonorm_b0_composite(x, v, weight, bias, batch_var, var, self.eps)
        with torch.no_grad():
            sigma_b = torch.sqrt(batch_var + self.eps)  # (1, C)
            sigma_i = torch.sqrt(var + self.eps)  # (N, C)
        return _EvoNormB0Function.apply(x, v, weight, bias, mean, batch_mean, sigma_b, sigma_i)

    @torch.no_grad()
    def _track(self, batch_var: Tensor, x: Tensor) -> None:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if count < 2:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel when training, "
                f"got input shape {tuple(x.shape)}"
            )
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_var.lerp_((batch_var * (count / (count - 1))).to(self.running_var.dtype), factor)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, apply_act={self.apply_act}"


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020, "Evolving Normalization-Activation Layers",
    NeurIPS; the paper's definition and its reference implementation, tensorflow/tpu
    ``models/official/resnet/resnet_model.py``, ``evonorm``).

    A batch-independent normalization-activation layer::

        y = x * sigmoid(v * x) / sqrt(s2_G + eps) * gamma + beta

    with s2_G the per-sample variance over each group of channels and (H, W) (as group norm's),
    learned per-channel v (ones), gamma (ones), beta (zeros) and eps = 1e-5 as in the reference;
    the same in train and eval mode, no running statistics. Groups: ``groups`` or
    ``channels_per_group`` as group norm's; without either, the reference's rule
    (:func:`evonorm_groups`: 32, or the largest divisor of the channels below 32).

    ``apply_act=False`` (no activation follows: before a residual addition, in a projection
    shortcut): the reference then applies only the affine ``x * gamma + beta`` (no normalization),
    and refuses EvoNorm in the post-activation ResNets where this occurs (see :class:`EvoNormB0`).
    Here the normalization stays and the sigmoid gate goes, ``y = x / sqrt(s2_G + eps) * gamma +
    beta`` (the gate removed as in timm's EvoNorm2dS0a, which keeps the division without its
    activation); no parameter v.

    Eager, one autograd function (:class:`_EvoNormS0Function`) with the backward written out, the
    statistics' dependence on x included; while compiling, the formula as plain ops.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        groups: int | None = None,
        channels_per_group: int | None = None,
        eps: float = DEFAULT_EPS,
        apply_act: bool = True,
    ) -> None:
        resolved = evonorm_groups(num_channels, groups, channels_per_group)
        super().__init__()
        self.num_channels, self.groups, self.eps, self.apply_act = num_channels, resolved, eps, apply_act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.v = nn.Parameter(torch.ones(num_channels)) if apply_act else None
        self.register_buffer("averaging", group_averaging_matrix(num_channels, resolved), persistent=False)

    @float32_statistics
    def forward(self, x: Tensor) -> Tensor:
        x = check_input(x, self.num_channels, type(self).__name__)
        var, mean = moments(x)  # (N, C) each; eager: constants (the function differentiates them)
        group_var, group_mean = pool(var, mean, GROUP, self.averaging)  # (N, C) each
        dtype = var.dtype
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        v = None if self.v is None else self.v.to(dtype)
        if fused.compiling():  # the formula itself; autograd through var_mean
            scale = weight * torch.rsqrt(group_var + self.eps)  # (N, C)
            return _evonorm_s0_composite(x, v, scale, bias)
        with torch.no_grad():
            sigma_g = torch.sqrt(group_var + self.eps)  # (N, C)
        return _EvoNormS0Function.apply(x, v, weight, bias, mean, group_mean, sigma_g, self.averaging)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups}, eps={self.eps}, apply_act={self.apply_act}"


def _evonorm_b0_composite(x, v, weight, bias, batch_var, var, eps) -> Tensor:
    """EvoNorm-B0 from plain differentiable ops (the form torch.compile traces)."""
    c = x.shape[1]
    sigma_b = torch.sqrt(batch_var + eps).view(1, c, 1, 1)
    sigma_i = torch.sqrt(var + eps).view(-1, c, 1, 1)
    if v is None:
        y = x * (weight.view(1, c, 1, 1) / torch.maximum(sigma_b, sigma_i)) + bias.view(1, c, 1, 1)
    else:
        y = x / torch.maximum(sigma_b, x * v.view(1, c, 1, 1) + sigma_i) * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)
    return y.to(x.dtype)


def _evonorm_s0_composite(x, v, scale, bias) -> Tensor:
    """EvoNorm-S0 from plain differentiable ops; ``scale`` = gamma / sqrt(s2_G + eps), (N, C)."""
    c = x.shape[1]
    gated = x if v is None else x * torch.sigmoid(x * v.view(1, c, 1, 1))
    return (gated * scale.view(-1, c, 1, 1) + bias.view(1, c, 1, 1)).to(x.dtype)


def _moments_coefficients(d_var: Tensor, d_mean: Tensor, mean: Tensor, hw: int) -> tuple[Tensor, Tensor]:
    """Per-(n, c) B, C with dx = x * B + C for cotangents of the per-(n, c) variance and mean over
    (H, W): d var / dx = 2 (x - mean) / HW, d mean / dx = 1 / HW."""
    coef_b = d_var * (2.0 / hw)
    return coef_b, d_mean / hw - coef_b * mean


def _sum_hw(t: Tensor) -> Tensor:
    """Per-(n, c) sums over (H, W), (N, C). (Summing over (N, H, W) at once is 2.5x slower on CPUs
    in channels_last; the (N, C) result is summed over n afterwards.)"""
    return t.sum((2, 3))


def _evonorm_b0_denominator(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """S = max(1, a * x + b) for a (1, C) and b (N, C): EvoNorm-B0's denominator over sigma_B."""
    c = x.shape[1]
    return torch.addcmul(b.view(-1, c, 1, 1), x, a.view(1, c, 1, 1)).clamp_min_(1.0)


class _EvoNormB0Function(torch.autograd.Function):
    """EvoNorm-B0 given its statistics (constants here, their dependence on x in backward).

    With a = v / sigma_b, b = sigma_i / sigma_b, g = gamma / sigma_b, the layer is
    y = g * x / S + beta with S = max(1, a * x + b) (elementwise; per (n, c) without activation,
    a = 0). Backward, with R = [S > 1] (the right branch of the max), u = dy / S and
    h = R * dy * x / S^2:

        dx (direct) = g * (u - a * h),  d_g = sum dy * x / S,  d_a = -g * sum h * x,
        d_b = -g * sum_hw h,  d_beta = sum dy,

    where sum h * x is read off sums already made: in the right branch a * x = S - b, so
    sum_hw h * x = (sum_hw R * dy * x / S - b * sum_hw h) / a (one pass fewer; see
    :func:`_exact_near_zero` for when it is summed directly instead),

    then through a, b, g to v, gamma, sigma_b and sigma_i, and from the variances to x:
    d_var_I = d_sigma_i / (2 sigma_i) (+ d_var_B / N in training), d_mean_I = d_var_B * 2 (mean_I -
    mean_B) / N, added to dx as x * B + C per (n, c). R is read off S with one threshold pass;
    dx is written into one buffer. Only x is kept for backward, which recomputes S (two passes): a
    kept S costs more on the 2-core CPU, since every step then faults in more memory (ResNet-14 step:
    1.25x torch_bn recomputing, 1.35x keeping it).
    """

    @staticmethod
    def forward(ctx, x, v, weight, bias, mean, batch_mean, sigma_b, sigma_i):  # type: ignore[override]
        c = x.shape[1]
        inv = 1.0 / sigma_b  # (1, C)
        g = (weight * inv).view(1, c, 1, 1)
        b = sigma_i * inv  # (N, C)
        if v is None:  # S per (n, c): a per-(n, c) scale
            den = b.clamp_min(1.0)
            y = scale_shift(x, (g.view(1, c) / den).view(-1, c, 1, 1), bias.view(1, c, 1, 1))
        else:
            y = _evonorm_b0_denominator(x, v * inv, b)  # S, then x / S * g + beta in its place
            y = torch.div(x, y, out=y)
            y = torch.addcmul(bias.view(1, c, 1, 1), y, g, out=y)
            den = None  # recomputed in backward: keeping it would cost more (memory) than its two passes
        ctx.save_for_backward(x, v, weight, mean, batch_mean, sigma_b, sigma_i, den)
        ctx.has_v, ctx.training = v is not None, batch_mean is not None
        return y.to(x.dtype) if y.dtype != x.dtype else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, v, weight, mean, batch_mean, sigma_b, sigma_i, den = ctx.saved_tensors
        n, c, h, w = x.shape
        in_dtype, dtype = x.dtype, sigma_b.dtype
        dy = dy.contiguous(memory_format=memory_format_of(x))
        if in_dtype != dtype:
            x, dy = x.to(dtype), dy.to(dtype)
        inv = 1.0 / sigma_b  # (1, C)
        g = weight * inv
        b = sigma_i * inv  # (N, C)
        if ctx.has_v:
            den = _evonorm_b0_denominator(x, v * inv, b)
        t1 = _sum_hw(dy)  # (N, C)
        if not ctx.has_v:  # S, R per (n, c): sums of dy and dy * x suffice
            right = (b > 1.0).to(dtype)  # (N, C)
            t2 = _sum_hw(torch.mul(dy, x))
            d_g = (t2 / den).sum(0, keepdim=True)  # (1, C)
            d_b = -g * right * t2 / den.square()  # (N, C)
            d_a = None
            direct = g / den  # (N, C): dx = dy * g / S + ...
        else:
            a = v * inv  # (1, C)
            u = torch.div(dy, den)  # dy / S
            e = torch.mul(u, x)  # dy * x / S
            d_g = _sum_hw(e).sum(0, keepdim=True)
            e = torch.ops.aten.threshold_backward.grad_input(e, den, 1.0, grad_input=e)  # R * dy * x / S
            if _exact_near_zero(v, x):
                h_sum = _sum_hw(e.div_(den))  # e is h from here on
                hx_sum = _sum_hw(torch.mul(e, x))
            else:
                right_sum = _sum_hw(e)
                h_sum = _sum_hw(e.div_(den))
                hx_sum = (right_sum - b * h_sum) / a
            d_b = -g * h_sum
            d_a = -g * hx_sum.sum(0, keepdim=True)
        # through a = v / sigma_b, b = sigma_i / sigma_b, g = gamma / sigma_b
        d_sigma_b_scaled = d_g * g + (d_b * b).sum(0, keepdim=True)  # sigma_b * d_sigma_b, negated
        d_v = d_weight = None
        if ctx.has_v:
            d_sigma_b_scaled = d_sigma_b_scaled + d_a * a
            d_v = (d_a * inv).view(-1).to(v.dtype)
        d_weight = (d_g * inv).view(-1).to(weight.dtype)
        d_var = d_b * inv / (2.0 * sigma_i)  # (N, C): via sigma_i = sqrt(var_I + eps)
        d_mean = torch.zeros_like(d_var)
        if ctx.training:  # via sigma_b = sqrt(var_B + eps), var_B pooled from the slabs' moments
            d_var_b = -d_sigma_b_scaled * inv / (2.0 * sigma_b)  # (1, C)
            d_var = d_var + d_var_b / n
            d_mean = d_var_b * (2.0 / n) * (mean - batch_mean)
        coef_b, coef_c = _moments_coefficients(d_var, d_mean, mean, h * w)
        dx = None
        if ctx.needs_input_grad[0]:
            into = den if ctx.has_v else None  # S is no longer needed: dx takes its memory
            dx = torch.addcmul(coef_c.view(n, c, 1, 1), x, coef_b.view(n, c, 1, 1), out=into)
            if ctx.has_v:
                dx.addcmul_(u, g.view(1, c, 1, 1)).addcmul_(e, (-g * a).view(1, c, 1, 1))
            else:
                dx.addcmul_(dy, direct.view(n, c, 1, 1))
            if in_dtype != dtype:
                dx = dx.to(in_dtype)
        d_bias = t1.sum(0).to(weight.dtype)
        return dx, d_v, d_weight, d_bias, None, None, None, None


class _EvoNormS0Function(torch.autograd.Function):
    """EvoNorm-S0 given its group statistics (constants here, their dependence on x in backward).

    y = a * f + beta with f = x * s, s = sigmoid(u), u = v * x (f = x without activation) and
    a = gamma / sigma_G per (n, c). Where no |v| is small (:func:`_exact_near_zero`) f is computed
    as silu(u) / v (one silu pass instead of a sigmoid and a product). Backward, with
    q = dy * df/dx = dy * (s + u * s * (1 - s)) (one silu_backward pass at u):

        dx (direct) = a * q,  d_a = sum_hw dy * f,  d_v = sum a * dy * x^2 * s * (1 - s),
        d_beta = sum dy,

    where d_v's sum is read off sums already made: x * q = dy * f + v * dy * x^2 * s * (1 - s), so
    it is (sum_hw x * q - d_a) / v (two passes fewer), or, where some |v| is small, summed directly
    from sigmoid_backward. Then d_gamma = sum_n d_a / sigma_G and, through
    sigma_G = sqrt(var_G + eps) and the group pooling (the averaging matrix M):
    d_var_I = M d_var_G, d_mean_I = 2 (mean_I - mean_G) M d_var_G, added to dx as x * B + C per
    (n, c).

    Only x is kept for backward, which recomputes u and f (two passes): on the 2-core CPU a kept
    tensor costs more than that, since every training step then maps and faults in more memory
    (measured on the ResNet-14 step: 1.23x torch_bn recomputing, 1.38x keeping u and f).
    """

    @staticmethod
    def forward(ctx, x, v, weight, bias, mean, group_mean, sigma_g, averaging):  # type: ignore[override]
        c = x.shape[1]
        a = (weight / sigma_g).view(-1, c, 1, 1)  # (N, C, 1, 1)
        ctx.has_v = v is not None
        ctx.exact = ctx.has_v and _exact_near_zero(v, x)
        if not ctx.has_v:
            y = scale_shift(x, a, bias.view(1, c, 1, 1))
        else:
            y = _evonorm_s0_gated(x, v, ctx.exact)  # f, or v * f
            scale = a if ctx.exact else a / v.view(1, c, 1, 1)
            y = torch.addcmul(bias.view(1, c, 1, 1), y, scale, out=y)
        ctx.save_for_backward(x, v, weight, mean, group_mean, sigma_g, averaging)
        return y.to(x.dtype) if y.dtype != x.dtype else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, v, weight, mean, group_mean, sigma_g, averaging = ctx.saved_tensors
        n, c, h, w = x.shape
        in_dtype, dtype = x.dtype, sigma_g.dtype
        dy = dy.contiguous(memory_format=memory_format_of(x))
        if in_dtype != dtype:
            x, dy = x.to(dtype), dy.to(dtype)
        a = weight / sigma_g  # (N, C)
        t1 = _sum_hw(dy)
        d_v = None
        if not ctx.has_v:
            direct = dy
            buf = torch.mul(dy, x)
            d_a = _sum_hw(buf)
        elif ctx.exact:
            pre = torch.mul(x, v.view(1, c, 1, 1))  # u
            gate = torch.sigmoid(pre)  # s
            buf = torch.mul(dy, x)
            sw = torch.ops.aten.sigmoid_backward(buf, gate)  # dy * x * s * (1 - s)
            d_a = _sum_hw(buf.mul_(gate))
            d_v = (a * _sum_hw(torch.mul(sw, x, out=buf))).sum(0)
            direct = torch.ops.aten.silu_backward.grad_input(dy, pre, grad_input=sw)  # q
        else:
            pre = torch.mul(x, v.view(1, c, 1, 1))  # u
            direct = torch.ops.aten.silu_backward(dy, pre)  # q
            buf = torch.nn.functional.silu(pre, inplace=True).mul_(dy)  # dy * v * f
            d_a = _sum_hw(buf) / v
            xq_sum = _sum_hw(torch.mul(x, direct, out=buf))
            d_v = (a * (xq_sum - d_a) / v).sum(0)
        d_weight = (d_a / sigma_g).sum(0).to(weight.dtype)
        d_var_g = -d_a * weight / (2.0 * sigma_g.pow(3))  # (N, C): via sigma_G = sqrt(var_G + eps)
        d_var = d_var_g @ averaging.to(dtype)  # (N, C): to every channel of the group (M symmetric)
        d_mean = 2.0 * (mean - group_mean) * d_var
        coef_b, coef_c = _moments_coefficients(d_var, d_mean, mean, h * w)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(coef_c.view(n, c, 1, 1), x, coef_b.view(n, c, 1, 1), out=buf)
            dx.addcmul_(direct, a.view(n, c, 1, 1))
            if in_dtype != dtype:
                dx = dx.to(in_dtype)
        d_bias = t1.sum(0).to(weight.dtype)
        return dx, None if d_v is None else d_v.to(v.dtype), d_weight, d_bias, None, None, None, None


def _evonorm_s0_gated(x: Tensor, v: Tensor, exact: bool) -> Tensor:
    """f = x * sigmoid(v * x) (``exact``; three passes) or v * f = silu(v * x) (two), in one new tensor."""
    pre = torch.mul(x, v.view(1, x.shape[1], 1, 1))  # u
    if exact:
        return pre.sigmoid_().mul_(x)
    return torch.nn.functional.silu(pre, inplace=True)


# Below this |v| the shortcut sums of the EvoNorm backwards (a difference of two sums divided by
# v) would lose digits; above it their error is under 1e-5 of the gradient's size (measured in
# float32 against float64 at |v| = 0.1; it grows as 1/|v|).
_SMALL_V = 0.1


def _exact_near_zero(v: Tensor, x: Tensor) -> bool:
    """Whether an EvoNorm backward sums v's gradient (and B0's d_a) directly: where some |v| is
    below :data:`_SMALL_V`, and always on GPUs (reading v's size back would synchronize every step;
    speed there is not what the shortcut is for)."""
    return x.device.type != "cpu" or bool((v.abs() < _SMALL_V).any())
