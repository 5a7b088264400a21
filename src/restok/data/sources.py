"""Raw image sources: the built-in set, ILSVRC2012, any class-per-folder tree, or existing webdataset shards.

`list_items(data, split)` enumerates a split as picklable `Item`s (sorted, so the listing is deterministic) together
with the class names; `load_image(item, data, shard)` opens one as 8-bit RGB (raising on a corrupt, missing or
too large file, which the shard stage counts and lists); `ignored_entries(data, split)` lists what the listing
leaves out by kind (other file types, hidden files, nested folders, val class folders that train lacks), which the
manifest lists too. Class indices follow the sorted folder names (for ImageNet: sorted WordNet ids, the usual 0..999
order). Files are opened as one of the image formats of IMAGE_EXTS only (`FORMATS`): an EPS or PDF renamed .jpg is
refused by PIL instead of being handed to Ghostscript.

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
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "PPM")  # the PIL decoders of IMAGE_EXTS, the only ones tried
# shard.max_image_pixels is the one size limit: checked from the header before decoding (load_image), so PIL's
# own warn-at-89-Mpx / refuse-at-179-Mpx pair is switched off instead of half-applying.
Image.MAX_IMAGE_PIXELS = None
SRGB = ImageCms.createProfile("sRGB")


@dataclass(frozen=True)
class Item:
    key: str  # webdataset __key__: digits only (no dots)
    label: int
    path: str = ""  # file sources: absolute path
    index: int = -1  # builtin: sample index within its class


class SourceError(ValueError):
    """The raw data named by params does not have the expected layout."""


def _images_in(folder: Path) -> list[Path]:
    """Image files of a folder; a broken symlink is kept, so that loading it fails and the manifest lists it."""
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or p.is_symlink()) and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS
    )


def _ignored_in(
    folder: Path, read_dirs: set[str] | list[str] = (), read_files: bool = True, other_dirs: str = ""
) -> list[dict]:
    """What the listing leaves out of `folder`, each with the reason: hidden entries, folders other than
    `read_dirs` (with the number of files under them; `other_dirs` says why, default: a nested folder), and files
    of other kinds (or every file, where `read_files` is False: a folder of class folders)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and p.name in read_dirs:
            continue
        if p.name.startswith("."):
            reason = "hidden " + ("folder" if p.is_dir() else "file")
        elif p.is_dir():
            n = sum(1 for q in p.rglob("*") if not q.is_dir())
            reason = f"{other_dirs or 'nested folder'} ({n} files under it not read)"
        elif not read_files:
            reason = "a file beside the class folders is not read"
        elif p.suffix.lower() in IMAGE_EXTS:
            continue
        else:
            reason = f"file kind {p.suffix.lower() or '(no extension)'} is not read ({' '.join(sorted(IMAGE_EXTS))})"
        out.append({"path": str(p), "reason": reason})
    return out


def ignored_entries(data: Data, split: str) -> list[dict]:
    """Everything under data.root that the listing of `split` leaves out by kind, with the reason (the shard
    stage's manifest lists it). Entries outside the split folders, and with a held-out val (no train/ and val/
    folders) the class folders' own, are listed with the train split."""
    if data.source not in ("folder", "imagenet"):
        return []
    root = Path(data.root)
    split_layout = data.source == "imagenet" or ((root / "train").is_dir() and (root / "val").is_dir())
    if not split_layout:
        if split != "train":
            return []
        dirs = [d.name for d in _class_dirs(root)]
        return _ignored_in(root, dirs, read_files=False) + [e for d in dirs for e in _ignored_in(root / d)]
    names = [d.name for d in _class_dirs(root / "train")]
    out = _ignored_in(root, ("train", "val"), read_files=False) if split == "train" else []
    split_dir = root / split
    if data.source == "imagenet" and split == "val" and not _class_dirs(split_dir):
        return out + _ignored_in(split_dir)  # flat val
    present = [n for n in names if (split_dir / n).is_dir()]
    return (
        out
        + _ignored_in(split_dir, present, read_files=False, other_dirs=f"class folder that {root / 'train'} lacks")
        + [e for n in present for e in _ignored_in(split_dir / n)]
    )


def _class_images(folder: Path) -> list[Path]:
    imgs = _images_in(folder)
    if not imgs:
        raise SourceError(
            f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTS))}); remove it or add images"
        )
    return imgs


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes(data: Data, names: list[str], where: Path) -> None:
    if len(names) != data.num_classes:
        raise SourceError(
            f"data.num_classes={data.num_classes} but {where} has {len(names)} class folders "
            f"({names[:5]}{' ...' if len(names) > 5 else ''}); set data.num_classes={len(names)}"
        )


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
            raise SourceError(
                f"class folder {d} holds {len(imgs)} image: at least 2 are needed to hold out a val "
                f"image (data.val_fraction={data.val_fraction})"
            )
        # at least one val image per class (a class of 4 at 10% would get none), at least one train image
        n_val = min(max(int(round(len(imgs) * data.val_fraction)), int(data.val_fraction > 0)), len(imgs) - 1)
        order = np.random.default_rng([c, len(imgs)]).permutation(len(imgs))
        val = set(order[:n_val].tolist())
        files += [(p, c) for i, p in enumerate(imgs) if (i in val) == (split == "val")]
    return files, names


