"""The conda environments of the workflow (workflow/envs/*.yaml), checked as far as this machine allows.

Conda channels cannot be reached here, so no real environment is ever built. What is checked:
* every env file parses, names its channels, pins python and pip exactly, and pins every pip package
  with `==` to exactly the version in requirements.lock (the versions the tests run with);
* the pip pins cover the whole runtime dependency closure of normres (from the installed package
  metadata), so pip resolves nothing on its own when the env is built;
* every rule with a `script:` names an env file that exists (`snakemake --lint` is clean);
* with a stand-in `conda` (it builds a bare venv instead of solving the env file: no packages), the
  real `snakemake --use-conda` code path runs the prepare_data glue script inside that env, where
  PYTHONPATH is blocked and normres is not installed: normres comes from the checkout through
  Snakemake's script preamble (see the README, "With conda").

`python tests/test_envs.py` prints the pip section for workflow/envs/normres.yaml from the current
requirements.lock (after `make lock`, paste it in).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "workflow/envs").glob("*.yaml"))
# pip freeze (make lock) leaves these out; the env pins them exactly, to any version
BOOTSTRAP = {"pip", "setuptools", "wheel"}
# CUDA wheels exist for Linux only; their pins carry this marker so the env also builds elsewhere (CPU)
LINUX_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
LINUX_MARKER = 'sys_platform == "linux"'


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def runtime_closure(root: str = "normres") -> dict[str, str]:
    """Every distribution `root` needs at run time (no extras of its own), with its installed version."""
    seen: dict[str, str] = {}
    done: set[tuple[str, frozenset]] = set()
    todo = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in done:
            continue
        done.add((canonicalize_name(name), extras))
        for spec in metadata.distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            seen[canonicalize_name(req.name)] = metadata.version(req.name)
            todo.append((req.name, frozenset(req.extras)))
    return seen


def pip_section(pins: dict[str, str] | None = None) -> list[str]:
    """The pip lines of the env: the closure of normres, pinned as in requirements.lock."""
    lock = lock_pins()
    lines = []
    for name, installed in sorted((pins or runtime_closure()).items()):
        version = installed if name in BOOTSTRAP else lock[name]
        line = f"{name}=={version}"
        lines.append(f"{line}; {LINUX_MARKER}" if LINUX_ONLY.match(name) else line)
    return lines


def env_pip_pins(env: dict) -> dict[str, Requirement]:
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip) == 1 and list(pip[0]) == ["pip"], "one `- pip:` section"
    reqs = [Requirement(line) for line in pip[0]["pip"]]
    return {canonicalize_name(r.name): r for r in reqs}


@pytest.fixture(params=ENV_FILES, ids=lambda p: p.name)
def env_file(request) -> Path:
    return request.param


def test_there_is_an_env_file():
    assert ENV_FILES, "workflow/envs/*.yaml"


def test_env_file_parses_and_pins_exactly(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert set(env) <= {"name", "channels", "dependencies"}, env.keys()
    assert env["channels"][0] == "conda-forge" and "nodefaults" in env["channels"]
    conda = {d.split("=")[0]: d for d in env["dependencies"] if isinstance(d, str)}
    assert set(conda) == {"python", "pip"}, "everything else comes from PyPI with the lock's versions"
    assert re.fullmatch(r"python=3\.\d+\.\d+", conda["python"]), conda["python"]
    assert re.fullmatch(r"pip=\d+\.\d+(\.\d+)?", conda["pip"]), conda["pip"]
    lock = lock_pins()
    for name, req in env_pip_pins(env).items():
        (spec,) = req.specifier
        assert spec.operator == "==", f"{env_file.name}: {req} is not an exact pin"
        if name not in BOOTSTRAP:  # pip/setuptools/wheel: not in the lock, any exact version
            assert spec.version == lock.get(name), f"{env_file.name}: {req} but requirements.lock has {lock.get(name)}"
        if LINUX_ONLY.match(name):
            assert str(req.marker) == LINUX_MARKER, req


def test_normres_env_covers_the_runtime_closure():
    env = yaml.safe_load((REPO / "workflow/envs/normres.yaml").read_text())
    pinned = set(env_pip_pins(env))
    closure = set(runtime_closure())
    assert closure - pinned == set(), "not pinned: run `python tests/test_envs.py` and update the env"
    assert pinned - closure == set(), "pinned but not needed by normres"


def test_every_script_rule_has_an_existing_env():
    """Each rule that runs a glue script names a conda env file that exists."""
    rules = {}
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        for block in re.split(r"\n(?=rule \w+:)", smk.read_text()):
            m = re.match(r"rule (\w+):", block)
            if m and "script:" in block:
                env = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", block)
                rules[m.group(1)] = env and (smk.parent / env.group(1)).resolve()
    assert rules, "no script rules found"
    for rule, env in rules.items():
        assert env is not None, f"rule {rule} has no conda: directive"
        assert env.is_file() and env.parent == (REPO / "workflow/envs"), (rule, env)


def snakemake(*args, cwd=REPO, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env or os.environ.copy(),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_lint_is_clean(tmp_path):
    out = snakemake("--lint", "--directory", str(tmp_path), "--configfile", str(REPO / ".test/config.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


FAKE_CONDA = """\
#!/usr/bin/env bash
# Stand-in for conda (tests/test_envs.py): answers what Snakemake asks, and builds an env as a bare venv.
root=$(cd "$(dirname "$0")/.." && pwd)
echo "conda $*" >> "$root/calls.log"
case "$1 $2" in
  "--version "*) echo "conda 24.11.3" ;;
  "info --json") printf '{"conda_prefix": "%s", "platform": "linux-64", "conda_version": "24.11.3"}\\n' "$root" ;;
  "clean -y") ;;
  "config --get") echo '{"get": {"channel_priority": "strict"}, "rc_path": "", "success": true, "warnings": []}' ;;
  "env create")
    while [ $# -gt 0 ]; do
      case "$1" in --file) file=$2; shift ;; --prefix) prefix=$2; shift ;; esac; shift
    done
    file=${file//\\"/}; prefix=${prefix//\\"/}
    "@PYTHON@" -c 'import sys, yaml; e = yaml.safe_load(open(sys.argv[1])); assert e["dependencies"]' "$file" || exit 1
    "@BASE_PYTHON@" -m venv --without-pip "$prefix" && cp "$file" "$root/created-from.yaml" ;;
  *) echo "fake conda: unsupported: $*" >&2; exit 1 ;;
