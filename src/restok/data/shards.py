"""Webdataset shards: writing them (the `shard` stage) and reading them back (every later stage).

Layout: `data/shard/<split>/<split>-%06d.tar`, samples with `__key__` (digits), the image (`png` or `jpg`) and
`cls`, and `data/shard/<split>/manifest.json`: the source, what was stored (train: short side ceil(res/0.8);
val: the eval view), the shards with their sample counts and sha256, the class histogram and every skipped file
with its reason. A shard is written under `*.tar.tmp` and renamed when complete; the manifest is written last,
so a split without a manifest is unfinished and no reader takes it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image

from restok.data.views import eval_view, resized_size, stored_train_side, to_uint8_tensor, train_stored
from restok.hashing import sha256_file

MANIFEST = "manifest.json"


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> dict:
    """Write `samples` to `path` atomically (mtime 0, so equal samples give equal bytes); returns its entry."""
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for s in samples:
            sink.write(s)
    os.replace(tmp, path)
    return {"path": path.name, "samples": len(samples), "sha256": sha256_file(path)}


def store_transform(img: Image.Image, split: str, res: int, max_pixels: int | None = None) -> Image.Image:
    """What `shard` stores of an image. With `max_pixels`, an image whose resized size (short side at the stored
    side, aspect kept) would hold more pixels is refused (ValueError) before anything is resized: a 1 x 100000 strip
    would become 320 x 32,000,000 at res 256."""
    if max_pixels is not None:
        side = stored_train_side(res) if split == "train" else res
        w, h = resized_size(img.size, side)
        if w * h > max_pixels:
            raise ValueError(
                f"{img.size[0]}x{img.size[1]} would be resized to {w}x{h} = {w * h} pixels (short side "
                f"{side}), more than shard.max_image_pixels={max_pixels}: too thin; not stored"
            )
    return train_stored(img, res) if split == "train" else eval_view(img, res)


# ---------------------------------------------------------------------------------------------------- read
class ShardsNotReady(FileNotFoundError):
    pass


def read_manifest(shard_dir: str | Path, split: str) -> dict:
    path = Path(shard_dir) / split / MANIFEST
    if not path.is_file():
        raise ShardsNotReady(
            f"{path} is missing: the shard stage has not finished for split {split!r} (run `dvc repro shard`)"
        )
    return json.loads(path.read_text())


def shard_paths(shard_dir: str | Path, manifest: dict) -> list[str]:
    """Absolute paths of a split's shards."""
    base = Path(shard_dir) / manifest["split"]
    return [str(base / s["path"]) for s in manifest["shards"]]


def decode_image(sample: dict) -> Image.Image:
    for ext in ("png", "jpg", "jpeg", "webp"):
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext]), formats=("PNG", "JPEG", "WEBP")) as im:
                return im.convert("RGB")
    raise KeyError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image field")


def iter_split(
    shard_dir: str | Path, split: str, paths: list[str] | None = None
) -> Iterator[tuple[str, Image.Image, int]]:
    """Yield (key, stored PIL image, label) in shard order."""
    manifest = read_manifest(shard_dir, split)
    for url in paths if paths is not None else shard_paths(shard_dir, manifest):
        # a plain reader of the given shards: no splitting by torchrun rank or DataLoader worker
        for sample in wds.WebDataset(
            url, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
        ):
            img = decode_image(sample)
            yield f"{Path(url).stem}/{sample['__key__']}", img, int(sample["cls"])


def iter_split_uint8(shard_dir, split, paths=None):
    for key, img, label in iter_split(shard_dir, split, paths):
        yield key, to_uint8_tensor(img), label
