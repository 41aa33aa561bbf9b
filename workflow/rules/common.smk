# Helpers shared by every rule: config validation, wildcard constraints and input functions.
import re
import sys
from pathlib import Path

import snakemake.io as smk_io  # its report(): a line starting with `report` is a directive

from normres import registry as R
from normres.captions import caption_path
from normres.config import RunSpec, run_dir, validate_config
from normres.device import local_gpus
from normres.errors import USER_ERRORS

# Validate before any job starts: one message naming the key, the bad value and what is allowed
# (and nothing else: no traceback). User layers' paths are relative to the config file naming them.
try:
    CONFIG = validate_config(
        config,
        Path(workflow.configfiles[-1]).parent if workflow.configfiles else Path("."),
    )
except USER_ERRORS as exc:
    sys.exit(str(exc))
RUNS = CONFIG.runs()


wildcard_constraints:
    study=r"[A-Za-z][A-Za-z0-9]*",
    norm="|".join(map(re.escape, CONFIG.norms)),
    depth=r"\d+",
    batch_size=r"\d+",
    seed=r"\d+",
    dataset="|".join(map(re.escape, R.DATASETS)),


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
    return CONFIG.run_settings(spec_of(wildcards)).to_dict()


def get_bn_statistics(wildcards):
    """The batch-statistics analysis of a run, or None for layers without running statistics."""
    spec = spec_of(wildcards)
    if not CONFIG.has_bn_statistics(spec):
        return None
    return vars(CONFIG.bn_statistics_settings(spec))


def get_robustness(wildcards):
    settings = CONFIG.robustness_settings(wildcards.study)
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()
    }


def get_dataset_file(wildcards):
    return f"resources/{CONFIG.study(wildcards.study)['dataset']}/data.pt"


def get_corrupted_file(wildcards):
    return f"resources/{CONFIG.study(wildcards.study)['dataset']}/corrupted.pt"


def get_corrupted_images(wildcards):
    """Test images to corrupt: as many as the studies on this dataset evaluate (all corruptions
    and severities, built once; every run sees the same images)."""
    return max(
        CONFIG.robustness_settings(s).images
        for s, study in CONFIG.studies.items()
        if study["dataset"] == wildcards.dataset and CONFIG.has_robustness(s)
    )


def get_raw_root(wildcards):
    return f"resources/{wildcards.dataset}/raw"


def get_data_mirrors(wildcards):
    return [str(Path(m).expanduser()) for m in CONFIG.data["mirrors"]]


def train_gpus():
    """One GPU per training job where this machine has NVIDIA GPUs (limit local GPU runs with
    --resources gpu=N); the SLURM profile sets it itself."""
    return 1 if local_gpus() else 0


def get_norm_descriptions():
    """Name, title, what it normalizes over and citation of every layer the studies use."""
    used = dict.fromkeys(n for s in CONFIG.studies for n in CONFIG.study_norms(s))
    return {
        name: {
            k: getattr(CONFIG.norms[name], k)
            for k in (
                "title",
                "normalizes_over",
                "description",
                "citation",
                "batch_dependent",
                "running_stats",
            )
        }
        for name in used
    }


def runs_of(study=None):
    return [r for r in RUNS if study is None or r.study == study]


def get_run_files(name, study=None):
    """``name`` (e.g. metrics.csv) of every run, or of one study's runs."""

    def inputs(wildcards):
        return [str(r.run_dir / name) for r in runs_of(study)]

    return inputs


def get_robustness_files(wildcards):
    return [
        str(r.run_dir / "robustness.csv")
        for r in RUNS
        if CONFIG.has_robustness(r.study)
    ]


def get_references():
    return {study: CONFIG.reference_norm(study) for study in CONFIG.studies}


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


def figure_files():
    """(figure definition, study or None, path) of every figure that applies to the config."""
    return [
        (f, study, f"results/figures/{name}")
        for f, study, name in R.figures_for(CONFIG.studies, CONFIG.norms)
    ]


def figure_outputs():
    """The figures rule's outputs, each flagged for Snakemake's report with its caption."""
    return [
        smk_io.report(
            path,
            caption=caption_path(f.caption),
            category=study or "all studies",
            subcategory=f.category,
            labels={"study": study or "all", "figure": f.name},
        )
        for f, study, path in figure_files()
    ]


def get_figures(wildcards=None):
    figures = [path for _, _, path in figure_files()]
    for study in CONFIG.studies:
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
