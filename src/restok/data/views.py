"""Image transforms: what `shard` stores, and the views later stages take at read time.

- `train_stored`: short side resized to ceil(res / 0.8), aspect kept, not cropped (320 for 256).
- `eval_view`: the ADM evaluation transform (box-downsample while the short side is >= 2x the target, bicubic
  resize of the short side to res, centre crop res), as in guided-diffusion's `center_crop_arr`.
- `train_view_boxes`: the training augmentation views (random square crop whose side is drawn from [res, stored
  short side], then resized to res, random horizontal flip), drawn from a seeded generator so the feature cache
  and the tokenizer trainer see exactly the same views.
- `ten_crop_boxes`: the generator's code-extraction views (centre + 4 corners of a crop of the resized image, and
  their flips).
A view is (left, top, side, flip) in stored-image pixels; `apply_view` turns it into a (3, res, res) uint8 tensor.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def stored_train_side(res: int) -> int:
    return math.ceil(res / 0.8)


def resize_short_side(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == side:
        return img
    scale = side / min(w, h)
    return img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)


def train_stored(img: Image.Image, res: int) -> Image.Image:
    return resize_short_side(img, stored_train_side(res))


def eval_view(img: Image.Image, res: int) -> Image.Image:
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), Image.BOX)
    img = resize_short_side(img, res)
    w, h = img.size
    left, top = (w - res) // 2, (h - res) // 2
    return img.crop((left, top, left + res, top + res))


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def train_view_boxes(size: tuple[int, int], res: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random views of an image of `size` (w, h): int array (n, 4) of (left, top, side, flip)."""
    w, h = size
    hi = min(w, h)
    side = rng.integers(min(res, hi), hi + 1, size=n)
    left = (rng.random(n) * (w - side + 1)).astype(np.int64)
    top = (rng.random(n) * (h - side + 1)).astype(np.int64)
    flip = rng.integers(0, 2, size=n)
    return np.stack([left, top, side, flip], axis=1)


def ten_crop_boxes(size: tuple[int, int], crop: int) -> np.ndarray:
    """Centre and four corner crops of side `crop`, each with and without flip: (10, 4)."""
    w, h = size
    crop = min(crop, w, h)
    corners = [((w - crop) // 2, (h - crop) // 2), (0, 0), (w - crop, 0), (0, h - crop), (w - crop, h - crop)]
    return np.array([(x, y, crop, f) for f in (0, 1) for x, y in corners], dtype=np.int64)


def apply_view(img: Image.Image, view, res: int) -> torch.Tensor:
    """Crop the square view, resize to res (bicubic, antialiased), flip: (3, res, res) uint8."""
    left, top, side, flip = (int(v) for v in view)
    out = img.crop((left, top, left + side, top + side))
    if side != res:
        out = out.resize((res, res), Image.BICUBIC)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return to_uint8_tensor(out)
