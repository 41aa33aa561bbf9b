"""Snakemake glue: the standard figures from the aggregated tables."""

from pathlib import Path

import pandas as pd

from normres.io import log_to
from normres.plots import study_figures

with log_to(snakemake.log[0]) as log:
    written = study_figures(
        pd.read_csv(snakemake.input.histories),
        pd.read_csv(snakemake.input.runs),
        pd.read_csv(snakemake.input.summary),
        Path(snakemake.output[0]).parent,
    )
    log(f"wrote {len(written)} figures")
