"""Snakemake glue: the runs table, the summary over seeds, all histories and robustness rows."""

from pathlib import Path

from normres.aggregate import write_tables
from normres.io import log_to

with log_to(snakemake.log[0]) as log:
    runs = write_tables(
        [Path(p).parent for p in snakemake.input.records],
        snakemake.output.runs,
        snakemake.output.summary,
        snakemake.output.histories,
        snakemake.output.robustness,
    )
    log(f"aggregated {len(runs)} runs")
