"""The workflow on a real single-node SLURM cluster through the project's `slurm` profile (issue #5).

Cluster: the test cluster of ``.ci/slurm/start.sh`` (ClusterName ``normres-ci``, partitions ``cpu`` and
``gpu`` named as in ``slurm/config.yaml``, fake GPUs, no slurmdbd). CI starts it before ``make test`` and
stops it afterwards. The tests do not start daemons on their own: a cluster that is not running skips
them with the command to start it. Opt in with ``NORMRES_SLURM_START=1`` (as root, SLURM installed): then
the module starts the cluster itself and stops it again at the end (each daemon by its PID,
``.ci/slurm/stop.sh``); not on a machine where others use the cluster, as stopping it would break their
runs. Against any cluster other than ``normres-ci`` the tests skip: they never submit to a real cluster.

One scenario (about 4 minutes on 2 cores) feeds the ``slurm`` tests, on a study of two runs (seeds 0 and
1, EPOCHS epochs of TRAIN_SUBSET images) derived from ``.test/config.yaml``:

1. in the background, a plain local run (``--cores 2``) of the same config: the reference;
2. ``snakemake --profile slurm`` with, on the command line, ``--set-threads train=1 test=1`` (2-CPU node,
   and the same threads as the reference), ``--retries 0`` (so a cancelled job fails the run), a 2 s
   first status poll and kept SLURM logs; partitions, GPU, memory, time, requeue, account, status
   command and the grouping of a run's training and test into one SLURM job come from the profile.
   Seed 0 trains undisturbed; seed 1's job is cancelled with ``scancel`` once it has written
   ``checkpoint.pt``: the run must fail, visibly and promptly (``keep-going`` still finishes seed 0);
3. the same command again: it resubmits seed 1, which resumes after epoch 1; once it has written its
   next checkpoint, the job is requeued with ``scontrol requeue`` (a preemption: SLURM restarts the same
   job, Snakemake keeps waiting, training resumes again), and the run completes, report included.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_NAME = "normres-ci"
STUDY = "slurmtest"
SEEDS = (0, 1)
EPOCHS = 5
TRAIN_SUBSET = 512  # images per epoch: short epochs, yet a few seconds between checkpoints
RUN1_TIMEOUT = 480  # s: snakemake must have exited by then (a hang fails the test)
RUN2_TIMEOUT = 360
CANCEL_NOTICED_WITHIN = 120  # s from scancel to Snakemake's error message (status polls back off by 10 s)
SQUEUE_FIELDS = ["JobID", "Name", "Partition", "State", "tres-per-job", "TimeLimit", "MinMemory",
                 "cpus-per-task", "RestartCnt", "Comment", "WorkDir"]  # fmt: skip
METRICS = [f"{s}_{m}" for s in ("train", "val", "test") for m in ("accuracy", "micro_f1", "macro_f1", "loss")]


# ---------------------------------------------------------------------------------------------
# Helpers


def sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def snakemake_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "NORMRES_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    # The test cluster's GPUs are fake (gres File=/dev/null): SLURM sets CUDA_VISIBLE_DEVICES=0 in a GPU
    # job but there is no GPU, and normres refuses to train on the CPU when a GPU was given to the job
    # (test_a_job_given_a_fake_gpu_stops_with_the_reason). These jobs train on the CPU on purpose.
    env["NORMRES_DEVICE"] = "cpu"
    return env | extra


def cluster_state() -> tuple[str, str]:
    """('up' | 'down' | 'absent' | 'foreign', detail)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "absent", "SLURM client tools are not installed"
    try:
        conf = sh("scontrol", "show", "config", timeout=15)
    except subprocess.TimeoutExpired:
        return "down", "scontrol show config timed out"
    if conf.returncode != 0:
        return "down", " ".join((conf.stderr or conf.stdout).split())[-200:]
    name = re.search(r"^ClusterName\s*=\s*(\S+)", conf.stdout, re.M)
    if not name or name.group(1) != CLUSTER_NAME:
        return "foreign", f"cluster '{name.group(1) if name else '?'}' is not the test cluster '{CLUSTER_NAME}'"
    parts = sh("sinfo", "-h", "-o", "%P %T").stdout.split("\n")
    ready = {p.split()[0].rstrip("*") for p in parts if p.strip() and p.split()[1] in ("idle", "mixed", "allocated")}
    if not {"cpu", "gpu"} <= ready:
        return "down", f"partitions cpu and gpu are not both up (ready: {sorted(ready) or 'none'})"
    return "up", ""


