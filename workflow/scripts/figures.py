"""Snakemake glue: the study's figures (normres.registry.FIGURES) from the aggregated tables."""

from normres.io import log_to
from normres.plots import Tables, draw_figures

with log_to(snakemake.log[0]) as log:
    tables = Tables.read(snakemake.input, snakemake.params.norm_order)
    written = draw_figures(tables, snakemake.params.figures)
    log(f"wrote {len(written)} figures")
