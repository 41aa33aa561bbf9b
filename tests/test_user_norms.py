"""A researcher's own layer named in the config (issue #12): imported and probed before any job, every
way of breaking the contract one clear error naming the config key, its source hash in the settings,
model files that never import code, and the float32 statistics under autocast."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch

from normres.config import RunSpec, load_config, validate_config
from normres.errors import ConfigError

from conftest import REPO, TINY_STUDY

GOOD = '''
import torch
from torch import nn


class Scale(nn.Module):
    """Divides by the RMS over the channels of each pixel (a test layer)."""

    def __init__(self, num_channels, eps=1e-6, gain=1.0):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.full((num_channels,), float(gain)))

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + self.eps) * self.weight[:, None, None]


class Running(nn.BatchNorm2d):
    """nn.BatchNorm2d under another name: keeps running statistics."""

    def __init__(self, num_channels, momentum=0.1):
        super().__init__(num_channels, momentum=momentum)
'''


def config_with(tmp_path: Path, layer: str = GOOD, cls: str = "Scale", options=None, study_options=None) -> dict:
    (tmp_path / "mine.py").write_text(textwrap.dedent(layer))
    study = copy.deepcopy(TINY_STUDY)
    study["grid"] = [{"norm": ["bn", "mine"], "depth": [1], "batch_size": [32]}]
    if study_options is not None:
        study["norm_options"] = {"mine": study_options}
    return {"norms": {"mine": {"class": f"mine.py:{cls}", "options": options or {}}}, "studies": {"s": study}}


def test_a_good_layer_is_registered_with_its_hash(tmp_path):
    config = validate_config(config_with(tmp_path, options={"eps": 1e-5}), tmp_path)
    norm = config.norms["mine"]
    assert norm.user.endswith("mine.py:Scale") and len(norm.sha256) == 64 and not norm.running_stats
    assert not norm.batch_dependent and norm.title == "Scale (your layer)"  # found by probing
    assert norm.description.startswith("Divides by the RMS")
    settings = config.run_settings(RunSpec("s", "mine", 1, 32, 0))
    assert settings.norm_class == norm.user and settings.norm_sha256 == norm.sha256
    assert settings.norm_options == {"eps": 1e-5}
    assert config.run_settings(RunSpec("s", "bn", 1, 32, 0)).norm_class is None


def test_editing_the_file_changes_exactly_its_runs_settings(tmp_path):
    before = validate_config(config_with(tmp_path), tmp_path)
    after = validate_config(config_with(tmp_path, GOOD + "\n# an edit\n"), tmp_path)
    mine, bn = RunSpec("s", "mine", 1, 32, 0), RunSpec("s", "bn", 1, 32, 0)
    assert before.run_settings(mine).to_dict() != after.run_settings(mine).to_dict()
    assert before.run_settings(bn).to_dict() == after.run_settings(bn).to_dict()


def test_running_statistics_are_found_by_probing(tmp_path):
    config = validate_config(config_with(tmp_path, cls="Running"), tmp_path)
    assert config.norms["mine"].running_stats and config.norms["mine"].batch_dependent
    assert config.has_bn_statistics(RunSpec("s", "mine", 1, 32, 0))


BROKEN = {
    "missing file": ("nope.py:Scale", None, None, "config error at norms.mine.class: 'nope.py:Scale': file .*nope.py does not exist"),
    "missing class": ("mine.py:Nope", GOOD, None, "config error at norms.mine.class: '.*mine.py' has no class 'Nope' \\(it defines: Running, Scale\\)"),
    "not a module": ("mine.py:torch", GOOD, None, "is not an nn.Module class"),
    "syntax error": ("mine.py:Scale", "class Scale(:\n", None, "config error at norms.mine.class: importing '.*mine.py' failed: SyntaxError"),
    "import error": ("mine.py:Scale", "import not_a_package\n", None, "importing '.*mine.py' failed: ModuleNotFoundError: No module named 'not_a_package'"),
    "bad reference": ("mine.py", GOOD, None, "is not of the form 'path/to/file.py:Class'"),
    "unknown option": ("mine.py:Scale", GOOD, {"colour": 1}, "config error at norms.mine: Scale\\(num_channels, colour=1\\) does not match Scale\\(num_channels, eps=1e-06, gain=1.0\\)"),
    "wrong signature": ("mine.py:Scale", GOOD.replace("def __init__(self, num_channels, eps=1e-6, gain=1.0)", "def __init__(self)"), None,
                        "does not match Scale\\(\\)"),
    "changes the shape": ("mine.py:Scale", GOOD.replace("return x * torch.rsqrt(x.square().mean(1, keepdim=True) + self.eps) * self.weight[:, None, None]",
                                                         "return x.mean(3, keepdim=True)"), None,
                          "config error at norms.mine: Scale\\(16\\) in train mode, NCHW input: output shape \\(4, 16, 6, 1\\) differs from the input's \\(4, 16, 6, 5\\)"),
    "non-finite": ("mine.py:Scale", GOOD.replace("+ self.eps", "* 0"), None, "in train mode, NCHW input: the output has non-finite values"),
    "loses the layout": ("mine.py:Scale", GOOD.replace("return x * torch", "return (x * 1).contiguous() * torch"), None,
                         "in train mode, channels_last input: the output is not in the input's memory format"),
    "fails in eval mode": ("mine.py:Scale", GOOD.replace("def forward(self, x):", "def forward(self, x):\n        assert self.training, 'no eval mode'"), None,
                           "in eval mode, NCHW input: forward failed: AssertionError: no eval mode"),
    "raises in the constructor": ("mine.py:Scale", GOOD.replace("super().__init__()", "super().__init__(); raise RuntimeError('broken')"), None,
                                  "Scale\\(num_channels\\) with num_channels=16 failed: RuntimeError: broken"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_every_bad_layer_fails_before_any_job_naming_the_key(tmp_path, case):
    ref, source, options, message = BROKEN[case]
    raw = config_with(tmp_path, source or GOOD, options=options)
    raw["norms"]["mine"]["class"] = ref
    with pytest.raises(ConfigError, match=message):
        validate_config(raw, tmp_path)


def test_a_study_option_the_layer_rejects_names_the_study_key(tmp_path):
    with pytest.raises(ConfigError, match="config error at studies.s.norm_options.mine: Scale\\(num_channels, colour=2\\)"):
        validate_config(config_with(tmp_path, study_options={"colour": 2}), tmp_path)


def test_a_user_name_may_not_shadow_a_built_in_layer(tmp_path):
    raw = config_with(tmp_path)
    raw["norms"] = {"gn": raw["norms"]["mine"]}
    raw["studies"]["s"]["grid"][0]["norm"] = ["gn"]
    raw["studies"]["s"]["norm_options"] = {"gn": {"groups": 4}}
    with pytest.raises(ConfigError, match="config error at norms.gn.class: 'gn' is a built-in norm"):
        validate_config(raw, tmp_path)


def test_the_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    raw = config_with(tmp_path)
    raw["norms"]["mine"]["class"] = "../mine.py:Scale"
    path = tmp_path / "cfg" / "study.yaml"
    path.write_text(__import__("yaml").safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert load_config(path).norms["mine"].user == "mine.py:Scale"


def test_statistics_of_a_user_layer_stay_float32_under_autocast(tmp_path):
    from normres.norms import make_norm

    norm = validate_config(config_with(tmp_path), tmp_path).norms["mine"]
    layer = make_norm(norm, 16)
    x = (torch.randn(4, 16, 5, 5) + 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = layer(x.float())
    assert ((y.float() - reference).abs().mean() / reference.abs().mean()) < 3e-3


def test_model_files_of_a_user_layer_need_the_users_own_entry(tmp_path, prepared):
    from normres.errors import ModelFileError
    from normres.models import load_model
    from normres.train import train_run

    config = validate_config(config_with(tmp_path), tmp_path)
    settings = config.run_settings(RunSpec("s", "mine", 1, 32, 0)).with_changes(epochs=1)
    train_run(settings, prepared, tmp_path / "run")
    model_file = tmp_path / "run" / "model.pt"
    with pytest.raises(ModelFileError, match="never imports code named in a model file: name the layer yourself"):
        load_model(model_file)
    model, _ = load_model(model_file, user_norms=config.user_norms)
    assert sum(type(m).__name__ == "Scale" for m in model.modules()) == 4  # the cnn's four norm layers
    edited = validate_config(config_with(tmp_path, GOOD + "\n# changed\n"), tmp_path)
    with pytest.raises(ModelFileError, match="not the same layer"):
        load_model(model_file, user_norms=edited.user_norms)


def test_the_shipped_example_layer_probes_clean():
    config = load_config(REPO / ".test/config.yaml")
    assert config.norms["rms"].user.endswith("examples/norms.py:RMSNorm2d")
