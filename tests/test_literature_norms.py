"""Tests for normres.norms.literature: batch renorm, ghost batch norm, FRN and EvoNorm-B0/-S0 against
references written here from the papers' equations (plain torch ops and autograd)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normres import registry as R
from normres.models import build_model
from normres.norms import fused, literature, make_norm, running_stat_layers
from normres.norms.literature import (
    BatchRenorm,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GhostBatchNorm,
    evonorm_groups,
)

LITERATURE = ["brn", "gbn", "frn", "evonorm_b0", "evonorm_s0"]
C4 = (1, -1, 1, 1)  # per-channel vectors broadcast against (N, C, H, W)

# Every layer variant of the tests: (registry name, constructor options). Batch renorm without the
# warm-up (its corrections act from the second step on), ghost batches of 3 (6 samples: 3 + 3; 7: 3 + 3 + 1).
VARIANTS = {
    "brn": ("brn", {"warmup_steps": 0, "r_max_ramp_steps": 0, "d_max_ramp_steps": 0, "r_max": 1.5, "d_max": 0.5}),
    "gbn": ("gbn", {"virtual_batch_size": 3}),
    "frn": ("frn", {}),
    "frn_noact": ("frn", {"apply_act": False}),
    "frn_learned_eps": ("frn", {"learned_eps": True}),
    "evonorm_b0": ("evonorm_b0", {}),
    "evonorm_b0_noact": ("evonorm_b0", {"apply_act": False}),
    "evonorm_s0": ("evonorm_s0", {"groups": 4}),
    "evonorm_s0_noact": ("evonorm_s0", {"groups": 4, "apply_act": False}),
}


def _layer(variant: str, channels: int = 8) -> nn.Module:
    """The layer of ``variant`` (its class directly: apply_act is the models' argument, no option),
    with non-trivial parameters."""
    name, options = VARIANTS[variant]
    layer = R.load_object(R.NORMS[name].factory)(channels, **options)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in layer.named_parameters():
            centre = {"weight": 1.0, "v": 1.0}.get(key, 0.0)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + centre)
        if getattr(layer, "eps_learned", None) is not None:
            layer.eps_learned.fill_(0.05)
    return layer


def _input(shape, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Random input with per-channel offsets and scales, so every statistic matters."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(1, shape[1], 1, 1, generator=gen)
    scale = torch.rand(1, shape[1], 1, 1, generator=gen) * 2 + 0.5
    return (torch.randn(shape, generator=gen) * scale + offset).to(dtype)


def _forward_backward(module, x: torch.Tensor, dy: torch.Tensor):
    x = x.clone().requires_grad_(True)
    params = dict(module.named_parameters())
    for p in params.values():
        p.grad = None
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, {key: p.grad.clone() for key, p in params.items()}


def _assert_close(actual, expected, scale_tol: float = 1e-5):
    """float32 comparison with an absolute tolerance relative to the tensor's scale."""
    atol = scale_tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4)


@pytest.fixture(params=["eager", "composite"])
def form(request, monkeypatch) -> str:
    """Both forms of every layer: eager (fused and hand-written autograd functions) and the composite
    ops they take while torch.compile traces (here run eagerly)."""
    if request.param == "composite":
        monkeypatch.setattr(fused, "compiling", lambda: True)
    return request.param


# --------------------------------------------------------------------------------------------
# references, from the papers' equations


def _batch_moments(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)  # (C,) each


def ref_batch_renorm(layer: BatchRenorm, x, running_mean, running_var, r_max, d_max):
    """Ioffe 2017, Algorithm 1: r and d from the running statistics before the update, stop-gradient."""
    mu, var = _batch_moments(x)
    sigma_b = torch.sqrt(var + layer.eps)
    sigma = torch.sqrt(running_var + layer.eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu - running_mean) / sigma, -d_max, d_max).detach()
    x_hat = (x - mu.view(C4)) / sigma_b.view(C4) * r.view(C4) + d.view(C4)
    return layer.weight.view(C4) * x_hat + layer.bias.view(C4)


