"""Snakemake glue: test one trained run into predictions.csv and metrics.csv."""

from normres.config import BnStatisticsSettings, RunSettings
from normres.evaluate import evaluate_run
from normres.io import log_to

with log_to(snakemake.log[0]) as log:
    bn = snakemake.params.bn_statistics
    metrics = evaluate_run(
        RunSettings.from_dict(snakemake.params.settings),
        snakemake.input.model,
        snakemake.input.data,
        snakemake.output.predictions,
        snakemake.output.metrics,
        bn_statistics=BnStatisticsSettings(**bn) if bn else None,
        threads=snakemake.threads,
    )
    log(f"\n{metrics.to_string(index=False)}")
