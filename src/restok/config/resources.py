"""Params section `resources`: per-rule compute for Snakemake (local and SLURM)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from restok.config.engine import rng


@dataclass(frozen=True)
class RuleResources:
    """Compute resources of one Snakemake rule (also what the SLURM profiles request)."""

    gpus: int = field(default=0, metadata=rng(0, 64, help="GPUs per node (torchrun --nproc_per_node)"))
    nodes: int = field(default=1, metadata=rng(1, 1024, help="nodes (torchrun --nnodes)"))
    cpus: int = field(default=2, metadata=rng(1, 1024, help="CPU cores per node"))
    mem_mb: int = field(default=4000, metadata=rng(100, help="memory per node in MB"))
    runtime: int = field(default=60, metadata=rng(1, help="wall-clock limit in minutes"))


STAGES = (
    "shard",
    "cache_features",
    "train_tokenizer",
    "extract_latents",
    "train_generator",
    "sample",
    "reference_stats",
    "score",
    "cfg_search",
)
Resources = dataclasses.make_dataclass(
    "Resources", [(name, RuleResources, field(default=RuleResources())) for name in STAGES], frozen=True
)
Resources.__doc__ = "Per-rule compute for Snakemake (local and SLURM). DVC does not read it."
