"""The built-in dataset: class-conditional synthetic images, generated deterministically from a seed.

Each class fixes a coarse layout (background gradient, one to three shapes of a class-specific kind and colour at
class-specific places) and a finer texture inside the shapes (stripes with a class-specific frequency and angle,
plus a dot lattice for odd classes). Each sample jitters positions, sizes, colours and texture phase, and adds
faint noise. So a hierarchical tokenizer has structure at several scales to learn, and a class-conditional
generator has something class-specific to get right. Nothing is downloaded.

Images are rendered at `size` with 2x supersampling (box-filtered) so edges are anti-aliased.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

SHAPES = ("disc", "square", "triangle", "diamond", "ring", "cross")


def class_spec(label: int, seed: int) -> dict:
    """The fixed attributes of class `label` (independent of the sample index)."""
    r = np.random.default_rng([seed, 7919, label])
    n_shapes = 1 + label % 3
    return {
        "bg": r.uniform(0.05, 0.95, size=(2, 3)),
        "bg_angle": r.uniform(0, 2 * math.pi),
        "shape": SHAPES[label % len(SHAPES)],
        "color": r.uniform(0.0, 1.0, size=3),
        "centers": r.uniform(0.25, 0.75, size=(n_shapes, 2)),
        "radius": r.uniform(0.14, 0.26) / math.sqrt(n_shapes),
        "stripe_freq": r.uniform(3.0, 9.0),
        "stripe_angle": r.uniform(0, math.pi),
        "dots": label % 2 == 1,
    }


def _shape_mask(kind: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(x), np.abs(y)
    if kind == "disc":
        return x * x + y * y <= r * r
    if kind == "square":
        return np.maximum(ax, ay) <= r * 0.85
    if kind == "triangle":
        return (y <= r * 0.8) & (y >= -r + 2 * ax)
    if kind == "diamond":
        return ax + ay <= r * 1.1
    if kind == "ring":
        d = np.sqrt(x * x + y * y)
        return (d <= r) & (d >= r * 0.55)
    return (np.minimum(ax, ay) <= r * 0.3) & (np.maximum(ax, ay) <= r)  # cross


def render(label: int, index: int, size: int, seed: int) -> Image.Image:
    """Sample `index` of class `label` as an RGB PIL image of side `size`."""
    spec = class_spec(label, seed)
    r = np.random.default_rng([seed, 104729, label, index])
    s = 2 * size
    yy, xx = (np.mgrid[0:s, 0:s].astype(np.float64) + 0.5) / s  # (s, s) in [0, 1)

    # coarse: a two-colour gradient along a class angle, with a per-sample tilt
    ang = spec["bg_angle"] + r.normal(0, 0.2)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang), 0, 1)[..., None]
    img = spec["bg"][0] * (1 - t) + spec["bg"][1] * t

    # fine: stripes (and dots) inside the shapes, phase and contrast jittered per sample
    sa = spec["stripe_angle"] + r.normal(0, 0.1)
    phase = r.uniform(0, 2 * math.pi)
    u = (xx * math.cos(sa) + yy * math.sin(sa)) * spec["stripe_freq"] * 2 * math.pi + phase
    texture = 0.5 + 0.5 * np.sin(u)
    if spec["dots"]:
        f = spec["stripe_freq"] * 1.5
        texture = texture * (0.6 + 0.4 * ((np.sin(xx * f * 2 * math.pi) * np.sin(yy * f * 2 * math.pi)) > 0.3))
    color = np.clip(spec["color"] + r.normal(0, 0.06, size=3), 0, 1)
    dark = color * 0.35
    fill = dark + (color - dark) * texture[..., None]

    for cx, cy in spec["centers"]:
        cx, cy = cx + r.normal(0, 0.04), cy + r.normal(0, 0.04)
        rad = spec["radius"] * r.uniform(0.85, 1.15)
        mask = _shape_mask(spec["shape"], xx - cx, yy - cy, rad)[..., None]
        img = np.where(mask, fill, img)

    img = img + r.normal(0, 0.015, size=img.shape)
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))  # 2x box downsample = anti-aliasing
    return Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def class_names(num_classes: int) -> list[str]:
    return [f"{SHAPES[c % len(SHAPES)]}{c:03d}" for c in range(num_classes)]
