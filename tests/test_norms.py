"""Tests for normres.norms: the hand-written norms against torch's layers and a composite reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normres import registry as R
from normres.norms import clamp_gates_, describe, fused, gate_parameters, make_norm, running_stat_layers
from normres.norms.classic import BatchInstanceNorm

NORMS = R.NORMS

HAND_WRITTEN = ["bn", "in", "ln", "gn", "bin"]
# Options that make every norm valid for the small channel counts used here.
SMALL_OPTIONS = {"gn": {"groups": 4}}


def _reference(name: str, channels: int, **options) -> nn.Module:
    """torch's own layer computing the same function as hand-written norm ``name``."""
    eps = options.get("eps", 1e-5)
    if name == "bn":
        return nn.BatchNorm2d(channels, eps=eps, momentum=options.get("momentum", 0.1))
    if name == "in":
        return nn.InstanceNorm2d(channels, eps=eps, affine=True)
    if name == "ln":
        return nn.GroupNorm(1, channels, eps=eps)
    if name == "gn":
        return nn.GroupNorm(options["groups"], channels, eps=eps)
    raise AssertionError(name)


def _randomise_affine(*modules: nn.Module, seed: int = 0) -> None:
    """Copy the same non-trivial weight and bias into every module."""
    gen = torch.Generator().manual_seed(seed)
    channels = modules[0].weight.shape[0]
    weight = torch.randn(channels, generator=gen) * 0.5 + 1.0
    bias = torch.randn(channels, generator=gen)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(weight)
            m.bias.copy_(bias)


