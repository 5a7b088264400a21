"""Params sections `data` (where images come from) and `shard` (how they are stored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from restok.config.engine import rng


@dataclass(frozen=True)
class BuiltinData:
    """The synthetic class-conditional dataset (restok.data.builtin)."""

    train_per_class: int = field(default=300, metadata=rng(1, help="training images per class"))
    val_per_class: int = field(default=100, metadata=rng(1, help="validation images per class"))
    seed: int = field(default=0, metadata=rng(0, help="generator seed: same seed, same images"))


@dataclass(frozen=True)
class WdsData:
    """Existing webdataset shards (data.source: wds), e.g. the public imagenet-1k-wds layout."""

    train: str | None = field(default=None, metadata=rng(help="brace pattern of the train shards"))
    val: str | None = field(default=None, metadata=rng(help="brace pattern of the validation shards"))


@dataclass(frozen=True)
class Data:
    source: Literal["builtin", "imagenet", "folder", "wds"] = field(
        default="builtin", metadata=rng(help="where images come from")
    )
    root: str | None = field(
        default=None,
        metadata=rng(
            help="imagenet: the ILSVRC2012 folder (train/<wnid>/*.JPEG, val/); folder: a class-per-folder tree"
        ),
    )
    val_labels: str | None = field(
        default=None,
        metadata=rng(help="imagenet with a flat val/ folder: LOC_val_solution.csv or a 'file label' text file"),
    )
    val_fraction: float = field(
        default=0.1,
        metadata=rng(
            0.0,
            0.9,
            help=("folder source without train/ and val/ subfolders: share of each class held out for validation"),
        ),
    )
    resolution: int = field(default=64, metadata=rng(16, 1024, help="training/eval image side in pixels"))
    num_classes: int = field(default=10, metadata=rng(2, 1000, help="builtin: classes to generate; others: checked"))
    builtin: BuiltinData = BuiltinData()
    wds: WdsData = WdsData()

    def __post_init__(self):
        if self.source in ("imagenet", "folder") and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}")
        if self.source == "wds" and not (self.wds.train and self.wds.val):
            raise ValueError("data.wds.train and data.wds.val are required for data.source='wds'")
        if self.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8, got {self.resolution}")


@dataclass(frozen=True)
class Shard:
    samples_per_shard: int = field(default=1000, metadata=rng(1, help="images per tar shard"))
    workers: int = field(default=2, metadata=rng(1, 256, help="CPU processes encoding shards in parallel"))
    image_format: Literal["png", "jpg"] = field(default="png", metadata=rng(help="encoding of stored images"))
    jpeg_quality: int = field(default=95, metadata=rng(50, 100, help="JPEG quality when image_format is jpg"))
    shuffle_seed: int = field(default=0, metadata=rng(0, help="order of train images across shards"))
    splits: list[Literal["train", "val"]] = field(
        default_factory=lambda: ["train", "val"],
        metadata=rng(
            help=(
                "splits to shard; a split left out gets an empty manifest (the official-l profile evaluates released "
                "checkpoints and needs val only)"
            )
        ),
    )
    max_image_pixels: int = field(
        default=100_000_000,
        metadata=rng(
            1,
            help=(
                "larger images (width x height, read from the header) are not decoded but skipped and listed in the "
                "manifest: a decompression-bomb guard; so are images that would be larger once resized to the stored "
                "short side (an extreme aspect ratio: a 1 x 100000 strip would become 320 x 32,000,000 at res 256)"
            ),
        ),
    )
    alpha_background: list[int] = field(
        default_factory=lambda: [255, 255, 255],
        metadata=rng(help=("R, G, B (0..255) the transparent parts of an image are composited on")),
    )

    def __post_init__(self):
        if len(self.alpha_background) != 3 or not all(0 <= v <= 255 for v in self.alpha_background):
            raise ValueError(
                f"shard.alpha_background must be 3 values (R, G, B) in 0..255, got {self.alpha_background}"
            )
