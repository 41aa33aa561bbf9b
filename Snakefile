# normres: a reproducible study of normalization layers in deep CNNs.
#
# Results path convention (docs/architecture.md):
#   resources/{dataset}/data.pt, corrupted.pt                           prepared uint8 tensors
#   results/runs/{study}/{norm}/n{depth}_b{batch_size}/seed{seed}/      model, history, metrics, predictions, robustness
#   results/{runs,summary,histories,robustness,comparisons}.csv         aggregated over runs and seeds
#   results/figures/...                                                 figures
#   results/report.html                                                 the self-contained report
from snakemake.utils import min_version

min_version("9.0")


# The default study, unless a study was given with --configfile (which then runs alone).
if "studies" not in config:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


# Quick bookkeeping runs on the submit host, never as cluster jobs.
localrules:
    all,
    prepare_data,
    corrupt,
    aggregate,
    compare,
    figures,
    misclassified,
    report,


rule all:
    input:
        get_final_outputs,