def _input(shape, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Random input with per-channel offsets and scales, so every statistic matters."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    offset = torch.randn(1, c, 1, 1, generator=gen) * 2
    scale = torch.rand(1, c, 1, 1, generator=gen) * 2 + 0.5
    return (torch.randn(shape, generator=gen) * scale + offset).to(dtype)


def _forward_backward(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    x = x.clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.fixture(params=["fused", "composite"])
def form(request, monkeypatch) -> str:
    """Run a test on both forms of the hand-written norms: the eager fused autograd function, and the
    composite ops they switch to while torch.compile traces (here made to run eagerly)."""
    if request.param == "composite":
        monkeypatch.setattr(fused, "compiling", lambda: True)
    return request.param


def _assert_close(actual, expected, scale_tol: float = 1e-5):
    """float32 comparison with an absolute tolerance relative to the tensor's scale."""
    atol = scale_tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# against torch's layers


@pytest.mark.parametrize("name", ["bn", "in", "ln", "gn"])
@pytest.mark.parametrize("eps", [1e-5, 1e-1])
def test_matches_torch_forward_and_gradients(name, eps, form):
    options = {**SMALL_OPTIONS.get(name, {}), "eps": eps}
    ours, ref = make_norm(name, 8, **options), _reference(name, 8, **options)
    _randomise_affine(ours, ref)
    x = _input((6, 8, 5, 7))
    dy = torch.randn(6, 8, 5, 7, generator=torch.Generator().manual_seed(2))

    y, dx, grads = _forward_backward(ours, x, dy)
    y_ref, dx_ref, grads_ref = _forward_backward(ref, x, dy)

    _assert_close(y, y_ref)
    _assert_close(dx, dx_ref)
    _assert_close(grads["weight"], grads_ref["weight"])
    _assert_close(grads["bias"], grads_ref["bias"])


@pytest.mark.parametrize("name", ["bn", "in", "ln", "gn"])
def test_matches_torch_in_eval_mode(name, form):
    options = SMALL_OPTIONS.get(name, {})
    ours, ref = make_norm(name, 8, **options), _reference(name, 8, **options)
    _randomise_affine(ours, ref)
    for step in range(3):  # give the running statistics (where kept) something to hold
        x = _input((6, 8, 5, 7), seed=10 + step)
        ours(x)
        ref(x)
    ours.eval()
    ref.eval()
    x = _input((6, 8, 5, 7), seed=20)
    dy = torch.randn(6, 8, 5, 7, generator=torch.Generator().manual_seed(21))
    y, dx, grads = _forward_backward(ours, x, dy)
    y_ref, dx_ref, grads_ref = _forward_backward(ref, x, dy)
    _assert_close(y, y_ref)
    _assert_close(dx, dx_ref)
    _assert_close(grads["weight"], grads_ref["weight"])
    _assert_close(grads["bias"], grads_ref["bias"])


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_bn_running_stats_match_torch(momentum, form):
    ours, ref = make_norm("bn", 8, momentum=momentum), _reference("bn", 8, momentum=momentum)
    _randomise_affine(ours, ref)
    for step in range(4):
        x = _input((6, 8, 5, 7), seed=30 + step)
        ours(x).sum().backward()
        ref(x).sum().backward()
    _assert_close(ours.running_mean, ref.running_mean)
    _assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4


def test_bn_state_dict_is_interchangeable_with_torch():
    ref = _reference("bn", 8)
    _randomise_affine(ref)
    ref(_input((6, 8, 5, 7)))
    ours = make_norm("bn", 8)
    ours.load_state_dict(ref.state_dict())  # same names and shapes
    ours.eval()
    ref.eval()
    x = _input((3, 8, 4, 4), seed=5)
    _assert_close(ours(x), ref(x))


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_gradcheck_float64(name, form):
    norm = make_norm(name, 4, **({"groups": 2} if name == "gn" else {})).double()
    _randomise_affine(norm)
    if name == "bin":
        with torch.no_grad():
            norm.rho.copy_(torch.tensor([0.0, 0.3, 0.8, 1.0]))
    params = dict(norm.named_parameters())
    x = _input((3, 4, 3, 2), dtype=torch.float64).requires_grad_(True)

    def fn(x, *values):
        return torch.func.functional_call(norm, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()))


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_input_with_dominant_mean(name, form):
    """Slabs whose mean is 1000x their spread still normalise correctly (cancellation path)."""
    options = SMALL_OPTIONS.get(name, {})
    ours = make_norm(name, 8, **options)
    x = 1000.0 + _input((4, 8, 5, 5))
    ref = _reference("bn" if name == "bin" else name, 8, **options)
    _randomise_affine(ours, ref)
    _assert_close(ours(x), ref(x), scale_tol=1e-4)


def test_half_precision_input_keeps_dtype_and_uses_float32_statistics():
    ours, ref = make_norm("gn", 8, groups=4), _reference("gn", 8, groups=4)
    _randomise_affine(ours, ref)
    x = (_input((4, 8, 6, 6)) + 100.0).to(torch.bfloat16)  # offset: low-precision stats would fail
    x.requires_grad_(True)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x.detach().float()), atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_non_contiguous_input(name):
    norm = make_norm(name, 8, **SMALL_OPTIONS.get(name, {}))
    _randomise_affine(norm)
    x = _input((4, 8, 5, 6))
    dy = torch.randn(4, 8, 5, 6)
    y, dx, grads = _forward_backward(norm, x, dy)
    y_cl, dx_cl, grads_cl = _forward_backward(
        norm, x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    )
    _assert_close(y_cl, y)
    _assert_close(dx_cl, dx)
    for key in grads:
        _assert_close(grads_cl[key], grads[key])


