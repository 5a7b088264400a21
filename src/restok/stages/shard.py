"""Stage `shard`: raw images -> webdataset tar shards per split, in parallel over CPU worker processes.

    python -m restok.stages.shard --params params.yaml --out data/shard --results results/shard

Train images are stored with the short side at ceil(res / 0.8), aspect kept, so the training crops and the
ten-crop are taken at read time; val images are stored already in the eval view (res x res). Train order is
shuffled (seeded) across shards. Unreadable images, and images larger than shard.max_image_pixels before or after
the resize (an extreme aspect ratio), are counted, listed in the manifest with the reason and skipped; so are,
under `ignored`, the entries the listing leaves out by kind (other file types, hidden files, nested folders). A
class left with no image (all of its files unreadable) stops the stage by name, like an empty class folder. A worker
process that dies (the OOM killer, a signal) stops the stage with a message, the split without a manifest. With
`data.source: wds` each external shard is converted into one local shard the same way (same decoding, same
conversion, same skips; samples keep the external order, keys become digits), and the manifest lists the external
shards it read (`sources`: sha256, counts).
"""

from __future__ import annotations

import multiprocessing as mp
import io
import shutil
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torchvision.utils import make_grid

from restok.config.data import Data, Shard
from restok.config.load import stage_args
from restok.cpus import job_cpus
from restok.data.shards import MANIFEST, encode_image, iter_split_uint8, store_transform, write_shard
from restok.data.sources import IMAGE_EXTS, Item, SourceError, ignored_entries, list_items, load_image, open_image
from restok.hashing import sha256_file
from restok.io import save_png, write_json_atomic
from restok.provenance import write_results
from restok.train.log import console, progress

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "data": Data, "shard": Shard}
SPLITS = ("train", "val")


