import copy

import pytest
import yaml

from normres.config import ConfigError, expand_runs, load_config, run_settings, validate_config, RunSpec

from conftest import REPO, TINY_STUDY


def cfg(**overrides):
    study = copy.deepcopy(TINY_STUDY)
    study.update(overrides)
    return {"studies": {"s": study}}


def test_shipped_configs_are_valid():
    for path in ["config.yaml", "config/demo.yaml", ".test/config.yaml"]:
        config = load_config(REPO / path)
        assert expand_runs(config)


def test_default_study_matches_the_protocol():
    c = load_config(REPO / "config.yaml")
    cifar = c["studies"]["cifar"]
    assert cifar["epochs"] == 100 and cifar["schedule"]["milestones"] == [75, 95]
    assert cifar["optimizer"]["lr"] == 0.1 and cifar["val_size"] == 10000
    runs = {(r.norm, r.batch_size) for r in expand_runs(c) if r.study == "cifar"}
    assert {(n, 128) for n in ["torch_bn", "bn", "in", "bin", "ln", "gn", "nn"]} <= runs
    assert {("bn", 8), ("gn", 8)} <= runs
    mnist = c["studies"]["mnist"]
    assert mnist["epochs"] == 20 and mnist["l1"] == {"bn": 0.0001}


def test_defaults_are_filled():
    c = validate_config(cfg())
    s = c["studies"]["s"]
    assert s["schedule"]["gamma"] == 0.1 and s["optimizer"]["momentum"] == 0.9
    assert c["data"] == {"mirrors": [], "download": True}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"dataset": "cifar"}, "studies.s.dataset: 'cifar' is not one of"),
        ({"grid": [{"norm": ["bnn"], "depth": [1], "batch_size": [8]}]}, "studies.s.grid[0].norm[0]: 'bnn' is not one of"),
        ({"model": "resnet", "grid": [{"norm": ["bn"], "depth": [0], "batch_size": [8]}]}, "depth[0]: 0 is less than the minimum of 1"),
        ({"epochs": 0}, "studies.s.epochs: 0 is less than the minimum of 1"),
        ({"grid": [{"norm": ["bn"], "depth": [1], "batch_size": [-4]}]}, "batch_size[0]: -4 is less than the minimum"),
        ({"optimizer": {"lr": 0}}, "studies.s.optimizer.lr: 0 is less than or equal to the minimum of 0"),
        ({"schedule": {"milestones": [5]}}, "milestone 5 is outside the epoch range 1..2"),
        ({"seeds": []}, "studies.s.seeds: [] should be non-empty"),
        ({"seeds": [1, 1]}, "studies.s.seeds: [1, 1] has non-unique elements"),
        ({"epoch": 3}, "Additional properties are not allowed ('epoch' was unexpected)"),
        ({"norm_options": {"gn": {"groups": 3}}, "grid": [{"norm": ["gn"], "depth": [1], "batch_size": [8]}]},
         "studies.s.norm_options.gn"),
        ({"grid": [{"norm": ["gn"], "depth": [2], "batch_size": [8]}]}, "depth must be [1]"),
    ],
)
def test_bad_values_are_named(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg(**overrides))
    assert needle in str(err.value)


def test_group_count_must_divide_every_layer():
    bad = cfg(model="resnet", grid=[{"norm": ["gn"], "depth": [1], "batch_size": [8]}], norm_options={"gn": {"groups": 32}})
    with pytest.raises(ConfigError, match="32.*16"):
        validate_config(bad)


def test_runs_are_the_union_of_grids_once_each():
    c = validate_config(cfg(grid=[{"norm": ["bn", "gn"], "depth": [1], "batch_size": [8, 16]},
                                  {"norm": ["bn"], "depth": [1], "batch_size": [8]}], seeds=[0, 1],
                           norm_options={"gn": {"groups": 4}}))
    runs = expand_runs(c)
    assert len(runs) == 8 and len(set(runs)) == 8


def test_run_settings_touch_only_their_norm():
    base = validate_config(cfg(grid=[{"norm": ["bn", "gn"], "depth": [1], "batch_size": [8]}], norm_options={"gn": {"groups": 4}}))
    changed = validate_config(cfg(grid=[{"norm": ["bn", "gn"], "depth": [1], "batch_size": [8]}], norm_options={"gn": {"groups": 8}}))
    bn, gn = RunSpec("s", "bn", 1, 8, 0), RunSpec("s", "gn", 1, 8, 0)
    assert run_settings(base, bn) == run_settings(changed, bn)
    assert run_settings(base, gn) != run_settings(changed, gn)


def test_linear_lr_scaling():
    c = validate_config(cfg(optimizer={"lr": 0.1, "reference_batch_size": 128}))
    assert run_settings(c, RunSpec("s", "bn", 1, 32, 0))["optimizer"]["lr"] == pytest.approx(0.025)


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("studies: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)


def test_one_list_of_norms_everywhere():
    from normres.config import load_schema
    from normres.norms import NORMS
    from normres.specs import NORM_NAMES, NORM_OPTIONS

    enum = load_schema()["$defs"]["study"]["properties"]["grid"]["items"]["properties"]["norm"]["items"]["enum"]
    assert set(NORMS) == set(NORM_NAMES) == set(NORM_OPTIONS) == set(enum)


def test_run_settings_do_not_depend_on_key_order():
    study = copy.deepcopy(TINY_STUDY)
    study["optimizer"] = {"weight_decay": 0.0, "lr": 0.05}
    shuffled = dict(reversed(list(study.items())))
    shuffled["optimizer"] = {"lr": 0.05, "weight_decay": 0.0}
    spec = RunSpec("s", "bn", 1, 32, 0)
    a = run_settings(validate_config({"studies": {"s": study}}), spec)
    b = run_settings(validate_config({"studies": {"s": shuffled}}), spec)
    assert repr(a) == repr(b)