def test_double_backward_is_refused():
    norm = make_norm("bn", 4)
    x = _input((3, 4, 3, 3)).requires_grad_(True)
    (dx,) = torch.autograd.grad(norm(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


# --------------------------------------------------------------------------------------------
# batch-instance norm


def _composite_bin(x, weight, bias, rho, eps, running=None):
    """rho * BN(x) + (1 - rho) * IN(x), then the affine; from plain tensor ops."""
    c = (1, -1, 1, 1)
    if running is None:
        mean_b = x.mean(dim=(0, 2, 3), keepdim=True)
        var_b = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean_b, var_b = running[0].view(c), running[1].view(c)
    mean_i = x.mean(dim=(2, 3), keepdim=True)
    var_i = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    x_bn = (x - mean_b) / torch.sqrt(var_b + eps)
    x_in = (x - mean_i) / torch.sqrt(var_i + eps)
    mixed = rho.view(c) * x_bn + (1 - rho.view(c)) * x_in
    return weight.view(c) * mixed + bias.view(c)


def _random_bin(channels=8):
    norm = make_norm("bin", channels)
    _randomise_affine(norm)
    with torch.no_grad():
        norm.rho.copy_(torch.rand(channels, generator=torch.Generator().manual_seed(3)))
    return norm


def test_bin_matches_composite_reference(form):
    norm = _random_bin()
    x = _input((6, 8, 5, 7)).requires_grad_(True)
    dy = torch.randn(6, 8, 5, 7, generator=torch.Generator().manual_seed(4))
    y = norm(x)
    y.backward(dy)
    ours = (y.detach(), x.grad.clone(), norm.weight.grad, norm.bias.grad, norm.rho.grad)

    params = [p.detach().clone().requires_grad_(True) for p in (norm.weight, norm.bias, norm.rho)]
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _composite_bin(x_ref, *params, eps=norm.eps)
    y_ref.backward(dy)
    expected = (y_ref.detach(), x_ref.grad, *(p.grad for p in params))
    for actual, want in zip(ours, expected):
        _assert_close(actual, want)


def test_bin_running_stats_and_eval_mode(form):
    norm, bn = _random_bin(), nn.BatchNorm2d(8)
    for step in range(3):
        x = _input((6, 8, 5, 7), seed=40 + step)
        norm(x)
        bn(x)
    _assert_close(norm.running_mean, bn.running_mean)
    _assert_close(norm.running_var, bn.running_var)

    norm.eval()
    x = _input((6, 8, 5, 7), seed=50).requires_grad_(True)
    dy = torch.randn(6, 8, 5, 7)
    y = norm(x)
    y.backward(dy)
    params = [p.detach().clone().requires_grad_(True) for p in (norm.weight, norm.bias, norm.rho)]
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _composite_bin(x_ref, *params, eps=norm.eps, running=(bn.running_mean, bn.running_var))
    y_ref.backward(dy)
    _assert_close(y, y_ref)
    _assert_close(x.grad, x_ref.grad)
    _assert_close(norm.rho.grad, params[2].grad)
    # eval mode does not touch the running statistics
    _assert_close(norm.running_mean, bn.running_mean)


def test_bin_starts_as_batch_norm():
    norm, bn = make_norm("bin", 8), make_norm("torch_bn", 8)
    assert torch.equal(norm.rho.detach(), torch.ones(8))
    x = _input((4, 8, 5, 5))
    _assert_close(norm(x), bn(x))


def test_clamp_gates_and_gate_parameters():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), make_norm("bin", 4), nn.Sequential(make_norm("bn", 4), make_norm("bin", 4))
    )
    gates = gate_parameters(model)
    assert [id(g) for g in gates] == [id(model[1].rho), id(model[2][1].rho)]
    assert gate_parameters(nn.Sequential(make_norm("bn", 4))) == []

    with torch.no_grad():
        model[1].rho.copy_(torch.tensor([-0.5, 0.25, 1.0, 1.75]))
        model[2][1].rho.copy_(torch.tensor([2.0, -3.0, 0.0, 0.5]))
    clamp_gates_(gates)
    assert torch.equal(model[1].rho.detach(), torch.tensor([0.0, 0.25, 1.0, 1.0]))
    assert torch.equal(model[2][1].rho.detach(), torch.tensor([1.0, 0.0, 0.0, 0.5]))
    assert model[1].rho.requires_grad  # still a trainable leaf


# --------------------------------------------------------------------------------------------
# under torch.compile


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_compiles_to_one_graph_of_composite_ops(name, monkeypatch):
    """torch.compile traces each norm as one graph (fullgraph: a break fails) of plain ops, not the
    fused function, and the compiled train and eval steps match eager ones, running statistics too.
    aot_eager runs AOTAutograd (the compiler's generated backward, buffer mutation) without codegen."""
    eager = make_norm(name, 8, **SMALL_OPTIONS.get(name, {}))
    _randomise_affine(eager)
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")

    def refuse(*args, **kwargs):
        raise AssertionError("the fused function was traced")

    for mode in ("train", "train", "eval"):
        for m in (eager, compiled):
            m.train(mode == "train")
        x = _input((6, 8, 5, 7), seed=len(mode))
        dy = torch.randn(6, 8, 5, 7)
        expected = _forward_backward(eager, x, dy)
        with monkeypatch.context() as patch:
            patch.setattr(fused._FusedNormFunction, "apply", refuse)
            actual = _forward_backward(step, x, dy)
        for a, e in zip(actual[:2], expected[:2]):
            _assert_close(a, e)
        grads = {key.removeprefix("_orig_mod."): grad for key, grad in actual[2].items()}
        assert grads.keys() == expected[2].keys()
        for key in grads:
            _assert_close(grads[key], expected[2][key])
    for key, buffer in eager.named_buffers():
        _assert_close(dict(compiled.named_buffers())[key].float(), buffer.float())