@contextmanager
def _pool(n: int):
    """Worker processes; fork (no re-import of torch per worker) where the platform has it. A worker that dies
    breaks the pool, and waiting for a result then raises BrokenProcessPool (multiprocessing's Pool would wait
    forever for the dead worker's task). On the way out, jobs not yet started are cancelled."""
    methods = mp.get_all_start_methods()
    pool = ProcessPoolExecutor(n, mp_context=mp.get_context("fork" if "fork" in methods else "spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _died(what: str, done: int, total: int, pending: str, err: BrokenProcessPool) -> RuntimeError:
    return RuntimeError(
        f"{what}: a worker process died (killed by a signal, e.g. the OOM killer) after {done} of "
        f"{total} shards, in {pending} or a later one; the split gets no manifest. Check memory "
        f"(dmesg), lower shard.workers or shard.max_image_pixels, and rerun ({err})"
    )


def _encode_shard(job):
    """Worker: load, transform and encode one shard's items; returns (entry, labels, skipped)."""
    path, items, split, data, cfg = job
    samples, labels, skipped = [], [], []
    for it in items:
        try:
            img = store_transform(load_image(it, data, cfg), split, data.resolution, cfg.max_image_pixels)
        except Exception as e:  # any decode failure: counted and listed, never silent
            skipped.append({"path": it.path or it.key, "reason": f"{type(e).__name__}: {e}"})
            continue
        samples.append(
            {
                "__key__": it.key,
                cfg.image_format: encode_image(img, cfg.image_format, cfg.jpeg_quality),
                "cls": it.label,
            }
        )
        labels.append(it.label)
    return write_shard(Path(path), samples), labels, skipped


def shard_local(split: str, items: list[Item], names: list[str], out: Path, p) -> dict:
    data, cfg = p.data, p.shard
    if split == "train":
        order = np.random.default_rng(cfg.shuffle_seed).permutation(len(items))
        items = [items[i] for i in order]
    n = cfg.samples_per_shard
    jobs = [
        (str(out / f"{split}-{k:06d}.tar"), items[i : i + n], split, data, cfg)
        for k, i in enumerate(range(0, len(items), n))
    ]
    entries, hist, skipped = [], Counter(), []
    with _pool(min(cfg.workers, job_cpus(), max(1, len(jobs)))) as pool, progress(len(jobs), f"shard {split}") as bar:
        try:
            for entry, labels, skip in pool.map(_encode_shard, jobs):  # map keeps shard order
                entries.append(entry)
                hist.update(labels)
                skipped += skip
                bar.advance(1)
        except BrokenProcessPool as e:
            raise _died(f"shard {split}", len(entries), len(jobs), jobs[len(entries)][0], e) from None
    return {
        "shards": entries,
        "num_samples": sum(e["samples"] for e in entries),
        "class_histogram": [hist[c] for c in range(len(names))],
        "skipped": skipped,
    }


def _refuse_compressed(url: str, where: str) -> None:
    """External shards are read by tar member offsets: a compressed tar would be read as garbage."""
    with open(url, "rb") as f:
        magic = f.read(6)
    for name, sig in (("gzip", b"\x1f\x8b"), ("bzip2", b"BZh"), ("xz", b"\xfd7zXZ"), ("zstd", b"\x28\xb5\x2f\xfd")):
        if magic.startswith(sig):
            raise ValueError(
                f"{where}: {url} is {name}-compressed; external shards must be plain .tar "
                f"(decompress it, e.g. `{name} -d`, and point the pattern at the .tar)"
            )


def _external_samples(url: str):
    """(key, {extension (lower case): bytes}) per sample of a tar, grouped as webdataset groups them (the key is
    the member path up to the first dot of its file name)."""
    key, fields = None, {}
    with tarfile.open(url) as tar:
        for member in tar:
            if not member.isfile():
                continue
            head, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            k = f"{head}/{stem}" if head else stem
            if k != key and key is not None:
                yield key, fields
                fields = {}
            key = k
            fields[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


def _convert_external(job):
    """Worker: one external shard into one local shard, each sample through `open_image` and the store transform
    like a file of a folder source; returns (entry, labels, skipped, source entry)."""
    url, path, k, split, data, cfg = job
    exts = [e.lstrip(".") for e in sorted(IMAGE_EXTS)]
    samples, labels, skipped = [], [], []
    for j, (key, fields) in enumerate(_external_samples(url)):
        where = f"{url}#{key}"
        try:
            label = int(fields["cls"].decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            skipped.append({"path": where, "reason": f"no integer class (cls): {type(e).__name__}: {e}"})
            continue
        if not 0 <= label < data.num_classes:
            raise SourceError(
                f"data.wds.{split}: {where} has class {label}, outside 0..{data.num_classes - 1} "
                f"(data.num_classes={data.num_classes})"
            )
        field = next((e for e in exts if e in fields), None)
        if field is None:
            skipped.append({"path": where, "reason": f"no image field ({' '.join(exts)}); it has {sorted(fields)}"})
            continue
        try:
            img = store_transform(
                open_image(io.BytesIO(fields[field]), cfg), split, data.resolution, cfg.max_image_pixels
            )
        except Exception as e:  # any decode failure: counted and listed, never silent
            skipped.append({"path": where, "reason": f"{type(e).__name__}: {e}"})
            continue
        samples.append(
            {
                "__key__": f"{k:06d}{j:06d}",
                cfg.image_format: encode_image(img, cfg.image_format, cfg.jpeg_quality),
                "cls": label,
            }
        )
        labels.append(label)
    source = {"path": url, "samples": len(samples) + len(skipped), "sha256": sha256_file(url)}
    return write_shard(Path(path), samples), labels, skipped, source


def shard_external(split: str, pattern: str, names: list[str], out: Path, p) -> dict:
    urls = list(wds.shardlists.expand_urls(pattern))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"data.wds.{split}={pattern!r}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    for u in urls:
        _refuse_compressed(u, f"data.wds.{split}={pattern!r}")
    jobs = [(u, str(out / f"{split}-{k:06d}.tar"), k, split, p.data, p.shard) for k, u in enumerate(urls)]
    entries, sources, hist, skipped = [], [], Counter(), []
    with (
        _pool(min(p.shard.workers, job_cpus(), max(1, len(jobs)))) as pool,
        progress(len(jobs), f"shard {split} (wds)") as bar,
    ):
        try:
            for entry, labels, skip, source in pool.map(_convert_external, jobs):
                entries.append(entry)
                sources.append(source)
                hist.update(labels)
                skipped += skip
                bar.advance(1)
        except BrokenProcessPool as e:
            raise _died(f"shard {split} (wds)", len(entries), len(urls), urls[len(entries)], e) from None
    return {
        "shards": entries,
        "sources": sources,
        "num_samples": sum(e["samples"] for e in entries),
        "class_histogram": [hist[c] for c in range(len(names))],
        "skipped": skipped,
    }


def _refuse_lost_classes(split: str, body: dict, names: list[str], listed: Counter | None) -> None:
    """A class that had images but kept none (every one unreadable) is refused by name, like an empty folder."""
    lost = [c for c, n in enumerate(body["class_histogram"]) if n == 0 and (listed is None or listed[c] > 0)]
    if not lost:
        return
    first = body["skipped"][0] if body["skipped"] else None
    raise ValueError(
        f"shard {split}: class{'es' if len(lost) > 1 else ''} "
        f"{', '.join(repr(names[c]) for c in lost[:5])}{' ...' if len(lost) > 5 else ''} kept no image: "
        f"every file of {'them' if len(lost) > 1 else 'it'} was skipped"
        + (f" (e.g. {first['path']}: {first['reason']})" if first else "")
        + "; fix or remove the files, or remove the class folder"
    )


def sample_grid(shard_dir: Path, split: str, num_classes: int, per_class: int = 8) -> torch.Tensor:
    """Up to `per_class` val images of each class, one row per class."""
    rows = {c: [] for c in range(num_classes)}
    for _, img, label in iter_split_uint8(shard_dir, split):
        if len(rows[label]) < per_class:
            rows[label].append(img)
        if all(len(r) == per_class for r in rows.values()):
            break
    blank = torch.zeros_like(next(r[0] for r in rows.values() if r))
    tiles = [r[i] if i < len(r) else blank for r in rows.values() for i in range(per_class)]
    return make_grid(torch.stack(tiles).float() / 255, nrow=per_class, padding=1)


def main(argv=None):
    args, p = stage_args(__doc__, PARAMS, argv, out="data/shard", results="results/shard")
    data = p.data
    wanted = [s for s in SPLITS if s in p.shard.splits]
    listings = {} if data.source == "wds" else {s: list_items(data, s) for s in wanted}  # layout errors before work
    names = [str(c) for c in range(data.num_classes)] if data.source == "wds" else listings["val"][1]

    out, results = Path(args.out), Path(args.results)
    t0 = time.time()
    summary = {"resolution": data.resolution, "splits": {}}
    for split in SPLITS:
        split_dir = out / split
        if split_dir.exists():
            shutil.rmtree(split_dir)  # never mix a previous run's shards with this one's
        split_dir.mkdir(parents=True)
        if split not in wanted:  # an empty split, so every reader finds a manifest that says so
            body = {
                "shards": [],
                "num_samples": 0,
                "class_histogram": [0] * len(names),
                "skipped": [],
                "left_out": f"not in shard.splits {p.shard.splits}",
            }
        elif data.source == "wds":
            body = shard_external(split, getattr(data.wds, split), names, split_dir, p)
            _refuse_lost_classes(split, body, names, None)  # every class must have images in both splits
        else:
            items, names = listings[split]
            body = shard_local(split, items, names, split_dir, p)
            if body["num_samples"] == 0:  # no manifest: no later stage reads an empty split as done
                first = body["skipped"][0]
                raise ValueError(
                    f"shard {split}: none of its {len(items)} images could be read, e.g. "
                    f"{first['path']}: {first['reason']}"
                )
            _refuse_lost_classes(split, body, names, Counter(it.label for it in items))
        body["ignored"] = [] if split not in wanted else ignored_entries(data, split)
        manifest = {
            "split": split,
            "source": data.source,
            "root": data.root,
            "resolution": data.resolution,
            "stored": ("short_side=ceil(res/0.8)" if split == "train" else "eval_view(res)"),
            "num_classes": len(names),
            "class_names": names,
            **body,
        }
        write_json_atomic(split_dir / MANIFEST, manifest)
        summary["splits"][split] = {
            "num_samples": body["num_samples"],
            "num_shards": len(body["shards"]),
            "num_skipped": len(body["skipped"]),
            "num_ignored": len(body["ignored"]),
            "class_histogram": body["class_histogram"],
        }
        # file names such as "a [tag].png" or "x[/b].jpg" are printed verbatim (no rich markup), one line each
        console.print(
            f"shard {split}: {body['num_samples']} images in {len(body['shards'])} shards, "
            f"{len(body['skipped'])} skipped, {len(body['ignored'])} entries not read by kind",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        for s in body["skipped"][:10]:
            console.print(f"  skipped {s['path']}: {s['reason']}", markup=False, highlight=False, soft_wrap=True)
        for s in body["ignored"][:10]:
            console.print(f"  not read {s['path']}: {s['reason']}", markup=False, highlight=False, soft_wrap=True)

    results.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(out, "val" if "val" in wanted else "train", data.num_classes)
    save_png(grid, results / "samples.png")
    write_results(
        results / "summary.json",
        summary,
        {"profile": p.profile, "source": data.source, "seconds": round(time.time() - t0, 2)},
        "cpu",
    )


if __name__ == "__main__":
    main()