def ref_batch_norm(x, weight, bias, eps):
    mu, var = _batch_moments(x)
    return (x - mu.view(C4)) / torch.sqrt(var.view(C4) + eps) * weight.view(C4) + bias.view(C4)


def ref_ghost_batch_norm(layer: GhostBatchNorm, x):
    """Hoffer et al. 2017, Algorithm 1: batch norm over each ghost batch, in order."""
    chunks = torch.split(x, layer.virtual_batch_size)
    return torch.cat([ref_batch_norm(c, layer.weight, layer.bias, layer.eps) for c in chunks])


def ref_running_eval(layer, x):
    """Batch norm's eval mode: the running statistics."""
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    return (x - layer.running_mean.view(C4)) * scale.view(C4) + layer.bias.view(C4)


def ref_frn(layer: FilterResponseNorm, x):
    """Singh & Krishnan 2020, equations 1-3 (Listing 1): no centring, then max(y, tau)."""
    nu2 = x.pow(2).mean((2, 3), keepdim=True)
    eps = layer.eps if layer.eps_learned is None else layer.eps + layer.eps_learned.abs()
    y = layer.weight.view(C4) * x / torch.sqrt(nu2 + eps) + layer.bias.view(C4)
    return y if layer.tau is None else torch.max(y, layer.tau.view(C4))


def ref_evonorm_b0(layer: EvoNormB0, x):
    """Liu et al. 2020, table 1: x / max(sqrt(s2_B + eps), v * x + sqrt(s2_I + eps)) * gamma + beta
    (v = 0 without activation)."""
    batch_var = x.var((0, 2, 3), unbiased=False) if layer.training else layer.running_var
    left = torch.sqrt(batch_var.view(C4) + layer.eps)
    v = torch.zeros(x.shape[1]) if layer.v is None else layer.v
    right = v.view(C4) * x + torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + layer.eps)
    return x / torch.max(left, right) * layer.weight.view(C4) + layer.bias.view(C4)


