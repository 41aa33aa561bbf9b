"""One registry, one place per name (issue #12): the names of norms, models and datasets are written
in normres/registry.py only, and a layer added there flows through validation, the workflow's dry run,
training, figures and report without any other change."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from normres import registry as R

from conftest import FASHION, REPO

# Where the names may be written besides the registry: data, configs, docs, examples and tests.
ALLOWED = {"src/normres/registry.py", "src/normres/published.yaml"}


def _code_files() -> list[Path]:
    files = [*(REPO / "src").rglob("*.py"), *(REPO / "workflow").rglob("*.smk"), *(REPO / "workflow").rglob("*.py"),
             REPO / "Snakefile", *(REPO / "src/normres/schema").glob("*.yaml"), *(REPO / "src/normres/templates").glob("*")]  # fmt: skip
    return [f for f in files if f.relative_to(REPO).as_posix() not in ALLOWED]


def _strip_docstrings(text: str) -> str:
    return re.sub(r'"""(?:.|\n)*?"""', "", text)


def test_no_stray_copies_of_a_name():
    """A quoted norm, model or dataset name in code outside the registry is a second copy of it."""
    names = sorted({*R.NORMS, *R.MODELS, *R.DATASETS}, key=len, reverse=True)
    quoted = re.compile(r"""(?<![\w.])(["'])(%s)\1""" % "|".join(map(re.escape, names)))
    strays = []
    for path in _code_files():
        for n, line in enumerate(_strip_docstrings(path.read_text()).splitlines(), 1):
            code = line.split("#", 1)[0]
            strays += [f"{path.relative_to(REPO)}:{n}: {m.group(0)}" for m in quoted.finditer(code)]
    assert not strays, "names written outside normres.registry:\n" + "\n".join(strays)


def test_the_grep_would_find_a_stray_copy(tmp_path):
    names = "|".join(map(re.escape, R.NORMS))
    assert re.search(r"""(?<![\w.])(["'])(%s)\1""" % names, 'if norm == "gn":')


def test_names_in_the_schema_cli_and_wildcards_come_from_the_registry():
    from normres.cli import build_parser

    schema_text = (REPO / "src/normres/schema/config.schema.yaml").read_text()
    assert not any(f"[{n}," in schema_text or f" {n}]" in schema_text for n in R.NORMS)
    commands = build_parser()._subparsers._group_actions[0].choices
    prepare = next(a for a in commands["prepare"]._actions if a.dest == "dataset")
    assert list(prepare.choices) == list(R.DATASETS)
    train = next(a for a in commands["train"]._actions if a.dest == "norm")
    assert ", ".join(R.NORMS) in train.help
    common = (REPO / "workflow/rules/common.smk").read_text()
    assert 'norm="|".join(map(re.escape, CONFIG.norms))' in common


THROWAWAY = '''
    NormDef(
        name="throwaway",
        factory="normres.norms.classic:InstanceNorm",
        title="Throw-away layer",
        normalizes_over="(H, W) per sample and channel",
        description="A layer added in one place by a test.",
        citation="(test)",
        batch_dependent=False,
        options=(EPS,),
    ),
)

NORMS: dict[str, NormDef]'''


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_a_layer_added_in_one_place_runs_through_the_whole_workflow(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    registry = src / "normres" / "registry.py"
    text = registry.read_text()
    registry.write_text(text.replace("\n)\n\nNORMS: dict[str, NormDef]", THROWAWAY, 1))
    wd = tmp_path / "wf"
    wd.mkdir()
    for name in ("Snakefile",):
        shutil.copy(REPO / name, wd / name)
    for name in ("workflow", "profiles"):
        shutil.copytree(REPO / name, wd / name)
    study = {"dataset": "fashion_mnist", "model": "cnn", "grid": [{"norm": ["bn", "throwaway"], "depth": [1], "batch_size": [64]}],
             "seeds": [0], "epochs": 1, "val_size": 256, "train_subset": 512, "test_subset": 500,
             "optimizer": {"name": "adam", "lr": 0.003, "weight_decay": 0.0}}  # fmt: skip
    (wd / "config.yaml").write_text(yaml.safe_dump({"data": {"download": False}, "studies": {"one": study}}))
    env = {"PYTHONPATH": str(src), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    norms = subprocess.run([sys.executable, "-m", "normres.cli", "norms"], env=env, capture_output=True, text=True)
    assert "throwaway: Throw-away layer" in norms.stdout, norms.stderr
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config.yaml"], cwd=wd, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = (wd / "results/runs.csv").read_text()
    assert ",throwaway," in runs
    report = (wd / "results/report.html").read_text()
    assert "Throw-away layer" in report and "A layer added in one place by a test." in report
    assert (wd / "results/figures/misclassified/one/throwaway_n1_b64.png").exists()


def test_figures_apply_only_where_they_have_something_to_show():
    from normres.config import load_config

    config = load_config(REPO / ".test/config.yaml")
    names = {name for _, _, name in R.figures_for(config.studies, config.norms)}
    assert {"resnet_batch_size.png", "cnn_robustness_severity.png", "cnn_bn_statistics.png", "final_accuracy.png"} <= names
    assert "resnet_robustness_severity.png" not in names and "cnn_batch_size.png" not in names
    assert "depth_effect.png" not in names  # no norm is run at two depths
    assert "unstable_comparisons.png" not in names and "unstable_bn_statistics.png" not in names
