"""Snakemake glue: one run's accuracy on the corrupted test images, before and after adaptation."""

from normres.config import RobustnessSettings, RunSettings
from normres.io import log_to
from normres.robustness import evaluate_robustness

with log_to(snakemake.log[0]) as log:
    table = evaluate_robustness(
        RunSettings.from_dict(snakemake.params.settings),
        RobustnessSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in snakemake.params.robustness.items()}),
        snakemake.input.model,
        snakemake.input.data,
        snakemake.input.corrupted,
        snakemake.output[0],
        threads=snakemake.threads,
        log=log,
    )
    log(f"wrote {len(table)} rows to {snakemake.output[0]}")