@pytest.fixture(scope="module")
def slurm_cluster():
    state, detail = cluster_state()
    if state == "absent":
        pytest.skip(f"{detail}: apt-get install slurm-wlm munge, then sudo .ci/slurm/start.sh")
    if state == "foreign":
        pytest.skip(f"{detail}; these tests only submit to the cluster of .ci/slurm/start.sh")
    started = False
    if state == "down":
        if os.environ.get("NORMRES_SLURM_START") != "1" or os.geteuid() != 0 or not shutil.which("slurmctld"):
            pytest.skip(
                f"the SLURM test cluster is not running ({detail}): sudo .ci/slurm/start.sh "
                "(or NORMRES_SLURM_START=1 as root: the tests start and stop it)"
            )
        out = subprocess.run([str(REPO / ".ci/slurm/start.sh")], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            pytest.fail(f".ci/slurm/start.sh failed:\n{out.stdout}\n{out.stderr}")
        started = True
        state, detail = cluster_state()
        assert state == "up", detail
    yield
    if started:
        subprocess.run([str(REPO / ".ci/slurm/stop.sh")], capture_output=True, timeout=120)


USER_LAYER = "rms"  # the tiny config's own layer: the scenario's runs use it, through every SLURM job


def study_config() -> dict:
    """Two runs (seeds 0, 1) of the tiny config's `resnet` study with its user layer (examples/norms.py,
    named by an absolute path: the config is written outside the repository), EPOCHS epochs each."""
    tiny = yaml.safe_load((REPO / ".test/config.yaml").read_text())
    study = copy.deepcopy(tiny["studies"]["resnet"])
    first = study["grid"][0]
    study["grid"] = [{"norm": [USER_LAYER], "depth": [first["depth"][0]], "batch_size": [first["batch_size"][0]]}]
    study.update(seeds=list(SEEDS), epochs=EPOCHS, train_subset=TRAIN_SUBSET)
    study.pop("eval_test_every_epoch", None)
    layer = dict(tiny["norms"][USER_LAYER])
    layer["class"] = f"{REPO / 'examples/norms.py'}:{layer['class'].rpartition(':')[2]}"
    return {"data": tiny["data"], "norms": {USER_LAYER: layer}, "studies": {STUDY: study}}


def run_keys(config: dict) -> list[dict]:
    g = config["studies"][STUDY]["grid"][0]
    return [
        {"study": STUDY, "norm": g["norm"][0], "depth": g["depth"][0], "batch_size": g["batch_size"][0], "seed": s}
        for s in SEEDS
    ]


def run_dir(key: dict) -> str:
    return f"results/runs/{key['study']}/{key['norm']}/n{key['depth']}_b{key['batch_size']}/seed{key['seed']}"


def group_of(key: dict) -> str:
    """The group job of one run (slurm/config.yaml's `groups`): its SLURM --comment starts so."""
    return f"rule_run_{key['study']}_{key['norm']}_n{key['depth']}_b{key['batch_size']}_seed{key['seed']}_"


@dataclass
class Run:
    """One snakemake process: its exit code and its output lines with arrival times (monotonic)."""

    cmd: list[str]
    cwd: Path
    rc: int | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def start(self) -> Run:
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=snakemake_env(), text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def poll(self) -> int | None:
        self.rc = self.proc.poll()
        if self.rc is not None:
            self._reader.join(timeout=10)
        return self.rc

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.poll()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the process group this test started
            self.proc.wait()

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> tuple[float, str] | None:
        rx = re.compile(pattern)
        return next(((t, line) for t, line in self.lines if rx.search(line)), None)


class Jobs:
    """Every SLURM job of one working directory, as squeue reported it last (finished jobs stay
    visible for MinJobAge=300 s, so the scenario snapshots squeue while it runs)."""

    def __init__(self, workdir: Path, runs: list[Run]):
        self.workdir = str(workdir.resolve())
        self.runs = runs  # jobs are named by the SLURM run ID each snakemake process prints
        self.by_id: dict[str, dict[str, str]] = {}

    def snapshot(self) -> dict[str, dict[str, str]]:
        run_id = re.compile(r"SLURM run ID: (\S+)")
        names = {m.group(1) for r in self.runs for _, line in r.lines if (m := run_id.search(line))}
        fmt = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)
        out = sh("squeue", "-t", "all", "-h", "-O", fmt).stdout
        for line in out.splitlines():
            row = dict(zip(SQUEUE_FIELDS, line.split("|")))
            if row.get("WorkDir") == self.workdir and row.get("Name") in names:
                self.by_id[row["JobID"]] = row
        return self.by_id

    def of_run(self, key: dict) -> list[dict[str, str]]:
        return [j for j in self.by_id.values() if j["Comment"].startswith(group_of(key))]

    def running_train_job(self, key: dict) -> str | None:
        for j in self.snapshot().values():
            if j["Comment"].startswith(group_of(key)) and j["State"] == "RUNNING":
                return j["JobID"]
        return None

    def cancel_all(self):
        ended = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT")
        live = [i for i, j in self.snapshot().items() if j["State"] not in ended]
        if live:
            sh("scancel", *live)


