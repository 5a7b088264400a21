"""Raw image sources: the built-in set, ILSVRC2012, any class-per-folder tree, or existing webdataset shards.

`list_items(data, split)` enumerates a split as picklable `Item`s (sorted, so the listing is deterministic) together
with the class names; `load_image(item, data)` opens one as RGB (raising on a corrupt file, which the shard stage
counts and lists). Class indices follow the sorted folder names (for ImageNet: sorted WordNet ids, the usual
0..999 order).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from restok.config import Data
from restok.data import builtin

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass(frozen=True)
class Item:
    key: str          # webdataset __key__: digits only (no dots)
    label: int
    path: str = ""    # file sources: absolute path
    index: int = -1   # builtin: sample index within its class


class SourceError(ValueError):
    """The raw data named by params does not have the expected layout."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)


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
        files = [(p, c) for c, n in enumerate(names) if (split_dir / n).is_dir() for p in _images_in(split_dir / n)]
        return files, names
    dirs = _class_dirs(root)
    names = [d.name for d in dirs]
    _check_classes(data, names, root)
    files = []
    for c, d in enumerate(dirs):
        imgs = _images_in(d)
        n_val = int(round(len(imgs) * data.val_fraction))
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
        return [(p, c) for c, w in enumerate(wnids) for p in _images_in(train / w)], wnids
    val = root / "val"
    if not val.is_dir():
        raise SourceError(f"data.root={data.root!r}: no val/ folder")
    if _class_dirs(val):
        return [(p, wnids.index(d.name)) for d in _class_dirs(val) for p in _images_in(d)], wnids
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
    return [Item(key=f"{i:08d}", label=c, path=str(p)) for i, (p, c) in enumerate(files)], names


def builtin_native_size(resolution: int) -> int:
    """The built-in images are rendered at the size the train shards store: ceil(res / 0.8)."""
    return -(-resolution * 5 // 4)


def load_image(item: Item, data: Data) -> Image.Image:
    """Open one item as RGB. Raises (OSError, ValueError, ...) on an unreadable file."""
    if data.source == "builtin":
        return builtin.render(item.label, item.index, builtin_native_size(data.resolution), data.builtin.seed)
    with Image.open(item.path) as im:
        im.load()
        return im.convert("RGB")
