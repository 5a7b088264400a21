"""FID plumbing shared by `reference_stats`, `score` and `cfg_search`: the extractor named by params `fid`, batched
feature extraction with progress, and the reference statistics file (data/reference_stats/stats.npz).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from restok.data.shards import iter_split_uint8, read_manifest
from restok.metrics import Features, InceptionExtractor
from restok.train.log import progress

PROVENANCE_KEYS = ("extractor", "extractor_weights", "extractor_weights_sha256")


def fid_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def build_extractor(fid) -> InceptionExtractor:
    """The extractor named by params `fid`; missing real weights raise here, before any work."""
    if fid.reference == "adm" and fid.extractor.endswith("random-init"):
        raise ValueError(
            f"fid.reference 'adm' needs the real Inception weights (fid.extractor "
            f"'inception-v3-compat' or 'inception-v3-compat-fid-helper'), got {fid.extractor!r}"
        )
    return InceptionExtractor(
        fid.extractor, weights_file=fid.weights, device=fid_device(fid.device), weights_sha256=fid.weights_sha256
    )


def batches(images: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack (3, H, W) uint8 images into (B, 3, H, W) batches."""
    batch = []
    for img in images:
        batch.append(img)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def val_images(shard_dir: str | Path, labels: list[int] | None = None) -> tuple[int, Iterator[torch.Tensor]]:
    """(count, iterator of (3, H, W) uint8 val images in shard order); each image's label is appended to `labels`
    (when given) as the image is consumed."""

    def images():
        for _, img, label in iter_split_uint8(shard_dir, "val"):
            if labels is not None:
                labels.append(label)
            yield img

    return read_manifest(shard_dir, "val")["num_samples"], images()


def extract(
    extractor: InceptionExtractor, images: Iterator[torch.Tensor], count: int, batch_size: int, desc: str
) -> Features:
    """Inception features of uint8 images, with a progress bar in images/s."""

    def tracked():
        with progress(count, desc) as bar:
            for batch in batches(images, batch_size):
                yield batch
                bar.advance(len(batch))

    return extractor.extract(tracked())


def load_stats(path: str | Path, extractor: str) -> dict:
    """stats.npz as a dict, refused unless it was made by `extractor` (params fid.extractor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the reference_stats stage first")
    with np.load(path) as npz:
        stats = {key: npz[key].item() if npz[key].ndim == 0 else npz[key] for key in npz.files}
    if stats["extractor"] != extractor:
        raise ValueError(
            f"{path} was computed with extractor {stats['extractor']!r} but params fid.extractor is "
            f"{extractor!r}; rerun reference_stats with the same extractor"
        )
    return stats