@dataclass
class Scenario:
    config: dict
    keys: list[dict]
    local_dir: Path
    cluster_dir: Path
    local: Run
    first: Run
    second: Run
    jobs: Jobs
    requeued: str = ""
    cancelled: str = ""
    cancelled_at: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self, key: dict) -> dict:
        return json.loads((self.cluster_dir / run_dir(key) / "run.json").read_text())


def profile_cmd(workdir: Path) -> list[str]:
    # Everything not given here comes from slurm/config.yaml (and profiles/default/config.yaml).
    return [
        sys.executable, "-m", "snakemake", "--profile", "slurm", "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"),
        "--set-threads", "train=1", "test=1",  # 2-CPU test node; also keeps results equal to the local run
        "--retries", "0",  # a cancelled job must fail the run (the profile would resubmit it once)
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-keep-successful-logs",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def scenario(slurm_cluster, tmp_path_factory) -> Scenario:
    base = tmp_path_factory.mktemp("slurm")
    config = study_config()
    keys = run_keys(config)
    local_dir, cluster_dir = base / "local", base / "cluster"
    for d in (local_dir, cluster_dir):
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    local = Run(
        [sys.executable, "-m", "snakemake", "results/runs.csv", "--cores", "2", "--directory", str(local_dir),
         "--configfile", str(local_dir / "config.yaml")],
        REPO,
    )  # fmt: skip
    first, second = Run(profile_cmd(cluster_dir), REPO), Run(profile_cmd(cluster_dir), REPO)
    sc = Scenario(config, keys, local_dir, cluster_dir, local, first, second, Jobs(cluster_dir, [first, second]))
    t0 = time.monotonic()

    def drive(run: Run, seed: int, action: str, timeout: float) -> None:
        """Run to the end; once seed's training job has written a checkpoint during this run, act on it."""
        started, wall = time.monotonic(), time.time()
        key = next(k for k in keys if k["seed"] == seed)
        ck = cluster_dir / run_dir(key) / "checkpoint.pt"
        run.start()
        while run.poll() is None:
            if time.monotonic() - started > timeout:
                pytest.fail(f"snakemake --profile slurm did not finish in {timeout} s:\n{run.text[-3000:]}")
            if action and ck.exists() and ck.stat().st_mtime > wall and (job := sc.jobs.running_train_job(key)):
                cmd = ("scancel", job) if action == "cancel" else ("scontrol", "requeue", job)
                out = sh(*cmd)
                assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout}{out.stderr}"
                if action == "cancel":
                    sc.cancelled, sc.cancelled_at = job, time.monotonic()
                else:
                    sc.requeued = job
                action = ""
            sc.jobs.snapshot()
            time.sleep(0.5)
        sc.jobs.snapshot()
        assert not action, f"seed {seed}'s training was not caught between two checkpoints:\n{run.text[-3000:]}"

    try:
        # The reference run shares the 2 CPUs with the cluster runs, filling their idle polling time.
        local.start()
        # 1. seed 0 trains undisturbed; seed 1 is cancelled after its first epoch: the run must fail.
        drive(first, SEEDS[1], "cancel", RUN1_TIMEOUT)
        sc.seconds["first"] = time.monotonic() - t0
        # 2. the rerun resubmits seed 1 (resumes after epoch 1); after its next epoch SLURM requeues
        #    the job (a preemption): it restarts, resumes again, and the run completes.
        t1 = time.monotonic()
        drive(second, SEEDS[1], "requeue", RUN2_TIMEOUT)
        sc.seconds["second"] = time.monotonic() - t1
        local.wait(max(30, RUN1_TIMEOUT - (time.monotonic() - t0)))
        sc.seconds["total"] = time.monotonic() - t0
    finally:
        for r in (first, second, local):
            r.kill()
        sc.jobs.cancel_all()
        for name, r in (("local", local), ("first", first), ("second", second)):
            (base / f"{name}.log").write_text(r.text)  # kept under pytest's basetemp, for debugging
        (base / "jobs.json").write_text(json.dumps(sc.jobs.by_id, indent=1))
    print(f"slurm scenario in {base}: " + ", ".join(f"{k} {v:.0f} s" for k, v in sc.seconds.items()))
    return sc


