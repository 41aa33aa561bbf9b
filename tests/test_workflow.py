"""The whole workflow on the tiny config (.test/config.yaml), on the real Fashion-MNIST."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import FASHION, REPO

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist"),
]


def copy_workflow(dest: Path) -> Path:
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, dest / name)
    for name in ("workflow", ".test", "config", "profiles"):
        shutil.copytree(REPO / name, dest / name, symlinks=True)
    return dest


def snakemake(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([SNAKEMAKE, "--cores", "2", *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    wd = copy_workflow(tmp_path_factory.mktemp("wf"))
    snakemake(wd, "--configfile", ".test/config.yaml")
    return wd


def test_tables(done):
    runs = pd.read_csv(done / "results/runs.csv")
    config = yaml.safe_load((REPO / ".test/config.yaml").read_text())
    assert set(runs["study"]) == set(config["studies"])
    for col in ["study", "dataset", "model", "norm", "depth", "batch_size", "seed", "status",
                "test_accuracy", "test_micro_f1", "test_macro_f1", "test_loss"]:  # fmt: skip
        assert col in runs.columns
    ok = runs[runs["status"] == "completed"]
    assert (ok["test_accuracy"] > 0.3).all(), ok[["study", "norm", "test_accuracy"]]  # real data, chance 0.1
    diverged = runs[runs["status"] == "diverged"]
    assert set(diverged["study"]) == {"unstable"}
    summary = pd.read_csv(done / "results/summary.csv")
    assert {"mean", "std", "ci95_low", "ci95_high", "n"} <= set(summary.columns)
    two_seeds = summary[(summary.study == "cnn") & (summary.metric == "test_accuracy")]
    assert (two_seeds["n"] == 2).all() and two_seeds["ci95_low"].notna().all()


def test_report_embeds_every_figure(done):
    html = (done / "results/report.html").read_text()
    figures = list((done / "results/figures").rglob("*.png"))
    assert len(figures) >= 8
    assert html.count("data:image/png;base64,") >= len(figures)
    assert not re.search(r"""src=["']https?:""", html)
    assert "diverged" in html


def test_unchanged_rerun_does_nothing(done):
    out = snakemake(done, "--configfile", ".test/config.yaml", "-n").stdout
    assert "Nothing to be done" in out


def test_changing_one_study_reruns_only_its_jobs(done, tmp_path):
    config = yaml.safe_load((done / ".test/config.yaml").read_text())
    config["studies"]["cnn"]["optimizer"]["lr"] = 0.02
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    out = snakemake(done, "--configfile", str(changed), "-n", "--quiet", "rules").stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    cnn_runs = len(config["studies"]["cnn"]["seeds"]) * 2
    assert int(counts["train"]) == cnn_runs and int(counts["test"]) == cnn_runs
    assert "prepare_data" not in counts


def test_data_is_prepared_once_and_no_two_jobs_share_an_output(tmp_path):
    wd = copy_workflow(tmp_path)
    out = snakemake(wd, "--configfile", ".test/config.yaml", "-n", "--quiet", "rules").stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    runs = 0
    for study in yaml.safe_load((wd / ".test/config.yaml").read_text())["studies"].values():
        conditions = {(n, d, b) for g in study["grid"] for n in g["norm"] for d in g["depth"] for b in g["batch_size"]}
        runs += len(conditions) * len(study["seeds"])
    assert int(counts["prepare_data"]) == 1  # every training job reads the one prepared file
    assert int(counts["train"]) == runs and int(counts["test"]) == runs
    # every job's outputs are its own: the run directory names every wildcard
    summary = snakemake(wd, "--configfile", ".test/config.yaml", "--summary").stdout.splitlines()[1:]
    outputs = [line.split("\t")[0] for line in summary if line.strip()]
    assert len(outputs) == len(set(outputs)) and any("/seed1/model.pt" in o for o in outputs)


def test_bad_config_fails_before_any_job(tmp_path):
    wd = copy_workflow(tmp_path)
    config = yaml.safe_load((wd / ".test/config.yaml").read_text())
    config["studies"]["cnn"]["grid"][0]["norm"] = ["bnn"]
    (wd / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(wd, "--configfile", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert "studies.cnn.grid[0].norm[0]: 'bnn' is not one of" in proc.stderr + proc.stdout
    assert not (wd / "results").exists() and not (wd / "resources").exists()
