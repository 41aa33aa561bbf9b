"""Snakemake glue: corrupted copies of a dataset's test images (every corruption and severity)."""

from normres.io import log_to
from normres.robustness import corrupt_dataset

with log_to(snakemake.log[0]) as log:
    corrupt_dataset(snakemake.input[0], snakemake.output[0], snakemake.params.images, threads=snakemake.threads, log=log)
