"""Snakemake glue: train one run (torch threads follow the rule's `threads`)."""

from pathlib import Path

from normres.config import RunSettings
from normres.io import log_to
from normres.train import train_run

with log_to(snakemake.log[0]) as log:
    train_run(
        RunSettings.from_dict(snakemake.params.settings),
        snakemake.input.data,
        Path(snakemake.output.model).parent,
        threads=snakemake.threads,
        log=log,
        standalone=True,
    )
