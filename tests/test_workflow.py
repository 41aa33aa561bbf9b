"""The whole workflow on the tiny config (.test/config.yaml), on the real Fashion-MNIST: every stage and
analysis, the user's own layer, Snakemake's report, a run reproduced from the command line, and the
status and partial report of a study that is half finished."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
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
    for name in ("workflow", ".test", "config", "profiles", "examples"):
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
    # the user's own layer ran beside the built-in ones
    assert runs.query("norm == 'rms'")["status"].tolist() == ["completed"]


def test_batch_statistics_for_layers_with_running_statistics_only(done):
    runs = pd.read_csv(done / "results/runs.csv").set_index(["study", "norm", "batch_size", "seed"])
    for key in [("resnet", "bn", 64, 0), ("cnn", "bn", 32, 0), ("cnn", "bn", 32, 1)]:
        assert 0 < runs.loc[key, "test_precise_accuracy"] <= 1 and 0 < runs.loc[key, "test_batch_accuracy"] <= 1
    for key in [("resnet", "gn", 64, 0), ("resnet", "rms", 64, 0), ("cnn", "ln", 32, 0)]:
        assert pd.isna(runs.loc[key, "test_precise_accuracy"])
    metrics = pd.read_csv(done / "results/runs/cnn/bn/n1_b32/seed0/metrics.csv")
    assert metrics["statistics"].tolist() == ["as_trained"] * 3 + ["precise", "batch"]


def test_robustness_on_the_shared_corrupted_set(done):
    rob = pd.read_csv(done / "results/robustness.csv")
    assert set(rob["study"]) == {"cnn"}
    bn = rob.query("norm == 'bn' and seed == 0")
    assert set(bn["severity"]) == {0, 1, 3, 5} and set(bn["adapted"]) == {True, False}
    assert len(bn.query("severity > 0")) == 8 * 3 * 2  # 8 corruptions x 3 severities, before and after adaptation
    ln = rob.query("norm == 'ln' and seed == 0")
    assert not ln["adapted"].any()  # batch-independent: nothing to re-estimate
    runs = pd.read_csv(done / "results/runs.csv").query("study == 'cnn'")
    assert runs["corruption_accuracy"].between(0.05, 1).all()
    assert runs.query("norm == 'bn'")["corruption_accuracy_adapted"].notna().all()


def test_comparisons_paired_by_seed(done):
    comparisons = pd.read_csv(done / "results/comparisons.csv")
    cnn = comparisons.query("study == 'cnn'").iloc[0]
    assert (cnn["norm"], cnn["reference"], cnn["n_pairs"]) == ("bn", "ln", 2) and pd.notna(cnn["p_holm"])
    resnet = comparisons.query("study == 'resnet' and batch_size == 64")
    assert set(resnet["norm"]) == {"gn", "rms"} and (resnet["note"] == "needs >= 2 seeds").all()


def test_figures_are_the_registrys_that_apply(done):
    figures = {p.name for p in (done / "results/figures").glob("*.png")}
    assert {"resnet_batch_size.png", "resnet_bn_statistics.png", "cnn_robustness_severity.png",
            "cnn_robustness_heatmap.png", "cnn_comparisons.png", "final_accuracy.png"} <= figures  # fmt: skip
    assert "resnet_robustness_severity.png" not in figures  # that study evaluates no corruptions
    assert "cnn_batch_size.png" not in figures  # one batch size only


def test_report_embeds_every_figure(done):
    html = (done / "results/report.html").read_text()
    figures = list((done / "results/figures").rglob("*.png"))
    assert len(figures) >= 8
    assert html.count("data:image/png;base64,") >= len(figures)
    assert not re.search(r"""src=["']https?:""", html)
    assert "diverged" in html
    for section in ("Small batches", "Batch norm's statistics", "Robustness under corruption", "Is the difference real?"):
        assert section in html, section
    assert "RMSNorm2d" in html or "Root-mean-square" in html  # the user layer's own description


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render(html: Path, out: Path) -> str:
    """The DOM of ``html`` after its scripts ran, from headless Chromium; also a screenshot."""
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={out.parent / 'chromium-profile'}"]  # fmt: skip
    subprocess.run([*args, "--window-size=1400,3000", f"--screenshot={out}", html.resolve().as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    dom = subprocess.run([*args, "--virtual-time-budget=5000", "--dump-dom", html.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    return dom.stdout


def test_snakemakes_own_report_holds_every_figure_and_table(done, tmp_path):
    """`snakemake --report` works as Snakemake users expect: figures and tables flagged with report(),
    captioned, grouped by study and analysis; the zip holds every file, the html opens in Chromium."""
    snakemake(done, "--configfile", ".test/config.yaml", "--report", "results/snakemake-report.zip")
    figures = sorted(p.relative_to(done).as_posix() for p in (done / "results/figures").rglob("*.png"))
    with zipfile.ZipFile(done / "results/snakemake-report.zip") as z:
        names = z.namelist()
    stored = sorted(Path(n).name for n in names if n.endswith(".png"))
    assert stored == sorted(Path(f).name for f in figures)  # every figure, each once
    for table in ("runs.csv", "summary.csv", "comparisons.csv"):
        assert any(n.endswith(f"/{table}") for n in names), table
    snakemake(done, "--configfile", ".test/config.yaml", "--report", "results/snakemake-report.html")
    html = (done / "results/snakemake-report.html").read_text()
    for path in figures:
        assert Path(path).name in html, path
    for caption in ("Test error against the training batch size", "paired by seed"):
        assert caption in html  # the captions shared with results/report.html
    if _chromium() is None:
        message = "chromium is not installed (apt-get install chromium): the report was not rendered"
        if os.environ.get("CI"):  # CI installs it: there the render is never skipped
            pytest.fail(message)
        pytest.skip(message)
    dom = _render(done / "results/snakemake-report.html", tmp_path / "snakemake-report.png")
    assert "resnet" in dom and "cnn" in dom and "tables" in dom, dom[-2000:]
    assert (tmp_path / "snakemake-report.png").stat().st_size > 10_000


def test_a_run_is_reproduced_from_the_command_line(done, tmp_path):
    """`normres train --config ... --study ... --norm ... --seed ...` gives the workflow's run: the same
    settings, so the same numbers."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "again"
    cmd = [sys.executable, "-m", "normres.cli", "train", "--config", ".test/config.yaml", "--study", "cnn", "--norm", "ln",
           "--seed", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=done, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    timing = ["seconds", "images_per_s"]
    ours = pd.read_csv(out / "history.csv").drop(columns=timing)
    workflow = pd.read_csv(done / "results/runs/cnn/ln/n1_b32/seed1/history.csv").drop(columns=timing)
    pd.testing.assert_frame_equal(ours, workflow, check_exact=True)
    import json

    settings = lambda p: json.loads(p.read_text())["settings"]  # noqa: E731
    assert settings(out / "run.json") == settings(done / "results/runs/cnn/ln/n1_b32/seed1/run.json")
    changed = subprocess.run([*cmd[:-2], "--set", "epochs=1", "--out", str(tmp_path / "one")], cwd=done, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    assert len(pd.read_csv(tmp_path / "one" / "history.csv")) == 1


def test_editing_the_user_layer_reruns_exactly_its_runs(done):
    layer = done / "examples/norms.py"
    original = layer.read_text()
    try:
        layer.write_text(original + "\n# an edit\n")
        out = snakemake(done, "--configfile", ".test/config.yaml", "-n", "--quiet", "rules").stdout
        counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
        assert counts["train"] == "1" and counts["test"] == "1", out  # the one rms run
    finally:
        layer.write_text(original)


def test_unchanged_rerun_does_nothing(done):
    out = snakemake(done, "--configfile", ".test/config.yaml", "-n").stdout
    assert "Nothing to be done" in out


def test_changing_one_study_reruns_only_its_jobs(done, tmp_path):
    config = yaml.safe_load((done / ".test/config.yaml").read_text())
    config["studies"]["cnn"]["optimizer"]["lr"] = 0.02
    changed = done / ".test" / "changed.yaml"  # beside the original: the user layer path is relative to it
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
    assert int(counts["corrupt"]) == 1  # one corrupted set per dataset, shared by every run
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
    assert "Traceback" not in proc.stderr + proc.stdout and 'File "' not in proc.stderr
    assert not (wd / "results").exists() and not (wd / "resources").exists()


@pytest.mark.parametrize("bad_class", ["../examples/norms.py:Missing", "../examples/nothere.py:RMSNorm2d"])
def test_a_broken_user_layer_fails_before_any_job(tmp_path, bad_class):
    wd = copy_workflow(tmp_path)
    config = yaml.safe_load((wd / ".test/config.yaml").read_text())
    config["norms"]["rms"]["class"] = bad_class
    (wd / ".test/bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(wd, "--configfile", ".test/bad.yaml", check=False)
    assert proc.returncode != 0
    assert "config error at norms.rms.class" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (wd / "results").exists() and not (wd / "resources").exists()


# ---------------------------------------------------------------------------------------------
# A study half finished: status and partial report


@pytest.fixture(scope="module")
def half(tmp_path_factory) -> Path:
    """The tiny config with two runs finished, one interrupted after an epoch, one failed, the rest pending."""
    wd = copy_workflow(tmp_path_factory.mktemp("half"))
    snakemake(wd, "results/runs/cnn/ln/n1_b32/seed0/metrics.csv", "results/runs/cnn/bn/n1_b32/seed0/metrics.csv",
              "--configfile", ".test/config.yaml")  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = wd / "results/runs/resnet/bn/n1_b64/seed0"
    log = wd / "logs/train/resnet/bn/n1_b64/seed0.log"
    log.parent.mkdir(parents=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "normres.cli", "train", "--config", ".test/config.yaml", "--study",
                                 "resnet", "--norm", "bn"], cwd=wd, env=env, stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 120
        while not (run / "progress.json").exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    failed = wd / "logs/train/resnet/gn/n1_b64/seed0.log"
    failed.parent.mkdir(parents=True, exist_ok=True)
    failed.write_text("[10:00:00] training resnet norm=gn ...\nerror: device 'cuda' was asked for, but CUDA found no device\n")
    return wd


def test_status_shows_every_run_and_reads_files_only(half):
    before = {p: p.stat().st_mtime_ns for p in (half / "results").rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "normres.cli", "status", "--config", ".test/config.yaml"], cwd=half,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "9 runs: 2 completed, 1 interrupted, 1 failed, 5 pending" in text, text
    assert re.search(r"resnet\s+bn\s+1\s+64\s+0\s+interrupted\s+1/2\s+0\.\d+", text), text
    assert "failed: results/runs/resnet/gn/n1_b64/seed0: device 'cuda' was asked for" in text
    assert "logs/train/resnet/gn/n1_b64/seed0.log" in text
    assert "study ETA:" in text
    after = {p: p.stat().st_mtime_ns for p in (half / "results").rglob("*") if p.is_file()}
    assert before == after, "status must not touch any file"


def test_partial_report_shows_the_finished_runs_and_lists_the_pending(half, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "normres.cli", "report", "--partial", "--config", ".test/config.yaml"],
                          cwd=half, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    html = (half / "results/partial/report.html").read_text()
    assert "Partial report: 7 of 9 runs have not finished yet" in html
    assert "results/runs/resnet/bn/n1_b64/seed0 (interrupted, epoch 1/2)" in html
    assert html.count("data:image/png;base64,") >= 5
    assert not (half / "results/report.html").exists() and not (half / "results/runs.csv").exists()  # the workflow's own
    if _chromium():
        dom = _render(half / "results/partial/report.html", tmp_path / "partial.png")
        assert "Pending runs" in dom