def ref_evonorm_s0(layer: EvoNormS0, x):
    """Liu et al. 2020, table 1: x * sigmoid(v * x) / sqrt(s2_G + eps) * gamma + beta (no gate
    without activation)."""
    n, c, h, w = x.shape
    grouped = x.reshape(n, layer.groups, c // layer.groups, h, w)
    std = torch.sqrt(grouped.var((2, 3, 4), unbiased=False, keepdim=True) + layer.eps).expand_as(grouped)
    gate = 1.0 if layer.v is None else torch.sigmoid(layer.v.view(C4) * x)
    return x * gate / std.reshape(n, c, h, w) * layer.weight.view(C4) + layer.bias.view(C4)


def reference(layer, x, before=None):
    """The paper's output of ``layer`` on ``x``; ``before``: (running_mean, running_var, r_max, d_max)
    of batch renorm before this step."""
    if isinstance(layer, BatchRenorm):
        return ref_batch_renorm(layer, x, *before) if layer.training else ref_running_eval(layer, x)
    if isinstance(layer, GhostBatchNorm):
        return ref_ghost_batch_norm(layer, x) if layer.training else ref_running_eval(layer, x)
    if isinstance(layer, FilterResponseNorm):
        return ref_frn(layer, x)
    if isinstance(layer, EvoNormB0):
        return ref_evonorm_b0(layer, x)
    return ref_evonorm_s0(layer, x)


def _state_before(layer):
    if not isinstance(layer, BatchRenorm):
        return None
    r_max, d_max = layer.limits()
    if int(layer.num_batches_tracked) == 0:
        r_max, d_max = torch.tensor(1.0), torch.tensor(0.0)
    return layer.running_mean.clone(), layer.running_var.clone(), r_max, d_max


def _reference_grads(layer, x, dy, before):
    """Output and gradients of the reference, on a copy of the layer (its own parameters)."""
    ref = copy.deepcopy(layer)
    x = x.clone().requires_grad_(True)
    y = reference(ref, x, before)
    y.backward(dy)
    return y.detach(), x.grad, {key: p.grad for key, p in ref.named_parameters()}


# --------------------------------------------------------------------------------------------
# forward and gradients against the references, train and eval mode


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference_in_train_and_eval_mode(variant, form):
    layer = _layer(variant)
    for step in range(4):  # train steps (batch renorm's corrections act from the second on), then eval
        layer.train(step < 3)
        x = _input((7, 8, 5, 6), seed=10 + step)
        dy = torch.randn(7, 8, 5, 6, generator=torch.Generator().manual_seed(20 + step))
        before = _state_before(layer)
        expected = _reference_grads(layer, x, dy, before)
        y, dx, grads = _forward_backward(layer, x, dy)
        _assert_close(y, expected[0])
        _assert_close(dx, expected[1])
        assert grads.keys() == expected[2].keys()
        for key in grads:
            _assert_close(grads[key], expected[2][key])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_channels_last_and_nchw_agree_and_keep_their_layout(variant):
    layer = _layer(variant)
    x, dy = _input((6, 8, 5, 6)), torch.randn(6, 8, 5, 6)
    state = copy.deepcopy(layer.state_dict())
    y, dx, grads = _forward_backward(layer, x, dy)
    layer.load_state_dict(state)
    cl = torch.channels_last
    y_cl, dx_cl, grads_cl = _forward_backward(layer, x.to(memory_format=cl), dy.to(memory_format=cl))
    assert y_cl.is_contiguous(memory_format=cl) and not y_cl.is_contiguous()
    assert dx_cl.is_contiguous(memory_format=cl) and not dx_cl.is_contiguous()  # the conv's gradient too
    assert y.is_contiguous() and dx.is_contiguous()
    _assert_close(y_cl, y)
    _assert_close(dx_cl, dx)
    for key in grads:
        _assert_close(grads_cl[key], grads[key])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_float64(variant, mode, form):
    layer = _layer(variant, channels=4).double()
    layer.train()
    layer(_input((5, 4, 3, 3), seed=3, dtype=torch.float64))  # running statistics for eval mode
    if isinstance(layer, BatchRenorm) and mode == "train":
        # r and d are not differentiated, so finite differences only agree where they are clipped
        # (constants): running statistics far from the batch's
        with torch.no_grad():
            layer.running_mean.copy_(torch.tensor([100.0, -100.0, 100.0, -100.0]))
            layer.running_var.copy_(torch.tensor([1e3, 1e-3, 1e3, 1e-3]))
    layer.train(mode == "train")
    state = {key: b.clone() for key, b in layer.state_dict().items() if key not in dict(layer.named_parameters())}
    params = dict(layer.named_parameters())
    x = _input((5, 4, 3, 3), seed=4, dtype=torch.float64).requires_grad_(True)

    def fn(x, *values):
        if layer.training:  # every call sees the same running statistics
            with torch.no_grad():
                for key, b in layer.named_buffers():
                    if key in state:
                        b.copy_(state[key])
        return torch.func.functional_call(layer, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_composite_form_matches_eager_form(variant, monkeypatch):
    eager = _layer(variant)
    composite = copy.deepcopy(eager)
    for step, mode in enumerate(["train", "train", "train", "eval"]):
        for m in (eager, composite):
            m.train(mode == "train")
        x, dy = _input((7, 8, 5, 6), seed=step), torch.randn(7, 8, 5, 6)
        expected = _forward_backward(eager, x, dy)
        with monkeypatch.context() as patch:
            patch.setattr(fused, "compiling", lambda: True)
            actual = _forward_backward(composite, x, dy)
        for a, e in zip(actual[:2], expected[:2]):
            _assert_close(a, e)
        for key in expected[2]:
            _assert_close(actual[2][key], expected[2][key])
    for key, buffer in eager.named_buffers():
        _assert_close(dict(composite.named_buffers())[key].float(), buffer.float())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_autocast_keeps_float32_statistics(variant):
    """Under CPU bf16 autocast (bf16 input, as from a conv) the output matches the float32 result on
    the same values up to bf16 rounding: an offset of 8 standard deviations would break bf16
    statistics. Backward runs and gives finite bf16 input gradients."""
    layer = _layer(variant)
    x = (_input((6, 8, 5, 6)) * 0.5 + 4.0).bfloat16()
    expected = copy.deepcopy(layer)(x.float()).detach()  # a copy: the same running statistics for both
    x = x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    error = (y.float() - expected).abs().max() / expected.abs().max()
    assert error < 1e-2, f"{variant}: relative error {float(error):.4f} under autocast"
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


# --------------------------------------------------------------------------------------------
# running statistics (nn.BatchNorm2d's protocol)


def _unbiased(var, count):
    return var * count / (count - 1)


@pytest.mark.parametrize("variant", ["brn", "gbn", "evonorm_b0"])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_statistics_after_steps(variant, momentum, form):
    name, options = VARIANTS[variant]
    layer = R.load_object(R.NORMS[name].factory)(8, **{**options, "momentum": momentum})
    mean, var = torch.zeros(8), torch.ones(8)
    batch_means, batch_vars = [], []
    for step in range(4):
        x = _input((7, 8, 5, 6), seed=30 + step)
        layer(x).sum().backward()
        if variant == "gbn":  # the average over samples of their ghost batch's statistics
            chunks = torch.split(x, 3)
            step_var = sum(len(c) * _unbiased(c.var((0, 2, 3), unbiased=False), c[0].numel() // 8 * len(c))
                           for c in chunks) / len(x)  # fmt: skip
        else:
            step_var = _unbiased(x.var((0, 2, 3), unbiased=False), x.numel() // 8)
        batch_means.append(x.mean((0, 2, 3)))
        batch_vars.append(step_var)
        factor = 1 / (step + 1) if momentum is None else momentum
        mean, var = torch.lerp(mean, batch_means[-1], factor), torch.lerp(var, step_var, factor)
    _assert_close(layer.running_var, var)
    if variant != "evonorm_b0":  # EvoNorm-B0 tracks the variance only
        _assert_close(layer.running_mean, mean)
    if momentum is None:  # cumulative: the plain average of the batches (PreciseBN)
        _assert_close(layer.running_var, torch.stack(batch_vars).mean(0))
    assert int(layer.num_batches_tracked) == 4
    layer.eval()
    layer(_input((7, 8, 5, 6)))
    assert int(layer.num_batches_tracked) == 4  # eval mode leaves them alone


def test_running_stat_layers_follow_the_batch_norm_protocol():
    model = nn.Sequential(*(make_norm(name, 8, **({"groups": 4} if name == "evonorm_s0" else {})) for name in LITERATURE))
    found = running_stat_layers(model)
    assert [type(m).__name__ for m in found] == ["BatchRenorm", "GhostBatchNorm", "EvoNormB0"]
    assert [R.NORMS[n].running_stats for n in LITERATURE] == [True, True, False, True, False]
    for layer in found:
        layer(_input((6, 8, 4, 4)))
        assert int(layer.num_batches_tracked) == 1
        layer.reset_running_stats()
        assert torch.equal(layer.running_var, torch.ones(8)) and int(layer.num_batches_tracked) == 0
        if hasattr(layer, "running_mean"):
            assert torch.equal(layer.running_mean, torch.zeros(8))


@pytest.mark.parametrize("name", ["brn", "gbn", "evonorm_b0"])
def test_precise_bn_recalibrates_them_like_batch_norm(name):
    """normres.bnstats.recalibrated (PreciseBN) resets the layers, averages over its batches with
    momentum None and restores the momentum; the trained model is left alone. The first layer sees
    the stem conv's outputs, whose batch variances it must average."""
    from normres.bnstats import recalibrated

    torch.manual_seed(0)
    model = build_model("cnn", name, 1, 1, 10)
    first = running_stat_layers(model)[0]
    model.train()
    model(torch.randn(16, 1, 28, 28))  # some trained running statistics
    trained = copy.deepcopy(model.state_dict())
    images = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def normalize(x):
        return x.float().div(255).sub(0.5).div(0.25).contiguous(memory_format=torch.channels_last)

    seen = []
    hooked = copy.deepcopy(model)  # (recalibrated copies it again, hook included)
    running_stat_layers(hooked)[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    net = recalibrated(hooked, images, normalize, batch_size=8)
    assert not net.training and len(seen) == 3
    expected = torch.stack([_unbiased(x.var((0, 2, 3), unbiased=False), x.numel() // x.shape[1]) for x in seen])
    _assert_close(running_stat_layers(net)[0].running_var, expected.mean(0))
    assert all(m.momentum == first.momentum for m in running_stat_layers(net))
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key])


# --------------------------------------------------------------------------------------------
# batch renorm: schedule, clipping, stop-gradient


def test_batch_renorm_schedule_at_chosen_steps():
    """The paper's schedule: plain batch norm for 5k steps, r_max 1 -> 3 by step 40k, d_max 0 -> 5 by 25k."""
    layer = BatchRenorm(4)
    for step, r_max, d_max in [(0, 1.0, 0.0), (5000, 1.0, 0.0), (12500, 1 + 2 * 7500 / 35000, 5 * 7500 / 20000),
                               (25000, 1 + 2 * 20000 / 35000, 5.0), (40000, 3.0, 5.0), (10**6, 3.0, 5.0)]:  # fmt: skip
        layer.renorm_steps.fill_(step)
        limits = layer.limits()
        assert torch.allclose(torch.stack(limits), torch.tensor([r_max, d_max])), (step, limits)
    jump = BatchRenorm(4, warmup_steps=10, r_max_ramp_steps=0, d_max_ramp_steps=0)
    jump.renorm_steps.fill_(9)
    assert [float(t) for t in jump.limits()] == [1.0, 0.0]
    jump.renorm_steps.fill_(10)
    assert [float(t) for t in jump.limits()] == [3.0, 5.0]


def test_batch_renorm_counts_training_steps_in_a_checkpointed_buffer():
    layer = BatchRenorm(4, warmup_steps=2, r_max_ramp_steps=4, d_max_ramp_steps=4)
    for _ in range(3):
        layer(_input((5, 4, 3, 3)))
    layer.eval()
    layer(_input((5, 4, 3, 3)))
    assert int(layer.renorm_steps) == 3  # training forward passes only
    layer.reset_running_stats()
    assert int(layer.renorm_steps) == 3  # the schedule survives PreciseBN's reset
    resumed = BatchRenorm(4, warmup_steps=2, r_max_ramp_steps=4, d_max_ramp_steps=4)
    resumed.load_state_dict(layer.state_dict())
    assert int(resumed.renorm_steps) == 3 and torch.equal(torch.stack(resumed.limits()), torch.stack(layer.limits()))
    assert float(layer.limits()[0]) == 1.5  # one step into the 4-step ramp: 1 + 2 * 1/4


def test_batch_renorm_is_batch_norm_during_warmup_and_without_running_statistics():
    layer, bn = BatchRenorm(8), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.copy_(layer.weight.uniform_(0.5, 1.5))
        bn.bias.copy_(layer.bias.uniform_(-1, 1))
    for step in range(3):  # warm-up: r = 1, d = 0 although the statistics differ
        x = _input((6, 8, 4, 5), seed=step) * (1 + step)
        _assert_close(layer(x), bn(x))
    relaxed = BatchRenorm(8, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
    relaxed.renorm_steps.fill_(10**5)
    x = _input((6, 8, 4, 5)) * 3 + 2
    _assert_close(relaxed(x), ref_batch_norm(x, relaxed.weight, relaxed.bias, relaxed.eps))  # no running stats yet
    assert not torch.allclose(relaxed(x), ref_batch_norm(x, relaxed.weight, relaxed.bias, relaxed.eps))  # now corrected


def test_batch_renorm_clips_r_and_d_and_stops_their_gradient():
    layer = BatchRenorm(4, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0, r_max=2.0, d_max=0.5)
    layer(_input((6, 4, 4, 4)))  # running statistics exist
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 10.0, 0.0, -10.0]))  # d clipped in channels 1 and 3
        layer.running_var.copy_(torch.tensor([1e-2, 1.0, 1e2, 1.0]))  # r clipped in channels 0 and 2
    x, dy = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.randn(6, 4, 4, 4)
    before = _state_before(layer)
    mu, var = _batch_moments(x)
    sigma = torch.sqrt(before[1] + layer.eps)
    r = torch.sqrt(var + layer.eps) / sigma
    d = (mu - before[0]) / sigma
    assert r[0] > 2 and r[2] < 0.5 and d[1] < -0.5 and d[3] > 0.5  # the clipping matters
    y, dx, _ = _forward_backward(layer, x, dy)
    layer.load_state_dict({**layer.state_dict(), "running_mean": before[0], "running_var": before[1]})
    _, dx_ref, _ = _reference_grads(layer, x, dy, before)
    expected = ref_batch_renorm(layer, x, *before)
    _assert_close(y, expected.detach())
    _assert_close(dx, dx_ref)
    # with r and d differentiated (no stop-gradient) the input gradient would differ
    x_free = x.clone().requires_grad_(True)
    sigma_b = torch.sqrt(x_free.var((0, 2, 3), unbiased=False) + layer.eps)
    r_free = torch.clamp(sigma_b / sigma, 0.5, 2.0)
    d_free = torch.clamp((x_free.mean((0, 2, 3)) - before[0]) / sigma, -0.5, 0.5)
    x_hat = (x_free - x_free.mean((0, 2, 3)).view(C4)) / sigma_b.view(C4) * r_free.view(C4) + d_free.view(C4)
    (layer.weight.view(C4) * x_hat + layer.bias.view(C4)).backward(dy)
    assert not torch.allclose(x_free.grad, dx, atol=1e-3)


# --------------------------------------------------------------------------------------------
# ghost batch norm


def test_ghost_batch_norm_splits_in_order_with_a_smaller_last_ghost_batch():
    layer = GhostBatchNorm(8, virtual_batch_size=4)
    x = _input((10, 8, 3, 4))  # ghost batches of 4, 4 and 2 samples
    _assert_close(layer(x), torch.cat([ref_batch_norm(c, layer.weight, layer.bias, layer.eps) for c in x.split([4, 4, 2])]))
    small = _input((4, 8, 3, 4))  # a batch no larger than a ghost batch: batch norm
    _assert_close(layer(small), ref_batch_norm(small, layer.weight, layer.bias, layer.eps))
    with pytest.raises(ValueError, match=r"more than 1 value per channel in every ghost batch.*\[4, 1\]"):
        layer(_input((5, 8, 1, 1)))


# --------------------------------------------------------------------------------------------
# FRN and EvoNorm: activation, no activation, groups


def test_includes_activation_and_apply_act():
    for name in ("frn", "evonorm_b0", "evonorm_s0"):
        assert R.NORMS[name].includes_activation
        cls = R.load_object(R.NORMS[name].factory)
        with_act, without = cls(16), cls(16, apply_act=False)
        assert with_act.apply_act and not without.apply_act
        extra = {"frn": "tau", "evonorm_b0": "v", "evonorm_s0": "v"}[name]
        assert extra in dict(with_act.named_parameters()) and extra not in dict(without.named_parameters())
    assert not any(R.NORMS[n].includes_activation for n in ("brn", "gbn"))


def test_frn_tlu_thresholds_and_passes_gradient_to_tau():
    layer = FilterResponseNorm(4)
    with torch.no_grad():
        layer.tau.copy_(torch.tensor([-10.0, 0.0, 0.5, 10.0]))  # channel 3: every value thresholded
    x = _input((3, 4, 5, 5))
    y, dx, grads = _forward_backward(layer, x, torch.ones(3, 4, 5, 5))
    assert torch.all(y[:, 3] == 10.0) and torch.all(dx[:, 3] == 0)
    assert grads["tau"][3] == 75 and grads["tau"][0] == 0  # 3 * 5 * 5 values at the threshold
    assert torch.all(y[:, 1] >= 0) and torch.any(y[:, 1] == 0)


@pytest.mark.parametrize("variant", ["evonorm_b0", "evonorm_s0"])
@pytest.mark.parametrize("path", ["shortcut", "direct"])
def test_evonorm_gradient_of_v_both_ways(variant, path, monkeypatch):
    """v's gradient (and B0's d_a) is read off other sums (shortcut) unless some |v| is small, when it
    is summed directly: both against float64 references, and the choice itself."""
    layer = _layer(variant)
    with torch.no_grad():
        layer.v.copy_(torch.tensor([1.0, -0.7, 0.3, 2.0, -1.5, 0.5, 1.2, -0.2]))
    assert not literature._exact_near_zero(layer.v, torch.zeros(1))
    if path == "direct":
        monkeypatch.setattr(literature, "_exact_near_zero", lambda v, x: True)
    x, dy = _input((6, 8, 16, 16), seed=7), torch.randn(6, 8, 16, 16)
    reference_layer = copy.deepcopy(layer).double()
    y_ref, dx_ref, grads_ref = _reference_grads(reference_layer, x.double(), dy.double(), None)
    y, dx, grads = _forward_backward(layer, x, dy)
    _assert_close(y, y_ref.float())
    _assert_close(dx, dx_ref.float())
    for key in grads:
        _assert_close(grads[key], grads_ref[key].float())


@pytest.mark.parametrize("variant", ["evonorm_b0", "evonorm_s0"])
def test_evonorm_gradient_of_small_v_is_exact(variant):
    layer = _layer(variant)
    with torch.no_grad():
        layer.v.copy_(torch.tensor([0.0, 1e-6, -1e-3, 0.05, 1.0, -1.0, 0.5, 2.0]))
    assert literature._exact_near_zero(layer.v, torch.zeros(1))
    x, dy = _input((6, 8, 16, 16), seed=8), torch.randn(6, 8, 16, 16)
    _, _, grads_ref = _reference_grads(copy.deepcopy(layer).double(), x.double(), dy.double(), None)
    _, _, grads = _forward_backward(layer, x, dy)
    _assert_close(grads["v"], grads_ref["v"].float())


def test_evonorm_without_activation_normalizes_and_is_odd():
    """No plain affine before residual additions: the output scale does not follow the input's, and
    y - beta is odd in x (no rectification)."""
    x = _input((6, 8, 5, 5))
    for cls in (EvoNormB0, EvoNormS0):
        layer = cls(8, apply_act=False)
        y, y_scaled, y_neg = layer(x), layer(100 * x), layer(-x)
        _assert_close(y_scaled, y, scale_tol=1e-4)
        _assert_close(y_neg, -y)


def test_evonorm_s0_groups():
    assert [evonorm_groups(c) for c in (8, 16, 24, 32, 64, 96)] == [8, 16, 24, 32, 32, 32]  # the reference's rule
    assert make_norm("evonorm_s0", 16).groups == 16
    assert make_norm("evonorm_s0", 64, groups=8).groups == 8
    assert make_norm("evonorm_s0", 64, channels_per_group=16).groups == 4
    with pytest.raises(ValueError, match="evonorm_s0: 3 groups do not divide 16 channels"):
        make_norm("evonorm_s0", 16, groups=3)
    R.check_norm_options(R.NORMS["evonorm_s0"], {}, [16, 32, 64])  # without options every width fits
    with pytest.raises(ValueError, match="evonorm_s0: 32 groups do not divide 16 channels"):
        R.check_norm_options(R.NORMS["evonorm_s0"], {"groups": 32}, [64, 16])


# --------------------------------------------------------------------------------------------
# registry, models, torch.compile


def test_registry_entries():
    assert list(R.NORMS)[-5:] == LITERATURE
    options = {name: [o.name for o in R.NORMS[name].options] for name in LITERATURE}
    assert options == {
        "brn": ["eps", "momentum", "r_max", "d_max", "warmup_steps", "r_max_ramp_steps", "d_max_ramp_steps"],
        "gbn": ["virtual_batch_size", "eps", "momentum"],
        "frn": ["eps", "learned_eps"],
        "evonorm_b0": ["eps", "momentum"],
        "evonorm_s0": ["groups", "channels_per_group", "eps"],
    }
    papers = {"brn": "Ioffe 2017", "gbn": "Hoffer, Hubara & Soudry 2017", "frn": "Singh & Krishnan 2020",
              "evonorm_b0": "Liu, Brock, Simonyan & Le 2020", "evonorm_s0": "Liu, Brock, Simonyan & Le 2020"}  # fmt: skip
    for name, paper in papers.items():
        assert R.NORMS[name].citation.startswith(paper)
        assert paper in R.load_object(R.NORMS[name].factory).__doc__
    assert [R.NORMS[n].batch_dependent for n in LITERATURE] == [True, True, False, True, False]
    with pytest.raises(ValueError, match="brn: option r_max must be >= 1"):
        make_norm("brn", 8, r_max=0.5)
    with pytest.raises(ValueError, match="gbn: option virtual_batch_size must be >= 2"):
        make_norm("gbn", 8, virtual_batch_size=1)
    with pytest.raises(ValueError, match="frn: option learned_eps must be of type boolean"):
        make_norm("frn", 8, learned_eps=1)


def test_constructor_defaults_are_the_papers():
    brn = make_norm("brn", 16)
    assert (brn.r_max, brn.d_max, brn.warmup_steps, brn.r_max_ramp_steps, brn.d_max_ramp_steps) == (3.0, 5.0, 5000, 35000, 20000)
    assert make_norm("frn", 16).eps == 1e-6
    assert make_norm("evonorm_b0", 16).eps == make_norm("evonorm_s0", 16).eps == 1e-5  # tensorflow/tpu
    assert make_norm("evonorm_b0", 16).momentum == 0.1  # the reference's decay of 0.9
    assert make_norm("gbn", 16).virtual_batch_size == 32


@pytest.mark.parametrize("name", LITERATURE)
def test_make_norm_and_both_models(name):
    layer = make_norm(name, 16)
    x = torch.randn(4, 16, 5, 5, requires_grad=True)
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for model, shape in (("resnet", (3, 32, 32)), ("cnn", (1, 28, 28))):
        net = build_model(model, name, 1, shape[0], 10)
        out = net(torch.randn(4, *shape))
        assert out.shape == (4, 10)
        out.logsumexp(1).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        net.eval()
        assert torch.isfinite(net(torch.randn(2, *shape))).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiles_to_one_graph_of_plain_ops(variant, monkeypatch):
    """torch.compile traces every layer as one graph (fullgraph) of plain ops, none of the
    hand-written autograd functions; aot_eager runs the compiler's generated backward without codegen."""
    torch._dynamo.reset()  # the layers share code (float32_statistics, fused_norm): fresh recompile budget
    eager = _layer(variant)
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")

    def refuse(*args, **kwargs):
        raise AssertionError("a hand-written autograd function was traced")

    for mode in ("train", "train", "eval"):
        for m in (eager, compiled):
            m.train(mode == "train")
        x, dy = _input((6, 8, 5, 6), seed=len(mode)), torch.randn(6, 8, 5, 6)
        expected = _forward_backward(eager, x, dy)
        with monkeypatch.context() as patch:
            patch.setattr(fused._FusedNormFunction, "apply", refuse)
            for function in ("_EvoNormB0Function", "_EvoNormS0Function"):
                patch.setattr(getattr(literature, function), "apply", refuse)
            actual = _forward_backward(step, x, dy)
        for a, e in zip(actual[:2], expected[:2]):
            _assert_close(a, e)
        for key in expected[2]:
            _assert_close(actual[2]["_orig_mod." + key], expected[2][key])
    for key, buffer in eager.named_buffers():
        _assert_close(dict(compiled.named_buffers())[key].float(), buffer.float())


@pytest.mark.slow
@pytest.mark.parametrize("name", LITERATURE)
def test_compiled_model_matches_eager(name):
    """torch.compile (inductor) of the small CNN with each layer: a train step's loss, gradients and
    running statistics, and eval outputs, match eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model("cnn", name, 1, 1, 10)
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled)
    x, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for model in (eager, step):
        torch.nn.functional.cross_entropy(model(x), labels).backward()
    for (key, p), q in zip(eager.named_parameters(), compiled.parameters()):
        _assert_close(q.grad, p.grad, scale_tol=1e-4)
    for (key, b), c in zip(eager.named_buffers(), compiled.buffers()):
        _assert_close(c.float(), b.float())
    eager.eval()
    compiled.eval()
    _assert_close(step(x), eager(x), scale_tol=1e-4)