esac
"""

FAKE_ACTIVATE = """\
# sourced by Snakemake as: source <conda>/bin/activate <env>
export PATH="$1/bin:$PATH" CONDA_PREFIX="$1"
echo "activate $1" >> "@ROOT@/calls.log"
"""


@pytest.mark.slow
def test_use_conda_runs_a_glue_script_in_an_env_without_normres(tmp_path):
    """`snakemake --use-conda` with a stand-in conda: prepare_data's script runs under the env's own
    python (no normres installed there, PYTHONPATH blocked) and still imports normres."""
    root, work = tmp_path / "conda", tmp_path / "work"
    (root / "bin").mkdir(parents=True)
    work.mkdir()
    base_python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    conda = root / "bin/conda"
    conda.write_text(FAKE_CONDA.replace("@PYTHON@", sys.executable).replace("@BASE_PYTHON@", base_python))
    conda.chmod(0o755)
    (root / "bin/activate").write_text(FAKE_ACTIVATE.replace("@ROOT@", str(root)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(tmp_path / "nothing-here")  # Snakemake must keep this out of the env
    args = ["resources/fashion_mnist/data.pt", "--use-conda", "--conda-prefix", str(tmp_path / "envs"),
            "--cores", "1", "--directory", str(work), "--configfile", str(REPO / ".test/config.yaml")]  # fmt: skip

    dry = snakemake("-n", *args, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    out = snakemake(*args, env=env)
    text = out.stdout + out.stderr
    log = work / "logs/prepare_data/fashion_mnist.log"
    assert out.returncode == 0, text + (log.read_text() if log.exists() else "")
    assert (work / "resources/fashion_mnist/data.pt").stat().st_size > 1_000_000
    calls = (root / "calls.log").read_text()
    assert "conda env create" in calls and "activate " in calls, calls
    # the env was built from the project's env file, and the script ran under the env's python
    assert (root / "created-from.yaml").read_text() == (REPO / "workflow/envs/normres.yaml").read_text()
    (envdir,) = [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]
    assert not list(envdir.glob("lib/python*/site-packages/normres*")), "normres must not be installed in the env"
    alone = subprocess.run([envdir / "bin/python", "-c", "import normres"], capture_output=True, text=True, env=env)
    assert "No module named 'normres'" in alone.stderr  # so the script found it through Snakemake's preamble
    assert "Activating conda environment" in text


if __name__ == "__main__":
    # The pip section of workflow/envs/normres.yaml, from requirements.lock and normres's metadata.
    print(textwrap.indent("\n".join(f"- {line!r}" if ";" in line else f"- {line}" for line in pip_section()), " " * 6))
    print(json.dumps({"python": sys.version.split()[0], "pip": metadata.version("pip")}))
