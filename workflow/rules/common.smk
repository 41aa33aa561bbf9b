# Helpers shared by every rule: config validation, wildcard constraints and input functions.
from pathlib import Path

from normres.config import RunSpec, expand_runs, run_dir, run_settings, validate_config
from normres.specs import figure_names

# Validate before any job starts: one message naming the key, the bad value and what is allowed.
config = validate_config(config)
RUNS = expand_runs(config)


wildcard_constraints:
    study=r"[A-Za-z][A-Za-z0-9]*",
    norm=r"torch_bn|bn|in|bin|ln|gn|nn",
    depth=r"\d+",
    batch_size=r"\d+",
    seed=r"\d+",
    dataset=r"cifar10|mnist|fashion_mnist",


RUN_DIR = "results/runs/{study}/{norm}/n{depth}_b{batch_size}/seed{seed}"


def spec_of(wildcards):
    return RunSpec(
        wildcards.study,
        wildcards.norm,
        int(wildcards.depth),
        int(wildcards.batch_size),
        int(wildcards.seed),
    )


def get_run_settings(wildcards):
    """The settings this run depends on (a change reruns just the runs it touches)."""
    return run_settings(config, spec_of(wildcards))


def get_dataset_file(wildcards):
    return f"resources/{config['studies'][wildcards.study]['dataset']}/data.pt"


def get_raw_root(wildcards):
    return f"resources/{wildcards.dataset}/raw"


def get_data_mirrors(wildcards):
    return [str(Path(m).expanduser()) for m in config["data"]["mirrors"]]


def runs_of(study=None):
    return [r for r in RUNS if study is None or r.study == study]


def get_run_files(name, study=None):
    """``name`` (e.g. metrics.csv) of every run, or of one study's runs."""

    def inputs(wildcards):
        return [str(r.run_dir / name) for r in runs_of(study)]

    return inputs


def conditions(study):
    """One run per condition (its first seed): the run whose errors the grids show."""
    first = {}
    for r in runs_of(study):
        first.setdefault((r.norm, r.depth, r.batch_size), r)
    return sorted(first.values())


def misclassified_figures(study):
    return [
        f"results/figures/misclassified/{study}/{r.norm}_n{r.depth}_b{r.batch_size}.png"
        for r in conditions(study)
    ]


def get_figures(wildcards=None):
    figures = [
        f"results/figures/{name}.png" for name in figure_names(config["studies"])
    ]
    for study in config["studies"]:
        figures += misclassified_figures(study)
    return figures


def get_misclassified_inputs(wildcards):
    seed = min(r.seed for r in runs_of(wildcards.study))
    d = run_dir(
        wildcards.study, wildcards.norm, wildcards.depth, wildcards.batch_size, seed
    )
    return {
        "predictions": str(d / "predictions.csv"),
        "data": get_dataset_file(wildcards),
    }


def get_final_outputs(wildcards):
    return ["results/report.html"]
