"""Stage `extract_latents`: encode every image once with the frozen EMA tokenizer into a code cache.

    python -m restok.stages.extract_latents --params params.yaml --shards data/shard \
        --tokenizer data/train_tokenizer/tokenizer.pt --out data/extract_latents --results results/extract_latents

docs/method.md, generator §7. Train images are encoded under the paper's views (`ten_crop`: ADM centre crop to
floor(res * crop_range), its 4 corners and centre at res, and the same of the flipped image; `center_flip`: the eval
view and its flip); val images under the eval view only (one view, for the generator's val loss). The tokenizer is
rebuilt from the config stored in tokenizer.pt and runs in eval mode in fp32 (TF32 matmuls allowed on CUDA).

Per split, `data/extract_latents/<split>/` holds `codes.npy` (N x views x L, the smallest integer dtype that holds
the codebook), `labels.npy` (N,) int64 and `meta.json` (written last). The run is resumable after kill -9, also
under DVC and Snakemake, which delete a stage's outputs before running it: the work happens in the sibling folder
`<out>.partial/` (data/extract_latents.partial, no orchestrator's output), codes going into `codes.npy.partial` (a
memmap, flushed before `progress.json` records how many images are done), renamed when the split is complete; when
both splits are, they move into `<out>/` and the sibling folder is removed. Batches always start at multiples of
`batch_size` images, so a resumed run encodes the same batches as an uninterrupted one and writes identical files.
`results/extract_latents/summary.json` has code usage and entropy per level (pooled over a level's positions), the
per-position entropy per level and its conditional given the class (`per_position`,
restok.metrics.position_entropy), throughput and the tokenizer's provenance.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from restok.artifacts import load_tokenizer
from restok.config.latents import ExtractLatents
from restok.config.load import stage_args
from restok.cpus import loader_workers
from restok.data.shards import decode_image, read_manifest, shard_paths
from restok.data.views import eval_view, ten_crop_views, to_uint8_tensor
from restok.hashing import sha256_file
from restok.io import write_json_atomic
from restok.metrics import codebook_stats, position_entropy
from restok.models.tokenizer import ResTok
from restok.provenance import write_results
from restok.train.log import console, progress

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "extract_latents": ExtractLatents}
SPLITS = ("train", "val")
NUM_VIEWS = {"ten_crop": 10, "center_flip": 2, "eval": 1}
STATS_MAX_SEQUENCES = 1 << 18  # code statistics over at most this many sequences (evenly spaced images, all views)


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer dtype holding codes 0..codebook_size-1: uint8, uint16 or int32."""
    for dtype in (np.uint8, np.uint16, np.int32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"codebook_size={codebook_size} does not fit in int32")


def image_views(img: Image.Image, kind: str, res: int, crop_range: float) -> torch.Tensor:
    """(V, 3, res, res) uint8 views of a stored image: ten_crop, center_flip (eval view + flip) or eval."""
    if kind == "ten_crop":
        return ten_crop_views(img, res, crop_range)
    view = to_uint8_tensor(eval_view(img, res))  # (3, res, res); val images are stored in it already
    return torch.stack([view, view.flip(-1)]) if kind == "center_flip" else view[None]


