"""Raw image sources: the built-in set, ILSVRC2012, any class-per-folder tree, or existing webdataset shards.

`list_items(data, split)` enumerates a split as picklable `Item`s (sorted, so the listing is deterministic) together
with the class names; `load_image(item, data, shard)` opens one as 8-bit RGB (raising on a corrupt, missing or
too large file, which the shard stage counts and lists). Class indices follow the sorted folder names (for
ImageNet: sorted WordNet ids, the usual 0..999 order).

What a user's folder may hold is converted, not guessed at (`to_rgb`): EXIF orientation is applied, 16-bit
images are scaled to 8 bits (not clipped), transparency is composited on `shard.alpha_background`, CMYK goes
through its embedded ICC profile when it has one. A layout that cannot give both splits images (an empty class
folder, a class too small to hold out a val image, an empty val split) is refused by name before any work.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from restok.config.data import Data, Shard
from restok.data import builtin

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
# shard.max_image_pixels is the one size limit: checked from the header before decoding (load_image), so PIL's
# own warn-at-89-Mpx / refuse-at-179-Mpx pair is switched off instead of half-applying.
Image.MAX_IMAGE_PIXELS = None
SRGB = ImageCms.createProfile("sRGB")


@dataclass(frozen=True)
class Item:
    key: str          # webdataset __key__: digits only (no dots)
    label: int
    path: str = ""    # file sources: absolute path
    index: int = -1   # builtin: sample index within its class


class SourceError(ValueError):
    """The raw data named by params does not have the expected layout."""


def _images_in(folder: Path) -> list[Path]:
    """Image files of a folder; a broken symlink is kept, so that loading it fails and the manifest lists it."""
    return sorted(p for p in folder.iterdir() if (p.is_file() or p.is_symlink()) and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTS)


def _class_images(folder: Path) -> list[Path]:
    imgs = _images_in(folder)
    if not imgs:
        raise SourceError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTS))}); "
                          f"remove it or add images")
    return imgs


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes(data: Data, names: list[str], where: Path) -> None:
    if len(names) != data.num_classes:
        raise SourceError(f"data.num_classes={data.num_classes} but {where} has {len(names)} class folders "
                          f"({names[:5]}{' ...' if len(names) > 5 else ''}); set data.num_classes={len(names)}")


def _folder_split(data: Data, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    root = Path(data.root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        names = [d.name for d in _class_dirs(root / "train")]
        _check_classes(data, names, root / "train")
        split_dir = root / split
        missing = sorted(set(names) - {d.name for d in _class_dirs(split_dir)})
        if missing and split == "val":
            raise SourceError(f"{split_dir} lacks class folders {missing[:5]} that {root / 'train'} has")
        files = [(p, c) for c, n in enumerate(names) if (split_dir / n).is_dir() for p in _class_images(split_dir / n)]
        return files, names
    dirs = _class_dirs(root)
    names = [d.name for d in dirs]
    _check_classes(data, names, root)
    files = []
    for c, d in enumerate(dirs):
        imgs = _class_images(d)
        if data.val_fraction > 0 and len(imgs) < 2:
            raise SourceError(f"class folder {d} holds {len(imgs)} image: at least 2 are needed to hold out a val "
                              f"image (data.val_fraction={data.val_fraction})")
        # at least one val image per class (a class of 4 at 10% would get none), at least one train image
        n_val = min(max(int(round(len(imgs) * data.val_fraction)), int(data.val_fraction > 0)), len(imgs) - 1)
        order = np.random.default_rng([c, len(imgs)]).permutation(len(imgs))
        val = set(order[:n_val].tolist())
        files += [(p, c) for i, p in enumerate(imgs) if (i in val) == (split == "val")]
    return files, names


def _imagenet_val_labels(data: Data, wnids: list[str]) -> dict[str, int]:
    path = Path(data.val_labels)
    if not path.is_file():
        raise SourceError(f"data.val_labels={data.val_labels!r}: file not found")
    index = {w: i for i, w in enumerate(wnids)}
    labels = {}
    with open(path) as f:
        if path.suffix == ".csv":  # Kaggle LOC_val_solution.csv: ImageId,PredictionString ("n01751748 x y x y ...")
            for row in csv.DictReader(f):
                labels[row["ImageId"]] = index[row["PredictionString"].split()[0]]
        else:  # "<file> <wnid or class index>" per line
            for line in f:
                if line.strip():
                    name, lab = line.split()[:2]
                    labels[Path(name).stem] = index[lab] if lab in index else int(lab)
    return labels


def _imagenet_split(data: Data, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    root = Path(data.root)
    train = root / "train"
    if not train.is_dir():
        raise SourceError(f"data.root={data.root!r}: expected the ILSVRC2012 layout with train/<wnid>/*.JPEG")
    wnids = [d.name for d in _class_dirs(train)]
    _check_classes(data, wnids, train)
    if split == "train":
        return [(p, c) for c, w in enumerate(wnids) for p in _class_images(train / w)], wnids
    val = root / "val"
    if not val.is_dir():
        raise SourceError(f"data.root={data.root!r}: no val/ folder")
    if _class_dirs(val):
        return [(p, wnids.index(d.name)) for d in _class_dirs(val) for p in _class_images(d)], wnids
    if not data.val_labels:
        raise SourceError(f"{val} is flat: set data.val_labels to LOC_val_solution.csv or a 'file label' list")
    labels = _imagenet_val_labels(data, wnids)
    files = _images_in(val)
    unlabeled = [p.name for p in files if p.stem not in labels]
    if unlabeled:
        raise SourceError(f"data.val_labels={data.val_labels!r} has no label for {unlabeled[:3]} "
                          f"({len(unlabeled)} files)")
    return [(p, labels[p.stem]) for p in files], wnids


def list_items(data: Data, split: str) -> tuple[list[Item], list[str]]:
    """All items of `split` ("train" | "val") in a deterministic order, and the class names."""
    if data.source == "builtin":
        per_class = data.builtin.train_per_class if split == "train" else data.builtin.val_per_class
        offset = 0 if split == "train" else 1_000_000  # val images are other draws than train images
        items = [Item(key=f"{c * per_class + i:08d}", label=c, index=offset + i)
                 for c in range(data.num_classes) for i in range(per_class)]
        return items, builtin.class_names(data.num_classes)
    if not Path(data.root).is_dir():
        raise SourceError(f"data.root={data.root!r}: directory not found")
    files, names = (_imagenet_split if data.source == "imagenet" else _folder_split)(data, split)
    if not files:
        raise SourceError(f"data.root={data.root!r}: the {split} split has no images"
                          + (" (data.val_fraction is 0)" if split == "val" and data.val_fraction == 0 else ""))
    return [Item(key=f"{i:08d}", label=c, path=str(p)) for i, (p, c) in enumerate(files)], names


def builtin_native_size(resolution: int) -> int:
    """The built-in images are rendered at the size the train shards store: ceil(res / 0.8)."""
    return -(-resolution * 5 // 4)


def to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """A decoded image as 8-bit sRGB: EXIF orientation applied, 16-bit scaled (65535 -> 255), transparency
    composited on `background`, CMYK (or RGB) with an embedded ICC profile converted through it to sRGB."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey (PNG, TIFF); PIL's convert clips to 255
        a = np.asarray(im, dtype=np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"mode {im.mode} pixel values {a.min()}..{a.max()} are not 16-bit")
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":
        raise ValueError("floating-point image (mode F): no defined 8-bit conversion; export it as 8/16-bit")
    profile = im.info.get("icc_profile")
    if profile and im.mode in ("CMYK", "RGB"):
        src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        im = ImageCms.profileToProfile(im, src, SRGB, outputMode="RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return im.convert("RGB")


def load_image(item: Item, data: Data, shard: Shard) -> Image.Image:
    """Open one item as 8-bit RGB (`to_rgb`). Raises (OSError, ValueError, ...) on an unreadable, missing or
    larger than shard.max_image_pixels file, which the shard stage lists as skipped."""
    if data.source == "builtin":
        return builtin.render(item.label, item.index, builtin_native_size(data.resolution), data.builtin.seed)
    with Image.open(item.path) as im:
        w, h = im.size
        if w * h > shard.max_image_pixels:
            raise ValueError(f"{w}x{h} = {w * h} pixels exceeds shard.max_image_pixels={shard.max_image_pixels} "
                             f"(a decompression bomb or an oversized scan); not decoded")
        im.load()
        return to_rgb(im, tuple(shard.alpha_background))
