"""restok-pipeline: ResTok tokenizer + HAR generator (arXiv 2601.03955) as a DVC/Snakemake workflow."""

__version__ = "0.1.0"