class ViewBatches(torch.utils.data.IterableDataset):
    """Batches (first image index, views (b, V, 3, res, res) uint8, labels (b,)) of a split, in shard order,
    starting at image `start` (a multiple of `batch`). Worker w decodes only batches w, w + W, ..., so the
    DataLoader's round-robin returns them in order."""

    def __init__(self, shard_dir: Path, split: str, kind: str, crop_range: float, batch: int, start: int):
        super().__init__()
        self.manifest = read_manifest(shard_dir, split)
        self.paths = shard_paths(shard_dir, self.manifest)
        self.split, self.kind, self.crop_range, self.batch, self.start = split, kind, crop_range, batch, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        res = self.manifest["resolution"]
        index, pending = 0, []
        for path, entry in zip(self.paths, self.manifest["shards"]):
            if index + entry["samples"] <= self.start:  # a shard that is done already: not even read
                index += entry["samples"]
                continue
            for sample in wds.WebDataset(path, shardshuffle=False, empty_check=False):
                mine = index >= self.start and ((index - self.start) // self.batch) % workers == worker
                if mine:
                    img = decode_image(sample)
                    pending.append((image_views(img, self.kind, res, self.crop_range), int(sample["cls"])))
                index += 1
                if mine and len(pending) == self.batch:
                    yield self._collate(index - self.batch, pending)
                    pending = []
        if pending:
            yield self._collate(index - len(pending), pending)

    @staticmethod
    def _collate(first: int, items: list) -> tuple[int, torch.Tensor, torch.Tensor]:
        return first, torch.stack([v for v, _ in items]), torch.tensor([c for _, c in items])


def _clear(split_dir: Path) -> None:
    """Remove this stage's outputs and partial files of one split (a fresh start)."""
    for name in ("codes.npy", "labels.npy", "meta.json", "codes.npy.partial", "labels.npy.partial", "progress.json"):
        (split_dir / name).unlink(missing_ok=True)


def work_dir(out: Path) -> Path:
    """Where a run keeps its resumable state: beside `out`, which DVC and Snakemake delete before a run."""
    return out.with_name(out.name + ".partial")


def publish(out: Path, work: Path) -> None:
    """Move the complete splits from the work folder into `out` (each replaced whole) and remove the work folder."""
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        if (out / split).exists():
            shutil.rmtree(out / split)
        os.replace(work / split, out / split)
    work.rmdir()


def encode_split(
    model: ResTok, shard_dir: Path, split: str, kind: str, p, split_dir: Path, source: dict, device: torch.device
) -> dict:
    """Encode one split into split_dir, resuming from progress.json when its meta (incl. `source`) matches."""
    cfg, el = model.cfg, p.extract_latents
    manifest = read_manifest(shard_dir, split)
    n, views, L = manifest["num_samples"], NUM_VIEWS[kind], cfg.num_tokens
    meta = {
        "split": split,
        "num_images": n,
        "views": views,
        "view_kind": kind,
        "crop_range": el.crop_range,
        "codebook_size": cfg.codebook_size,
        "level_sizes": list(cfg.level_sizes),
        "num_tokens": L,
        "num_classes": manifest["num_classes"],
        "resolution": cfg.resolution,
        "dtype": code_dtype(cfg.codebook_size).name,
        "profile": p.profile,
        **source,
    }
    codes_path, labels_path, progress_path = (
        split_dir / "codes.npy",
        split_dir / "labels.npy",
        split_dir / "progress.json",
    )
    if (split_dir / "meta.json").is_file() and json.loads((split_dir / "meta.json").read_text()) == meta:
        return {"images_encoded": 0, "seconds": 0.0, "resumed_from": n}  # complete from an earlier run
    done = 0
    if progress_path.is_file() and json.loads(progress_path.read_text())["meta"] == meta:
        done = json.loads(progress_path.read_text())["done"]
    else:
        _clear(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    resumed_from, t0 = done, time.perf_counter()
    if done < n or not n:  # an empty split (shard.splits) still gets its (0, V, L) arrays
        mode = "r+" if done else "w+"
        codes = np.lib.format.open_memmap(
            str(codes_path) + ".partial", mode=mode, dtype=meta["dtype"], shape=(n, views, L)
        )
        labels = np.lib.format.open_memmap(str(labels_path) + ".partial", mode=mode, dtype=np.int64, shape=(n,))
        batches = ViewBatches(shard_dir, split, kind, el.crop_range, el.batch_size, done)
        workers = loader_workers(8) if device.type == "cuda" else 0  # CPU: the encoder needs the cores
        loader = torch.utils.data.DataLoader(
            batches, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda"
        )
        with torch.inference_mode(), progress(n, f"extract {split} ({views} views)") as bar:
            bar.advance(done)
            for first, imgs, labs in loader:
                b = imgs.shape[0]
                x = imgs.to(device, non_blocking=True).flatten(0, 1).float().div_(255)  # (b * V, 3, res, res)
                codes[first : first + b] = model.encode(x).view(b, views, L).cpu().numpy().astype(meta["dtype"])
                labels[first : first + b] = labs.numpy()
                codes.flush()  # the data is on disk before the progress file says so
                labels.flush()
                write_json_atomic(progress_path, {"meta": meta, "done": first + b})
                bar.advance(b)
        del codes, labels
    os.replace(str(codes_path) + ".partial", codes_path)
    os.replace(str(labels_path) + ".partial", labels_path)
    write_json_atomic(split_dir / "meta.json", meta)  # last: a split with meta.json is complete
    progress_path.unlink(missing_ok=True)  # absent when the split was empty
    return {"images_encoded": n - resumed_from, "seconds": time.perf_counter() - t0, "resumed_from": resumed_from}


def split_summary(split_dir: Path, model: ResTok, run: dict) -> tuple[dict, dict]:
    """(metrics, provenance) of one split: sizes and code statistics; dtype, resume point and throughput."""
    codes = np.load(split_dir / "codes.npy", mmap_mode="r")  # (N, V, L)
    n, views, L = codes.shape
    step = max(1, -(-n * views // STATS_MAX_SEQUENCES))
    sample = torch.from_numpy(codes[::step].reshape(-1, L).astype(np.int64))  # (n', L)
    labels = torch.from_numpy(np.load(split_dir / "labels.npy")[::step]).repeat_interleave(views)  # (n',)
    secs = run["seconds"]
    return {
        "num_images": n,
        "views": views,
        "disk_bytes": codes.nbytes,
        "code_stats_sequences": sample.shape[0],
        "codebook": codebook_stats(sample, model.cfg.level_sizes, model.cfg.codebook_size),
        "per_position": position_entropy(sample, model.cfg.level_sizes, model.cfg.codebook_size, labels),
    }, {
        "dtype": codes.dtype.name,
        "images_encoded_this_run": run["images_encoded"],
        "resumed_from": run["resumed_from"],
        "seconds": round(secs, 2),
        "images_per_s": round(run["images_encoded"] / secs, 2) if secs else None,
        "views_per_s": round(run["images_encoded"] * views / secs, 2) if secs else None,
    }


def main(argv=None):
    args, p = stage_args(
        __doc__,
        PARAMS,
        argv,
        helps={"shards": "output of the shard stage", "tokenizer": "the EMA tokenizer artifact"},
        shards="data/shard",
        tokenizer="data/train_tokenizer/tokenizer.pt",
        out="data/extract_latents",
        results="results/extract_latents",
    )
    el = p.extract_latents
    if el.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{args.params}:extract_latents.device='cuda' but no CUDA device is available; use 'auto'")
    device = torch.device("cuda" if el.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision(
        "high"
    )  # fp32 weights and activations; TF32 matmuls on CUDA (docs/method.md, generator §7)

    shard_dir, tok_path = Path(args.shards), Path(args.tokenizer)
    model, tok_provenance = load_tokenizer(tok_path, device)
    manifests = {split: read_manifest(shard_dir, split) for split in SPLITS}
    for split, m in manifests.items():  # cross-artifact checks before any work
        if m["resolution"] != model.cfg.resolution:
            raise ValueError(
                f"{tok_path} was trained at resolution {model.cfg.resolution} but "
                f"{shard_dir / split / 'manifest.json'} has resolution {m['resolution']}; re-run "
                "shard and train_tokenizer with the same data.resolution"
            )
    if manifests["train"]["num_classes"] != manifests["val"]["num_classes"]:
        raise ValueError(
            f"{shard_dir}: train has {manifests['train']['num_classes']} classes, val has "
            f"{manifests['val']['num_classes']}"
        )

    console.print(
        f"extract_latents: {tok_path} ({model.cfg.num_tokens} tokens, codebook {model.cfg.codebook_size}) "
        f"on {device}, train views {el.views}"
    )
    tokenizer = {"path": str(tok_path), "sha256": sha256_file(tok_path), "provenance": tok_provenance}
    out, results = Path(args.out), Path(args.results)
    summary = {"splits": {}}
    run_info = {"profile": p.profile, "device": str(device), "params": asdict(el), "tokenizer": tokenizer, "splits": {}}
    work, runs = work_dir(out), {}
    for split, kind in (("train", el.views), ("val", "eval")):
        if (out / split / "meta.json").is_file() and not (work / split).exists():  # a finished run's: reusable
            (work / split).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out / split, work / split)
        # what the codes depend on: a resumed or finished split is reused only if all of it is unchanged
        source = {
            "tokenizer": tokenizer,
            "shards_sha256": [s["sha256"] for s in manifests[split]["shards"]],
            "batch_size": el.batch_size,
            "device": device.type,
        }
        runs[split] = encode_split(model, shard_dir, split, kind, p, work / split, source, device)
        console.print(
            f"extract_latents {split}: {NUM_VIEWS[kind]} views in {runs[split]['seconds']:.1f}s"
            + (f" (resumed from image {runs[split]['resumed_from']})" if runs[split]["resumed_from"] else "")
        )
    publish(out, work)
    for split, run in runs.items():
        summary["splits"][split], run_info["splits"][split] = split_summary(out / split, model, run)
    results.mkdir(parents=True, exist_ok=True)
    write_results(results / "summary.json", summary, run_info, device)


if __name__ == "__main__":
    main()
