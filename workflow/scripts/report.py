"""Snakemake glue: the self-contained HTML report."""

from normres.io import log_to
from normres.report import report_from_files

with log_to(snakemake.log[0]) as log:
    report_from_files(
        runs=snakemake.input.runs,
        summary=snakemake.input.summary,
        comparisons=snakemake.input.comparisons,
        records=snakemake.input.records,
        figures=snakemake.input.figures,
        config=snakemake.params.config,
        norms=snakemake.params.norms,
        out=snakemake.output[0],
    )
    log(f"wrote {snakemake.output[0]}")
