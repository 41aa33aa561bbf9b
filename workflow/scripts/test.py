"""Snakemake glue: test one trained run into predictions.csv and metrics.csv."""

from normres.evaluate import evaluate_run
from normres.io import log_to

with log_to(snakemake.log[0]) as log:
    metrics = evaluate_run(
        snakemake.input.model,
        snakemake.input.record,
        snakemake.input.data,
        snakemake.output.predictions,
        snakemake.output.metrics,
        threads=snakemake.threads,
    )
    log(f"\n{metrics.to_string(index=False)}")
