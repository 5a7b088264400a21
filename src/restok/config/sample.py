"""Params section `sample`: how many images, with which sampling config, on what."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from restok.config.engine import rng
from restok.sampling_config import SamplingConfig


@dataclass(frozen=True)
class Sample:
    per_class: int = field(default=50, metadata=rng(1, help="images per class (class-balanced)"))
    batch_size: int = field(default=50, metadata=rng(1))
    seed: int = field(default=0, metadata=rng(0, help="image i uses seed + i: same images on any process count"))
    sampling: SamplingConfig = SamplingConfig()
    grid_per_class: int = field(default=8, metadata=rng(1, help="images per class in the PNG grid"))
    untrained_baseline: bool = field(
        default=True,
        metadata=rng(
            help=(
                "also sample the same images from a freshly initialised generator of the same config (untrained.npz); "
                "score measures its gFID with the same extractor, the baseline of checks.gfid_over_untrained"
            )
        ),
    )
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto",
        metadata=rng(
            help=(
                "the generator's passes under bf16 autocast with a bf16 KV cache, or fp32; auto: bf16 on CUDA, fp32 on CPU "
                "(where a sample's codes are then bit-exact on any batch split). Decoding is fp32 always"
            )
        ),
    )
    compile: bool = field(
        default=False,
        metadata=rng(
            help=(
                "torch.compile of the generator's cached pass, one graph per block size; on CUDA each replays as a CUDA "
                "graph (mode reduce-overhead) over the static KV cache"
            )
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
