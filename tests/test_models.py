import copy

import pytest
import torch

from normres import registry as R
from normres.models import build_model, count_parameters, feature_quantiles, set_memory_format

NORMS = R.NORMS


@pytest.mark.parametrize("n", [1, 2, 3])
def test_resnet_has_6n_plus_2_weighted_layers(n):
    model = build_model("resnet", "torch_bn", n, 3, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 6 * n + 2
    # two projection shortcuts (16->32, 32->64), each a 1x1 conv followed by a norm
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()) == 2


def test_resnet_widths_and_norm_after_every_conv():
    model = build_model("resnet", "gn", 1, 3, 10, {"groups": 8})
    from normres.norms.classic import GroupNorm

    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(norms) == len(convs)
    assert sorted({m.out_channels for m in convs}) == R.MODELS["resnet"].norm_channels(1) == [16, 32, 64]


def _small(norm):
    return {"groups": 4} if norm in ("gn", "evonorm_s0") else {}


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("model,shape", [("resnet", (3, 32, 32)), ("cnn", (1, 28, 28))])
def test_every_norm_in_every_model(norm, model, shape):
    opts = _small(norm)
    net = build_model(model, norm, 1, shape[0], 10, opts)
    x = torch.randn(4, *shape)
    out = net(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert net.features(x).shape[0] == 4


def test_cnn_is_small():
    assert count_parameters(build_model("cnn", "bn", 1, 1, 10)) < 20_000


def test_errors_list_choices():
    with pytest.raises(ValueError, match="unknown model 'vgg' \\(choose from: resnet, cnn\\)"):
        build_model("vgg", "bn", 1, 3, 10)
    with pytest.raises(ValueError, match="depth n must be >= 1"):
        build_model("resnet", "bn", 0, 3, 10)


def test_feature_quantiles_match_numpy():
    f = torch.randn(100, 64)
    import numpy as np

    expected = np.quantile(f.numpy().ravel(), [0.01, 0.2, 0.8, 0.99])
    assert np.allclose(feature_quantiles(f), expected, atol=1e-5)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("model,shape", [("resnet", (3, 32, 32)), ("cnn", (1, 28, 28))])
def test_models_compute_in_channels_last(norm, model, shape):
    """Weights are NHWC and every norm layer gets NHWC input (the fast layout on these CPUs), from
    plain NCHW images; outputs equal those of the same weights run in NCHW throughout."""
    opts = _small(norm)
    net = build_model(model, norm, 1, shape[0], 10, opts)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    layouts = []
    for conv in convs:
        conv.register_forward_hook(
            lambda m, args, out: layouts.append(not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last))
        )
    x = torch.randn(4, *shape)
    out = net(x)
    assert layouts and all(layouts), "a conv output (the next norm's input) is not channels_last"

    nchw = set_memory_format(copy.deepcopy(net), torch.contiguous_format)
    layouts.clear()
    expected = nchw(x)
    assert not any(layouts)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_model_files_round_trip_and_bad_files_are_named(tmp_path):
    from normres.errors import ModelFileError, UnsafeFileError
    from normres.models import load_model, save_model

    model = build_model("cnn", "gn", 1, 1, 10, {"groups": 4})
    path = save_model(model, "mnist", list("0123456789"), (0.1307,), (1.0,), tmp_path / "model.pt")
    loaded, blob = load_model(path, expect={"norm": "gn"})
    assert blob["input"] == {"mean": [0.1307], "std": [1.0]}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes about the run\n")
    with pytest.raises(UnsafeFileError, match="notes.pt is not a torch file"):
        load_model(notes)
    torch.save({"format": "normres-model/2", "model": {"norm": "gn"}}, tmp_path / "half.pt")
    with pytest.raises(ModelFileError, match="field 'dataset' is missing"):
        load_model(tmp_path / "half.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="not a normres model file"):
        load_model(tmp_path / "list.pt")


def test_global_pooling_is_deterministic_on_cuda_by_construction():
    """No AdaptiveAvgPool2d (its CUDA backward has no deterministic implementation)."""
    for model in ("resnet", "cnn"):
        net = build_model(model, "bn", 1, 3 if model == "resnet" else 1, 10)
        assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in net.modules())
