"""Snakemake glue: the 5x2 grid of the most confidently misclassified test images of one model."""

import pandas as pd

from normres.datasets import load_prepared
from normres.io import log_to
from normres.plots import render_misclassified

with log_to(snakemake.log[0]) as log:
    w = snakemake.wildcards
    data = load_prepared(snakemake.input.data)
    render_misclassified(
        pd.read_csv(snakemake.input.predictions),
        data.test_x,
        data.classes,
        f"{w.study}: {w.norm} (depth n={w.depth}, batch {w.batch_size}): misclassified test images",
        snakemake.output[0],
    )
    log(f"wrote {snakemake.output[0]}")