def _imagenet_val_labels(data: Data, wnids: list[str]) -> dict[str, int]:
    """{file stem: class index} from data.val_labels; a label that names no class of train/ (an unknown wnid, an
    integer outside 0..n-1, anything else) is refused with the file, line and value."""
    path = Path(data.val_labels)
    if not path.is_file():
        raise SourceError(f"data.val_labels={data.val_labels!r}: file not found")
    index = {w: i for i, w in enumerate(wnids)}

    def label(value: str, where: str) -> int:
        if value in index:
            return index[value]
        if value.isdigit() and int(value) < len(wnids):
            return int(value)
        kind = (
            f"class index outside 0..{len(wnids) - 1}"
            if value.lstrip("+-").isdigit()
            else "WordNet id not among the class folders of train/"
        )
        raise SourceError(
            f"data.val_labels={data.val_labels!r}, {where}: label {value!r} is a {kind} "
            f"({len(wnids)} classes in {Path(data.root) / 'train'})"
        )

    labels = {}
    with open(path) as f:
        if path.suffix == ".csv":  # Kaggle LOC_val_solution.csv: ImageId,PredictionString ("n01751748 x y x y ...")
            for line, row in enumerate(csv.DictReader(f), start=2):
                if not row.get("ImageId") or not (row.get("PredictionString") or "").split():
                    raise SourceError(
                        f"data.val_labels={data.val_labels!r}, line {line}: expected the columns "
                        f"ImageId,PredictionString, got {row}"
                    )
                labels[row["ImageId"]] = label(row["PredictionString"].split()[0], f"line {line}")
        else:  # "<file> <wnid or class index>" per line
            for line, text in enumerate(f, start=1):
                if text.strip():
                    parts = text.split()
                    if len(parts) < 2:
                        raise SourceError(
                            f"data.val_labels={data.val_labels!r}, line {line}: expected "
                            f"'<file> <label>', got {text.strip()!r}"
                        )
                    labels[Path(parts[0]).stem] = label(parts[1], f"line {line}")
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
        extra = [d.name for d in _class_dirs(val) if d.name not in wnids]
        if extra:
            raise SourceError(
                f"{val} has class folders {extra[:5]}{' ...' if len(extra) > 5 else ''} that {train} "
                f"lacks ({len(extra)}); remove them or add them to train/"
            )
        return [(p, wnids.index(d.name)) for d in _class_dirs(val) for p in _class_images(d)], wnids
    if not data.val_labels:
        raise SourceError(f"{val} is flat: set data.val_labels to LOC_val_solution.csv or a 'file label' list")
    labels = _imagenet_val_labels(data, wnids)
    files = _images_in(val)
    unlabeled = [p.name for p in files if p.stem not in labels]
    if unlabeled:
        raise SourceError(
            f"data.val_labels={data.val_labels!r} has no label for {unlabeled[:3]} ({len(unlabeled)} files)"
        )
    return [(p, labels[p.stem]) for p in files], wnids


def list_items(data: Data, split: str) -> tuple[list[Item], list[str]]:
    """All items of `split` ("train" | "val") in a deterministic order, and the class names."""
    if data.source == "builtin":
        per_class = data.builtin.train_per_class if split == "train" else data.builtin.val_per_class
        offset = 0 if split == "train" else 1_000_000  # val images are other draws than train images
        items = [
            Item(key=f"{c * per_class + i:08d}", label=c, index=offset + i)
            for c in range(data.num_classes)
            for i in range(per_class)
        ]
        return items, builtin.class_names(data.num_classes)
    if not Path(data.root).is_dir():
        raise SourceError(f"data.root={data.root!r}: directory not found")
    files, names = (_imagenet_split if data.source == "imagenet" else _folder_split)(data, split)
    if not files:
        raise SourceError(
            f"data.root={data.root!r}: the {split} split has no images"
            + (" (data.val_fraction is 0)" if split == "val" and data.val_fraction == 0 else "")
        )
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


def open_image(fp, shard: Shard) -> Image.Image:
    """A file name or binary file object as 8-bit RGB (`to_rgb`), tried with the decoders of FORMATS only; raises
    (OSError, ValueError, ...) on an unreadable file or one larger than shard.max_image_pixels (checked from the
    header, before decoding)."""
    with Image.open(fp, formats=FORMATS) as im:
        w, h = im.size
        if w * h > shard.max_image_pixels:
            raise ValueError(
                f"{w}x{h} = {w * h} pixels exceeds shard.max_image_pixels={shard.max_image_pixels} "
                f"(a decompression bomb or an oversized scan); not decoded"
            )
        im.load()
        return to_rgb(im, tuple(shard.alpha_background))


def load_image(item: Item, data: Data, shard: Shard) -> Image.Image:
    """Open one item as 8-bit RGB (`open_image`). Raises (OSError, ValueError, ...) on an unreadable, missing or
    larger than shard.max_image_pixels file, which the shard stage lists as skipped."""
    if data.source == "builtin":
        return builtin.render(item.label, item.index, builtin_native_size(data.resolution), data.builtin.seed)
    return open_image(item.path, shard)