# --------------------------------------------------------------------------------------------
# registry, options and validation


def test_registry_names_and_options():
    assert list(NORMS)[:7] == ["torch_bn", "bn", "in", "bin", "ln", "gn", "nn"]
    assert [o.name for o in NORMS["gn"].options] == ["groups", "channels_per_group", "eps"]
    assert all(NORMS[n].option("eps") for n in NORMS)


@pytest.mark.parametrize("name", list(NORMS))
def test_every_norm_builds_and_runs(name):
    norm = R.load_object(NORMS[name].factory)(8, **SMALL_OPTIONS.get(name, {}))  # num_channels first, positionally
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    y = norm(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    norm.eval()
    assert norm(x).shape == x.shape


_OPTION_VALUES = {"eps": 1e-3, "momentum": 0.2, "groups": 2, "channels_per_group": 4}


@pytest.mark.parametrize("name", list(NORMS))
def test_every_norm_accepts_its_options_and_rejects_others(name):
    for option in NORMS[name].options:
        if option.name not in _OPTION_VALUES:
            continue
        norm = make_norm(name, 64, **{option.name: _OPTION_VALUES[option.name]})  # 64: gn's default 32 groups fit
        attribute = "groups" if option.name == "channels_per_group" else option.name
        expected = 16 if option.name == "channels_per_group" else _OPTION_VALUES[option.name]
        if name != "nn":
            assert getattr(norm, attribute) == expected
    with pytest.raises(ValueError, match=f"{name}: unknown option 'colour'"):
        make_norm(name, 8, colour=1)
    with pytest.raises(TypeError, match="colour"):
        R.load_object(NORMS[name].factory)(8, colour=1)


@pytest.mark.parametrize("name", list(NORMS))
def test_option_bounds_come_from_the_registry(name):
    if NORMS[name].option("eps"):
        with pytest.raises(ValueError, match=f"{name}: option eps must be > 0"):
            make_norm(name, 16, eps=0.0)
    if NORMS[name].option("momentum"):
        with pytest.raises(ValueError, match=f"{name}: option momentum must be <= 1"):
            make_norm(name, 16, momentum=1.5)
        make_norm(name, 16, momentum=None)  # cumulative average


def test_unknown_norm_lists_choices():
    expected = f"unknown norm 'bnn' (choose from: {', '.join(NORMS)})"
    for call in (lambda: make_norm("bnn", 8), lambda: describe("bnn"), lambda: R.get_norm("bnn")):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == expected


def test_gn_group_validation():
    assert make_norm("gn", 64).groups == 32  # paper default
    assert make_norm("gn", 64, channels_per_group=16).groups == 4
    assert make_norm("ln", 16).groups == 1
    with pytest.raises(ValueError, match="gn: 32 groups do not divide 16 channels"):
        make_norm("gn", 16)
    with pytest.raises(ValueError, match="gn: 3 groups do not divide 16 channels"):
        make_norm("gn", 16, groups=3)
    with pytest.raises(ValueError, match="gn: 6 channels per group do not divide 16 channels"):
        make_norm("gn", 16, channels_per_group=6)
    with pytest.raises(
        ValueError, match="either groups or channels_per_group.*groups=4.*channels_per_group=4"
    ):
        make_norm("gn", 16, groups=4, channels_per_group=4)
    with pytest.raises(ValueError, match="gn: option groups must be >= 1, got 0"):
        make_norm("gn", 16, groups=0)


def test_option_checks_cover_every_channel_count_without_building(monkeypatch):
    monkeypatch.setattr(R, "load_object", lambda *a: (_ for _ in ()).throw(AssertionError("built a layer")))
    R.check_norm_options(NORMS["gn"], {"groups": 8}, [16, 32, 64])
    R.check_norm_options(NORMS["gn"], {"channels_per_group": 16}, [16, 32, 64])
    R.check_norm_options(NORMS["bn"], {"eps": 1e-3, "momentum": 0.2}, [16, 32, 64])
    with pytest.raises(ValueError, match="gn: 32 groups do not divide 16 channels"):
        R.check_norm_options(NORMS["gn"], {}, [64, 16, 32])
    with pytest.raises(ValueError, match="gn: 12 groups do not divide 32 channels"):
        R.check_norm_options(NORMS["gn"], {"groups": 12}, [12, 24, 48, 32])
    with pytest.raises(ValueError, match="unknown option 'groups'"):
        R.check_norm_options(NORMS["bn"], {"groups": 4}, [16])
    with pytest.raises(ValueError, match="must be of type integer"):
        R.check_norm_options(NORMS["gn"], {"groups": 2.5}, [16])


def test_running_stat_layers_are_found_by_protocol():
    model = nn.Sequential(make_norm("bn", 4), make_norm("torch_bn", 4), make_norm("bin", 4), make_norm("gn", 4, groups=2))
    assert [type(m).__name__ for m in running_stat_layers(model)] == ["BatchNorm", "TorchBatchNorm", "BatchInstanceNorm"]
    for layer in running_stat_layers(model):
        layer(_input((4, 4, 3, 3)))
        layer.reset_running_stats()
        assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.ones(4))


