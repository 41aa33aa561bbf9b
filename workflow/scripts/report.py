"""Snakemake glue: the self-contained HTML report."""

from pathlib import Path

import pandas as pd

from normres.io import log_to, read_json
from normres.report import build_report, collect_provenance

with log_to(snakemake.log[0]) as log:
    figures = {Path(p).relative_to("results/figures").with_suffix("").as_posix(): p for p in snakemake.input.figures}
    build_report(
        runs=pd.read_csv(snakemake.input.runs),
        summary=pd.read_csv(snakemake.input.summary),
        figures=figures,
        provenance=collect_provenance([read_json(p) for p in snakemake.input.records]),
        setup=snakemake.params.studies,
        out=snakemake.output[0],
    )
    log(f"wrote {snakemake.output[0]}")
