"""Params section `extract_latents`: the views of each train image encoded into codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from restok.config.engine import rng


@dataclass(frozen=True)
class ExtractLatents:
    views: Literal["ten_crop", "center_flip"] = field(
        default="ten_crop",
        metadata=rng(help="ten_crop: 10 views per train image (paper); center_flip: centre crop and its flip"),
    )
    crop_range: float = field(default=1.1, metadata=rng(1.0, 2.0, help="ten_crop: crop from floor(res * this)"))
    batch_size: int = field(default=64, metadata=rng(1))
    device: Literal["auto", "cpu", "cuda"] = "auto"
