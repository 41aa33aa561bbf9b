"""Snakemake glue: every norm against its study's reference norm, paired by seed."""

import pandas as pd

from normres.io import log_to
from normres.significance import write_comparisons

with log_to(snakemake.log[0]) as log:
    table = write_comparisons(
        pd.read_csv(snakemake.input.runs),
        snakemake.params.references,
        snakemake.output[0],
        norm_order=snakemake.params.norm_order,
    )
    log(f"wrote {len(table)} comparisons")
