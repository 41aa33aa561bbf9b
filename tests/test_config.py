import copy

import pytest
import yaml

from normres.config import ConfigError, RunSpec, load_config, validate_config

from conftest import REPO, TINY_STUDY


def cfg(**overrides):
    study = copy.deepcopy(TINY_STUDY)
    study.update(overrides)
    return {"studies": {"s": study}}


def test_shipped_configs_are_valid():
    for path in ["config.yaml", "config/demo.yaml", ".test/config.yaml"]:
        config = load_config(REPO / path)
        assert config.runs()


def test_default_study_is_the_earlier_work_exactly():
    """Plain SGD (lr 0.1, no momentum, no weight decay), lr / 10 after epochs 75 and 95 of 100, inputs
    mean-subtracted (std 1), group norm with 4 channels per group, batch 128, crop + flip."""
    c = load_config(REPO / "config.yaml")
    cifar = c.study("cifar")
    assert cifar["protocol"] == "earlier"
    assert cifar["epochs"] == 100 and cifar["schedule"]["milestones"] == [75, 95]
    assert cifar["optimizer"] | {} == {**cifar["optimizer"], "lr": 0.1, "momentum": 0, "weight_decay": 0}
    assert cifar["input_norm"] == "mean" and cifar["val_size"] == 10000
    assert cifar["norm_options"]["gn"] == {"channels_per_group": 4}
    assert cifar["augment"]["crop_pad"] == 4 and cifar["augment"]["flip"]
    runs = {(r.norm, r.batch_size) for r in c.runs("cifar")}
    assert {(n, 128) for n in ["torch_bn", "bn", "in", "bin", "ln", "gn", "nn"]} <= runs
    assert {("bn", 8), ("gn", 8)} <= runs
    settings = c.run_settings(RunSpec("cifar", "gn", 2, 128, 0))
    assert settings.optimizer.momentum == 0 and settings.optimizer.weight_decay == 0
    he = c.study("he2016")
    assert he["protocol"] == "he2016" and he["optimizer"]["momentum"] == 0.9 and he["optimizer"]["weight_decay"] == 0.0001
    mnist = c.study("mnist")
    assert mnist["epochs"] == 20 and mnist["l1"] == {"bn": 0.0001}


def test_a_study_naming_a_protocol_must_follow_it():
    c = load_config(REPO / "config.yaml")
    raw = copy.deepcopy(c.raw)
    raw["studies"]["cifar"]["optimizer"]["momentum"] = 0.9
    with pytest.raises(ConfigError, match="studies.cifar.optimizer.momentum: protocol 'earlier' .* uses 0 \\(got 0.9\\)"):
        validate_config(raw)
    raw["studies"]["cifar"]["protocol"] = None  # without the claim, any settings
    validate_config(raw)


def test_defaults_are_filled():
    c = validate_config(cfg())
    s = c.study("s")
    assert s["schedule"]["gamma"] == 0.1 and s["optimizer"]["momentum"] == 0.9
    assert c.data == {"mirrors": [], "download": True}
    assert s["bn_statistics"]["enabled"] and not s["robustness"]["enabled"]


def test_settings_are_read_as_fields_with_the_schema_defaults():
    """The consumers read a frozen dataclass; a default comes from the schema (gate_lr_mult is 10 there)."""
    from dataclasses import FrozenInstanceError

    settings = validate_config(cfg()).run_settings(RunSpec("s", "bn", 1, 32, 0))
    assert settings.optimizer.gate_lr_mult == 10 and settings.optimizer.name == "sgd"
    with pytest.raises(FrozenInstanceError):
        settings.epochs = 3
    assert type(settings).from_dict(settings.to_dict()) == settings


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
    runs = c.runs()
    assert len(runs) == 8 and len(set(runs)) == 8


def test_run_settings_touch_only_their_norm():
    base = validate_config(cfg(grid=[{"norm": ["bn", "gn"], "depth": [1], "batch_size": [8]}], norm_options={"gn": {"groups": 4}}))
    changed = validate_config(cfg(grid=[{"norm": ["bn", "gn"], "depth": [1], "batch_size": [8]}], norm_options={"gn": {"groups": 8}}))
    bn, gn = RunSpec("s", "bn", 1, 8, 0), RunSpec("s", "gn", 1, 8, 0)
    assert base.run_settings(bn) == changed.run_settings(bn)
    assert base.run_settings(gn) != changed.run_settings(gn)


def test_linear_lr_scaling():
    c = validate_config(cfg(optimizer={"lr": 0.1, "reference_batch_size": 128}))
    assert c.run_settings(RunSpec("s", "bn", 1, 32, 0)).optimizer.lr == pytest.approx(0.025)


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("studies: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)


def test_schema_names_come_from_the_registry():
    from normres import registry as R
    from normres.config import load_schema

    schema = load_schema()
    assert schema["$defs"]["norm_name"]["enum"] == list(R.NORMS)
    assert schema["$defs"]["dataset_name"]["enum"] == list(R.DATASETS)
    assert set(schema["$defs"]["norm_options"]["properties"]) == set(R.NORMS)
    assert load_schema(("mine",))["$defs"]["norm_name"]["enum"] == [*R.NORMS, "mine"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"val_size": 60000}, "studies.s.val_size: 60000 validation images leave none of the 60000 training images"),
        ({"train_subset": 59990}, "studies.s.train_subset: 59990 exceeds the 59960 training images"),
        ({"test_subset": 10001}, "studies.s.test_subset: 10001 exceeds the 10000 test images"),
        ({"train_subset": 16, "grid": [{"norm": ["bn"], "depth": [1], "batch_size": [32]}]}, "batch size 32 exceeds the 16 training images"),
        ({"test_subset": 100, "robustness": {"enabled": True, "images": 200}}, "robustness.images: 200 exceeds the study's 100 test images"),
        ({"reference_norm": "gn"}, "studies.s.reference_norm: 'gn' is not one of the study's norms (choose from: bn)"),
        ({"l1": {"bnn": 0.1}}, "studies.s.l1: 'bnn' is not one of"),
        ({"protocol": "nope"}, "studies.s.protocol: 'nope' is not one of"),
    ],
)
def test_settings_that_depend_on_the_dataset_are_checked_before_any_job(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg(**overrides))
    assert needle in str(err.value)


def test_run_settings_do_not_depend_on_key_order():
    study = copy.deepcopy(TINY_STUDY)
    study["optimizer"] = {"weight_decay": 0.0, "lr": 0.05}
    shuffled = dict(reversed(list(study.items())))
    shuffled["optimizer"] = {"lr": 0.05, "weight_decay": 0.0}
    spec = RunSpec("s", "bn", 1, 32, 0)
    a = validate_config({"studies": {"s": study}}).run_settings(spec).to_dict()
    b = validate_config({"studies": {"s": shuffled}}).run_settings(spec).to_dict()
    assert repr(a) == repr(b)