# ---------------------------------------------------------------------------------------------
# Tests that need no cluster: the profile itself


def test_profile_lines_are_commented():
    """Users copy the profile and adapt it: every setting says what it does."""
    for path in (REPO / "slurm/config.yaml", REPO / "profiles/default/config.yaml"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                assert "#" in line or line.rstrip().endswith(":"), f"{path.name}:{n} has no comment: {line!r}"


def read_profile(path: Path, **env: str) -> dict:
    """The profile as Snakemake reads it: a YTE template, evaluated in an environment."""
    import yte

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with open(path) as f:
            return yte.process_yaml(f, require_use_yte=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_profiles_parse_and_keep_their_roles():
    slurm = read_profile(REPO / "slurm/config.yaml")
    default = yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["slurm-status-command"] == "squeue"
    assert slurm["slurm-no-account"] is True and "slurm_account" not in slurm["default-resources"]
    assert slurm["slurm-requeue"] is True and slurm["retries"] >= 1
    assert slurm["set-resources"]["train"]["gpu"] == 1
    assert "gpu" not in slurm["set-resources"]["test"] and "gpu" not in slurm["default-resources"]
    # one SLURM job per run: training and its evaluations share a group named by the run's wildcards
    assert len(set(slurm["groups"].values())) == 1 and set(slurm["groups"]) == {"train", "test", "robustness"}
    partitions = {rule: r["slurm_partition"] for rule, r in slurm["set-resources"].items()}
    assert len(set(partitions.values())) == 1, "a group job has one partition"
    # profiles/default is applied together with --profile slurm and wins per key: it must not set
    # anything machine-specific that would silently override the cluster profile.
    machine_keys = {"executor", "jobs", "cores", "latency-wait", "default-resources", "set-resources",
                    "set-threads", "keep-going", "retries", "resources", "groups"}  # fmt: skip
    assert not machine_keys & default.keys()
    # squeue status needs MinJobAge (300 s on the test cluster and SLURM's default) >= 3 x first poll delay
    assert 3 * slurm["slurm-init-seconds-before-status-checks"] <= 300


def test_cluster_names_come_from_the_environment_and_keep_the_rest():
    """Partition, account, GPU type and time limits change without editing the profile, and without
    --set-resources (which would replace every per-rule resource of the profile)."""
    env = {"NORMRES_GPU_PARTITION": "a100q", "NORMRES_CPU_PARTITION": "short", "NORMRES_ACCOUNT": "proj7",
           "NORMRES_GPU_MODEL": "a100", "NORMRES_TRAIN_MINUTES": "90", "NORMRES_TRAIN_MEM_MB": "24000"}  # fmt: skip
    slurm = read_profile(REPO / "slurm/config.yaml", **env)
    train = slurm["set-resources"]["train"]
    assert train == {"slurm_partition": "a100q", "gpu": 1, "gpu_model": "a100", "runtime": 90, "mem_mb": 24000}
    assert slurm["set-resources"]["test"]["slurm_partition"] == "a100q" and slurm["set-resources"]["test"]["runtime"] == 30
    assert slurm["default-resources"] == {"slurm_partition": "short", "slurm_account": "proj7", "runtime": 60, "mem_mb": 4000}
    assert slurm["slurm-no-account"] is False


def _dry_run_jobs(tmp_path: Path, **env: str) -> tuple[str, dict[str, list[tuple[dict, int, str | None]]]]:
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "--cores", "64", "--directory",
         str(tmp_path), "--configfile", str(REPO / ".test/config.yaml")],
        cwd=REPO, env=snakemake_env(**env), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout + out.stderr
    jobs = {}  # rule -> list of (resources, threads, group) of its jobs
    group = None
    for block in re.split(r"\n(?=\s*(?:local)?rule \w+:|\[.*\] Group job )", text):
        if g := re.search(r"Group job (\S+) \(", block):
            group = g.group(1)
            continue
        m = re.match(r"\s*(?:(local)?rule) (\w+):", block)
        r = re.search(r"^\s+resources: (.*)$", block, re.M)
        t = re.search(r"^\s+threads: (\d+)$", block, re.M)
        if m and r:
            res = dict(item.split("=", 1) for item in r.group(1).split(", "))
            in_group = group if block.startswith("    ") else None
            jobs.setdefault(m.group(2), []).append((res, int(t.group(1)) if t else 1, in_group))
    return text, jobs


def test_profile_dry_run_submits_one_gpu_job_per_run(tmp_path):
    """`snakemake --profile slurm -n` on the tiny config: each run's train, test and robustness jobs form
    one group (one SLURM job); train asks for the GPU; the bookkeeping rules stay outside any group."""
    text, jobs = _dry_run_jobs(tmp_path)
    assert re.search(r"Using profiles? slurm and workflow specific profile profiles/default", text)
    assert {"train", "test", "robustness", "aggregate", "report"} <= jobs.keys()
    for res, threads, group in jobs["train"]:
        assert res["gpu"] == "1" and res["slurm_partition"] == "gpu" and res["runtime"] == "720", res
        assert res["mem_mb"] == "16000" and threads == 4 and group and group.startswith("run_"), (res, threads, group)
    for rule in ("test", "robustness"):
        for res, threads, group in jobs[rule]:
            assert "gpu" not in res and res["slurm_partition"] == "gpu" and group and threads == 2, res
    groups = [g for rule in ("train", "test", "robustness") for _, _, g in jobs[rule]]
    assert len(set(groups)) == len(jobs["train"]), "one group per run"
    for rule in ("prepare_data", "corrupt", "aggregate", "compare", "figures", "report"):
        assert all(g is None for _, _, g in jobs[rule]), rule


def test_a_command_line_partition_keeps_the_other_resources(tmp_path):
    _, jobs = _dry_run_jobs(tmp_path, NORMRES_GPU_PARTITION="a100q", NORMRES_TRAIN_MINUTES="90")
    for res, threads, _ in jobs["train"]:
        assert res["slurm_partition"] == "a100q" and res["runtime"] == "90", res
        assert res["gpu"] == "1" and res["mem_mb"] == "16000" and threads == 4, res  # the rest is kept
    for res, _, _ in jobs["test"]:
        assert res["slurm_partition"] == "a100q" and res["runtime"] == "30", res


# ---------------------------------------------------------------------------------------------
# Tests on the cluster (one shared scenario)


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_job_fails_the_run_visibly(scenario):
    first = scenario.first
    assert scenario.cancelled, "no job was cancelled"
    assert first.rc not in (0, None), f"the run with a cancelled job exited {first.rc}:\n{first.text[-3000:]}"
    # Snakemake names the failed group job (the run): training and test of seed 1
    seen = first.first(rf"Error in group {group_of(scenario.keys[1])[5:-1]}$")
    assert seen, f"no error message for cancelled job {scenario.cancelled}:\n{first.text[-3000:]}"
    assert seen[0] - scenario.cancelled_at < CANCEL_NOTICED_WITHIN, "the cancelled job was noticed too late"
    assert scenario.jobs.by_id[scenario.cancelled]["State"] == "CANCELLED"
    # keep-going (profile): the independent run still finished and was tested in the failed run
    assert (scenario.cluster_dir / run_dir(scenario.keys[0]) / "metrics.csv").exists()
    assert scenario.record(scenario.keys[0])["resumed_at_epochs"] == []


@pytest.mark.slurm
@pytest.mark.slow
def test_rerun_resumes_the_cancelled_training(scenario):
    second = scenario.second
    assert second.rc == 0, second.text[-3000:]
    record = scenario.record(scenario.keys[1])
    assert record["status"] == "completed" and record["epochs_completed"] == EPOCHS
    assert record["resumed_at_epochs"][0] >= 1, record["resumed_at_epochs"]  # resubmitted after scancel
    jobs = scenario.jobs.of_run(scenario.keys[1])
    assert sorted(j["State"] for j in jobs) == ["CANCELLED", "COMPLETED"], jobs


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_job_restarts_and_resumes_from_its_checkpoint(scenario):
    """A preemption: SLURM requeues the running job (it was submitted with --requeue: the test cluster
    has JobRequeue=0), Snakemake keeps waiting, and the restarted job resumes from checkpoint.pt."""
    assert scenario.requeued, "no job was requeued"
    job = scenario.jobs.by_id[scenario.requeued]
    assert int(job["RestartCnt"]) >= 1 and job["State"] == "COMPLETED", job
    resumed = scenario.record(scenario.keys[1])["resumed_at_epochs"]
    assert len(resumed) == 2 and resumed[1] > resumed[0], resumed  # after scancel, then after requeue
    assert not scenario.second.first(rf"SLURM-job '{scenario.requeued}' failed")
    log = scenario.cluster_dir / "logs/train" / f"{run_dir(scenario.keys[1]).split('runs/', 1)[1]}.log"
    assert "resuming from" in log.read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_each_run_is_one_sbatch_job_with_a_gpu(scenario):
    """Training and testing of a run are one SLURM job (a group job): a study of N runs submits N jobs
    (plus resubmissions), each in the GPU partition with the profile's resources; wall times add up."""
    for key in scenario.keys:
        jobs = scenario.jobs.of_run(key)
        assert jobs, f"no SLURM job for {key}"
        for j in jobs:  # values from slurm/config.yaml's set-resources (train 720 min + test 30 min)
            assert j["Partition"] == "gpu" and j["tres-per-job"] == "gres:gpu:1", j
            assert j["TimeLimit"] == "12:30:00" and j["MinMemory"] == "16000M" and j["cpus-per-task"] == "1", j
            assert j["Comment"].endswith("_test_train"), j
    assert len(scenario.jobs.of_run(scenario.keys[0])) == 1  # undisturbed: one job did train and test
    logs = scenario.cluster_dir / ".snakemake/slurm_logs"
    assert len(list(logs.glob("group_run_*/*.log"))) >= len(scenario.keys), sorted(logs.rglob("*"))


@pytest.mark.slurm
@pytest.mark.slow
def test_only_the_runs_are_submitted_and_bookkeeping_stays_local(scenario):
    assert all(j["Comment"].startswith("rule_run_") for j in scenario.jobs.by_id.values()), scenario.jobs.by_id
    text = scenario.first.text + scenario.second.text
    for rule in ("prepare_data", "aggregate", "compare", "figures", "misclassified", "report"):
        assert f"localrule {rule}:" in text, rule
    assert (scenario.cluster_dir / "results/report.html").stat().st_size > 0


@pytest.mark.slurm
def test_a_job_given_a_fake_gpu_stops_with_the_reason(slurm_cluster, tmp_path):
    """The test cluster's GPU is fake: SLURM sets CUDA_VISIBLE_DEVICES, CUDA cannot start. Without
    NORMRES_DEVICE=cpu, normres must stop and say so rather than train on the CPU for hours."""
    log = tmp_path / "job.log"
    code = "from normres.device import select_device; print(select_device())"
    env = snakemake_env()
    del env["NORMRES_DEVICE"]
    job = subprocess.run(["sbatch", "--parsable", "-p", "gpu", "--gpus=1", "-o", str(log), "-D", str(tmp_path),
                          f"--wrap={sys.executable} -c '{code}'"], env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert job.returncode == 0, job.stderr
    deadline = time.time() + 90
    while time.time() < deadline and "DeviceError" not in (log.read_text() if log.exists() else ""):
        time.sleep(1)
    text = log.read_text()
    assert "this job was given a GPU (CUDA_VISIBLE_DEVICES=0), but CUDA cannot start" in text, text
    assert "NORMRES_DEVICE=cpu" in text


@pytest.mark.slurm
@pytest.mark.slow
def test_the_user_layer_ran_in_the_slurm_jobs(scenario):
    """The runs' layer is the config's own (imported from its file inside each SLURM job), recorded
    with its source hash."""
    for key in scenario.keys:
        settings = scenario.record(key)["settings"]
        assert settings["norm"] == USER_LAYER and settings["norm_class"].endswith("examples/norms.py:RMSNorm2d")
        assert len(settings["norm_sha256"]) == 64


@pytest.mark.slurm
@pytest.mark.slow
def test_cluster_results_equal_a_local_run(scenario):
    assert scenario.local.rc == 0, scenario.local.text[-3000:]
    cols = ["study", "norm", "depth", "batch_size", "seed", "status", "epochs", *METRICS]
    local = pd.read_csv(scenario.local_dir / "results/runs.csv")[cols].sort_values("seed", ignore_index=True)
    cluster = pd.read_csv(scenario.cluster_dir / "results/runs.csv")[cols].sort_values("seed", ignore_index=True)
    # Training is deterministic on the CPU, and resuming from a checkpoint changes nothing: both runs were
    # interrupted on the cluster, yet every metric equals the uninterrupted local run.
    pd.testing.assert_frame_equal(cluster, local, check_exact=False, rtol=1e-6, atol=1e-9)
