"""Image transforms: what `shard` stores, and the views later stages take at read time.

- `train_stored`: short side resized to ceil(res / 0.8), aspect kept, not cropped (320 for 256).
- `eval_view`: the ADM evaluation transform (box-downsample while the short side is >= 2x the target, bicubic
  resize of the short side to res, centre crop res), as in guided-diffusion's `center_crop_arr`.
- `train_view_boxes`: the training augmentation (ADM `random_crop_arr`, docs/method.md, training-and-eval §3.1: draw s from
  the integers res..ceil(res/0.8), resize the short side to s, take a random res x res crop, flip with p = 0.5),
  expressed as a square box in stored pixels (side = res * short / s) plus a flip bit and drawn from a seeded
  generator, so the feature cache and the tokenizer trainer see exactly the same views.
- `ten_crop_views`: the generator's code-extraction views (docs/method.md, generator §7: ADM centre crop to
  floor(res * crop_range), then the 4 corners and the centre at res, and the same of the flipped image).
A view is (left, top, side, flip) in stored-image pixels; `apply_view` turns it into a (3, res, res) uint8 tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def stored_train_side(res: int) -> int:
    return math.ceil(res / 0.8)


def resized_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(w, h) of an image of `size` with its short side resized to `side`, aspect kept (`resize_short_side`)."""
    w, h = size
    if min(w, h) == side:
        return w, h
    scale = side / min(w, h)
    return max(side, round(w * scale)), max(side, round(h * scale))


def resize_short_side(img: Image.Image, side: int) -> Image.Image:
    if min(img.size) == side:
        return img
    return img.resize(resized_size(img.size, side), Image.BICUBIC)


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
    short = min(w, h)
    s = rng.integers(res, stored_train_side(res) + 1, size=n)
    side = np.clip(np.round(res * short / s).astype(np.int64), min(res, short), short)
    left = (rng.random(n) * (w - side + 1)).astype(np.int64)
    top = (rng.random(n) * (h - side + 1)).astype(np.int64)
    flip = rng.integers(0, 2, size=n)
    return np.stack([left, top, side, flip], axis=1)


def ten_crop_views(img: Image.Image, res: int, crop_range: float) -> torch.Tensor:
    """Centre + 4 corner crops of the ADM centre crop at floor(res * crop_range), then of its flip: (10, 3, res, res)."""
    big = eval_view(img, int(res * crop_range))
    d = big.size[0] - res
    corners = [(d // 2, d // 2), (0, 0), (d, 0), (0, d), (d, d)]
    views = [(x, y, res, f) for f in (0, 1) for x, y in corners]
    return torch.stack([apply_view(big, v, res) for v in views])


def apply_view(img: Image.Image, view, res: int) -> torch.Tensor:
    """Crop the square view, resize to res (bicubic, antialiased), flip: (3, res, res) uint8."""
    left, top, side, flip = (int(v) for v in view)
    out = img.crop((left, top, left + side, top + side))
    if flip:  # flip after the crop: the box is in unflipped coordinates
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if side != res:
        out = out.resize((res, res), Image.BICUBIC)
    return to_uint8_tensor(out)
