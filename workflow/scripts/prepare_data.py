"""Snakemake glue: fetch, verify and prepare one dataset as uint8 tensors."""

from normres.datasets import prepare_dataset
from normres.io import log_to

with log_to(snakemake.log[0]) as log:
    path = prepare_dataset(
        snakemake.wildcards.dataset,
        root=snakemake.params.root,
        out=snakemake.output[0],
        mirrors=snakemake.params.mirrors,
        download=snakemake.params.download,
    )
    log(f"prepared {path}")