@pytest.mark.parametrize("name", list(NORMS))
def test_statistics_stay_float32_under_autocast(name):
    """Under bfloat16 autocast a norm sees bf16 inputs (a conv's output) but must compute its
    statistics in float32: its output then matches the float32 computation on the same values up to
    the output's own bf16 rounding (autocast would otherwise run gn/ln's group pooling, a matmul, in
    bf16: 1% errors at mean/std 4)."""
    layer = make_norm(name, 16, **({"groups": 4} if name in ("gn", "evonorm_s0") else {}))
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 16, 6, 6, generator=gen) + 4.0).bfloat16()  # mean/std = 4
    reference = layer(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype in (torch.bfloat16, torch.float32)
    error = (y.float() - reference).abs().mean() / reference.abs().mean().clamp(min=1e-6)
    assert error < 3e-3, f"{name}: relative error {float(error):.4f} under autocast"


def test_describe_names_the_axes():
    for name in NORMS:
        text = describe(name)
        assert NORMS[name].normalizes_over
        assert text.endswith(".") and len(text) > 20
    assert "(N, H, W)" in describe("bn") and "(H, W)" in describe("in")
    assert "(C, H, W)" in describe("ln") and "(C/G, H, W)" in describe("gn")
    assert "rho" in describe("bin")


def test_custom_norms_cite_their_paper():
    papers = {
        "bn": "Ioffe & Szegedy 2015",
        "in": "Ulyanov et al. 2016",
        "ln": "Ba et al. 2016",
        "gn": "Wu & He 2018",
        "bin": "Nam & Kim 2018",
    }
    for name, paper in papers.items():
        assert paper in R.load_object(NORMS[name].factory).__doc__
    for name, norm in NORMS.items():
        assert norm.citation and (norm.citation.startswith("(") or any(c.isdigit() for c in norm.citation))


# --------------------------------------------------------------------------------------------
# the hand-written norms use no normalization kernel


_NORM_KERNELS = [
    (F, "batch_norm"),
    (F, "instance_norm"),
    (F, "group_norm"),
    (F, "layer_norm"),
    (torch, "batch_norm"),
    (torch, "instance_norm"),
    (torch, "group_norm"),
    (torch, "layer_norm"),
    (torch, "native_batch_norm"),
    (torch, "native_group_norm"),
    (torch, "native_layer_norm"),
]


@pytest.fixture
def no_norm_kernels(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a torch normalization kernel was called")

    for module, attr in _NORM_KERNELS:
        monkeypatch.setattr(module, attr, forbidden)


def test_patching_catches_torch_layers(no_norm_kernels):
    # The fixture works: torch's own layers now fail.
    with pytest.raises(AssertionError, match="normalization kernel"):
        nn.BatchNorm2d(4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(AssertionError, match="normalization kernel"):
        nn.GroupNorm(2, 4)(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("name", [n for n in NORMS if n not in ("torch_bn", "nn")])
def test_hand_written_norms_use_no_norm_kernels(name, no_norm_kernels, form):
    norm = make_norm(name, 8, **({"groups": 4} if name in ("gn", "evonorm_s0") else {}))
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    norm(x).square().sum().backward()
    norm.eval()
    norm(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
