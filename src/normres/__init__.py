"""normres: a reproducible Snakemake study of normalization layers in deep CNNs."""

__version__ = "0.2.0"
