"""Stage `cache_features`: the frozen teacher's features of fixed, seeded training views, written once.

    python -m restok.stages.cache_features --params params.yaml --shards data/shard --out data/cache_features \
        --results results/cache_features
    RESTOK_NPROC_PER_NODE=8 python -m restok.stages.cache_features ...     # one process per GPU, shards split

VF alignment (docs/method.md, training-and-eval §2.5, tokenizer §5) needs the teacher's CLS vector and patch tokens of the
exact view the tokenizer sees. Instead of running DINOv3 inside every training step (as the official code does),
each train image gets `cache_features.views_per_image` views drawn once from a generator seeded by
(cache_features.seed, image key) with `restok.data.views.train_view_boxes` (the training crop + flip, docs/method.md, training-and-eval §3.1).
Each view is cut at the training resolution (`apply_view`) and resized for the teacher to 16 * vf.grid px, so the
teacher's patch grid equals the tokenizer's image-token grid; `train_tokenizer` picks one cached view per sample
and step (seeded) and crops exactly that view.

Output `data/cache_features/`: one tar per train image shard, same file name, samples keyed by the image's
`__key__` in the same order, with
    views.npy    (V, 4) int32: left, top, side, flip in stored-image pixels (restok.data.views)
    cls.npy      (V, D) float16: teacher CLS token
    patches.npy  (V, grid*grid, D) float16: teacher patch tokens, row-major grid
and `manifest.json` (teacher, weights provenance, grid, dim, views, per-shard counts and sha256, the image shards'
sha256 they were computed from). With `vf.mode: online` no features are cached and the manifest says so (the
graph keeps the same shape; train_tokenizer then runs the teacher itself).

Disk cost (written to results/cache_features/summary.json and printed): views x (1 + grid^2) x D x 2 bytes per
image. At ImageNet scale with ViT-L/16 at 256 px that is 1,281,167 images x V x (1 + 16*16) x 1024 x 2 bytes =
674 GB per view per image: 5.4 TB for the imagenet256 profile's 8 views, 6.7 TB for 10. The default profile
(3,000 images, EfficientNet-Lite0's 112-channel stride-16 map at 8x8, 1 view) needs about 44 MB. An empty train
split (shard.splits without train, as in the official-l profile) caches nothing either.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from restok.config.features import CacheFeatures, Vf
from restok.config.load import stage_args
from restok.data.features import FIELDS, FORMAT, npy_bytes
from restok.data.shards import MANIFEST, iter_split, read_manifest, shard_paths
from restok.data.views import apply_view, train_view_boxes
from restok.hashing import sha256_file
from restok.io import write_json_atomic
from restok.launch import relaunch_if_requested
from restok.models.teacher import build_teacher
from restok.provenance import write_results
from restok.train import dist
from restok.train.log import console, print0, progress

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "vf": Vf, "cache_features": CacheFeatures}
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VIT_L = {"dim": 1024, "grid": 16}


def view_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one image's views: (seed, image key), independent of shard order and process count."""
    digest = hashlib.sha256(key.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def feature_bytes(views: int, grid: int, dim: int) -> int:
    """Bytes of one image's cached features (fp16 CLS + patch tokens), without the tar overhead."""
    return views * (1 + grid * grid) * dim * 2


@torch.no_grad()
def cache_shard(shard_dir: str, image_shard: str, dest: Path, teacher, p, res: int, device: torch.device) -> dict:
    """Teacher features of every image of one train shard -> `dest` (written atomically); returns its entry."""
    cfg, grid = p.cache_features, (p.vf.grid, p.vf.grid)
    per_batch = max(1, cfg.batch_size // cfg.views_per_image)  # images per teacher batch
    tmp = dest.with_name(dest.name + ".tmp")
    count = 0

    def flush(pending, sink):
        views = torch.stack([v for _, _, imgs in pending for v in imgs]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls, patches = teacher(views.float() / 255, grid=grid)  # (n*V, D), (n*V, P, D)
        cls = cls.to(torch.float16).cpu().view(len(pending), cfg.views_per_image, -1).numpy()
        patches = patches.to(torch.float16).cpu().view(len(pending), cfg.views_per_image, *patches.shape[1:]).numpy()
        for i, (key, boxes, _) in enumerate(pending):
            sink.write(
                {
                    "__key__": key,
                    FIELDS[0]: npy_bytes(boxes.astype(np.int32)),
                    FIELDS[1]: npy_bytes(cls[i]),
                    FIELDS[2]: npy_bytes(patches[i]),
                }
            )

    with wds.TarWriter(str(tmp), mtime=0) as sink:
        pending = []
        for key, img, _ in iter_split(shard_dir, "train", [image_shard]):
            key = key.rsplit("/", 1)[-1]  # iter_split prefixes the shard name; the tar key is the image's own
            boxes = train_view_boxes(img.size, res, cfg.views_per_image, view_rng(cfg.seed, key))  # (V, 4)
            pending.append((key, boxes, [apply_view(img, box, res) for box in boxes]))
            count += 1
            if len(pending) == per_batch:
                flush(pending, sink)
                pending = []
        if pending:
            flush(pending, sink)
    os.replace(tmp, dest)
    return {
        "path": dest.name,
        "image_shard": Path(image_shard).name,
        "samples": count,
        "bytes": dest.stat().st_size,
        "sha256": sha256_file(dest),
    }


def imagenet_cost(views: int) -> dict:
    per_image = feature_bytes(views, IMAGENET_VIT_L["grid"], IMAGENET_VIT_L["dim"])
    return {
        "images": IMAGENET_TRAIN_IMAGES,
        "views_per_image": views,
        "tokens_per_view": 1 + 16 * 16,
        "dim": IMAGENET_VIT_L["dim"],
        "bytes": IMAGENET_TRAIN_IMAGES * per_image,
        "terabytes": round(IMAGENET_TRAIN_IMAGES * per_image / 1e12, 3),
        "formula": "1,281,167 x views x (1 + 16*16) x 1024 x 2 bytes (ViT-L/16 at 256 px, fp16)",
    }


def main(argv=None):
    relaunch_if_requested("restok.stages.cache_features", argv)
    args, p = stage_args(
        __doc__, PARAMS, argv, shards="data/shard", out="data/cache_features", results="results/cache_features"
    )
    vf, cfg = p.vf, p.cache_features
    image_manifest = read_manifest(args.shards, "train")
    res = image_manifest["resolution"]
    teacher = None
    if vf.mode == "cache" and image_manifest["num_samples"] > 0:
        teacher = build_teacher(
            vf.teacher, vf.weights, params_key="vf.weights", revision=vf.revision, sha256=vf.sha256
        )  # MissingWeightsError before any work
    info = dist.init_distributed(cfg.device)
    out, results = Path(args.out), Path(args.results)
    if info.is_main and out.exists():
        shutil.rmtree(out)  # a stage starting over never mixes in a previous run's shards
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    base = {
        "format": FORMAT,
        "teacher": vf.teacher,
        "mode": vf.mode,
        "resolution": res,
        "image_shards_manifest_sha256": sha256_file(Path(args.shards) / "train" / MANIFEST),
    }
    if teacher is None:
        reason = (
            "vf.mode is 'online': train_tokenizer runs the teacher on each training view"
            if vf.mode == "online"
            else f"the train split is empty ({image_manifest.get('left_out', 'no images')})"
        )
        manifest = {
            **base,
            "cached": False,
            "weights": vf.weights,
            "reason": reason,
            "shards": [],
            "num_samples": 0,
            "bytes": 0,
        }
    else:
        teacher = teacher.to(info.device)
        paths = shard_paths(args.shards, image_manifest)
        mine = paths[info.rank :: info.world_size]
        entries = []
        with progress(len(mine), "cache_features shards") as bar:
            for path in mine:
                dest = out / f"{Path(path).stem}.tar"
                entries.append(cache_shard(args.shards, path, dest, teacher, p, res, info.device))
                bar.advance(1)
        gathered = [entries]
        if dist.is_dist():
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, entries)
        order = {Path(path).name: i for i, path in enumerate(paths)}
        entries = sorted((e for part in gathered for e in part), key=lambda e: order[e["image_shard"]])
        manifest = {
            **base,
            "cached": True,
            "weights": teacher.provenance["weights"],
            "provenance": teacher.provenance,
            "grid": vf.grid,
            "dim": teacher.feat_dim,
            "patch_tokens": vf.grid * vf.grid,
            "views_per_image": cfg.views_per_image,
            "seed": cfg.seed,
            "dtype": "float16",
            "fields": list(FIELDS),
            "view_layout": "left, top, side, flip (stored px)",
            "shards": entries,
            "num_samples": sum(e["samples"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
        }
    seconds = time.time() - t0
    if info.is_main:
        write_json_atomic(out / MANIFEST, manifest)
        ext = imagenet_cost(cfg.views_per_image)
        summary = {
            "cached": manifest["cached"],
            "images": manifest["num_samples"],
            "views_per_image": cfg.views_per_image if manifest["cached"] else 0,
            "bytes_on_disk": manifest["bytes"],
            "megabytes_on_disk": round(manifest["bytes"] / 1e6, 2),
            "imagenet_extrapolation": {k: v for k, v in ext.items() if k != "formula"},
        }
        provenance = {
            "profile": p.profile,
            "teacher": vf.teacher,
            "weights": manifest["weights"],
            "mode": vf.mode,
            "seconds": round(seconds, 2),
            "world_size": info.world_size,
            "imagenet_extrapolation_formula": ext["formula"],
        }
        if manifest["cached"]:
            provenance["views_per_second"] = round(
                manifest["num_samples"] * cfg.views_per_image / max(seconds, 1e-9), 2
            )
            summary["grid"], summary["dim"] = vf.grid, manifest["dim"]
        results.mkdir(parents=True, exist_ok=True)
        write_results(results / "summary.json", summary, provenance, info.device)
        console.print(
            f"cache_features: {summary['images']} images, {summary['megabytes_on_disk']} MB in "
            f"{provenance['seconds']} s (teacher {vf.teacher}, weights {manifest['weights']}); at ImageNet "
            f"scale with ViT-L/16 at 256 px and {cfg.views_per_image} views: {ext['terabytes']} TB"
        )
    print0(f"cache_features: wrote {out / MANIFEST}")
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    main()
