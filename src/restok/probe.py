"""Class probe: did the generator draw the class it was asked for?

A linear probe (multinomial logistic regression) is fit on frozen real-image features of the training split (the
FID Inception's pool3 in `score`), then scored on the real val split and on the generated samples with their
conditioning labels. The real-val accuracy says whether the probe can tell the classes apart at all; only then
does the sample accuracy mean anything, so the report carries `reliable` and a note saying which it is.

Fit: features standardised with the training mean and std, weights by full-batch L-BFGS on the mean cross-entropy
plus `l2` * |W|^2, from zeros, in float64: deterministic on CPU, no tuning loop.

    probe = fit_probe(train_feats, train_labels)
    probe_accuracy(probe, val_feats, val_labels)   # {"accuracy", "per_class", "count"}
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from restok.data.shards import iter_split
from restok.data.views import eval_view, to_uint8_tensor

# reliable: real-val accuracy at least halfway from chance to perfect
RELIABLE_FRACTION = 0.5


@dataclass(frozen=True)
class Probe:
    mean: torch.Tensor  # (D,) float64, training feature mean
    std: torch.Tensor  # (D,) float64, training feature std (floored)
    weight: torch.Tensor  # (C, D) float64
    bias: torch.Tensor  # (C,) float64

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def logits(self, feats) -> torch.Tensor:
        x = (torch.as_tensor(np.asarray(feats), dtype=torch.float64) - self.mean) / self.std  # (N, D)
        return x @ self.weight.T + self.bias  # (N, C)


def _labels(labels) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def fit_probe(
    train_feats, train_labels, *, num_classes: int | None = None, l2: float = 1e-3, max_iter: int = 200
) -> Probe:
    """Logistic regression on (N, D) features with integer labels (N,) in [0, num_classes).

    Args:
        train_feats: (N, D) array or tensor of real training-image features.
        train_labels: (N,) class indices.
        num_classes: C; None takes max(label) + 1.
        l2: weight decay on W (the standardised features make one value fit any extractor).
        max_iter: L-BFGS iterations.
    """
    x = torch.as_tensor(np.asarray(train_feats), dtype=torch.float64)
    y = _labels(train_labels)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f"fit_probe needs (N, D) features and (N,) labels with N >= 2, got features "
            f"{tuple(x.shape)} and labels {tuple(y.shape)}"
        )
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"probe labels must lie in [0, {classes}), got [{int(y.min())}, {int(y.max())}]")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # (N, D)
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(mean=mean, std=std, weight=weight.detach(), bias=bias.detach())


def probe_accuracy(probe: Probe, feats, labels) -> dict:
    """{"accuracy": overall, "per_class": {class: accuracy or None when absent}, "count": N}."""
    y = _labels(labels)
    if len(y) == 0:
        raise ValueError("probe_accuracy needs at least one labelled feature")
    hit = (probe.logits(feats).argmax(1) == y).double()  # (N,)
    per_class = {str(c): (float(hit[y == c].mean()) if (y == c).any() else None) for c in range(probe.num_classes)}
    return {"accuracy": float(hit.mean()), "per_class": per_class, "count": len(y)}


def class_probe_report(
    probe: Probe, val_feats, val_labels, sample_feats, sample_labels, features: str, recon_feats=None, recon_labels=None
) -> dict:
    """The `class_probe` entry of score's metrics: accuracy on real val beside accuracy on samples, and (given
    their features) on the tokenizer's reconstructions of val images: the most samples decoded by that tokenizer
    can be expected to reach, since every sample passes through the same decoder."""
    val = probe_accuracy(probe, val_feats, val_labels)
    recon = None if recon_feats is None else probe_accuracy(probe, recon_feats, recon_labels)["accuracy"]
    samples = probe_accuracy(probe, sample_feats, sample_labels)
    chance = 1.0 / probe.num_classes
    bar = chance + RELIABLE_FRACTION * (1.0 - chance)
    reliable = val["accuracy"] >= bar
    note = (
        f"the probe classifies real val images at {val['accuracy']:.3f} (>= {bar:.3f}, halfway from chance "
        f"{chance:.3f} to 1): sample accuracy measures whether samples show their class"
        if reliable
        else f"NOT RELIABLE: the probe classifies real val images at only {val['accuracy']:.3f} (< {bar:.3f}, halfway "
        f"from chance {chance:.3f} to 1), so the sample accuracy says nothing about the generator"
    )
    return {
        "real_val_accuracy": val["accuracy"],
        "sample_accuracy": samples["accuracy"],
        "recon_accuracy": recon,
        "per_class": {
            c: {"real_val": val["per_class"][c], "samples": samples["per_class"][c]} for c in val["per_class"]
        },
        "chance": chance,
        "features": features,
        "reliable": reliable,
        "note": note,
        "real_val_images": val["count"],
        "samples": samples["count"],
    }


def class_balanced_images(
    shard_dir, split: str, per_class: int, res: int, histogram: list[int]
) -> Iterator[tuple[torch.Tensor, int]]:
    """The first `per_class` images of each class of `split` in shard order, as eval views: uint8 (3, res, res).
    `histogram` (the split manifest's class_histogram) tells when every class is complete, so reading stops there."""
    wanted = {c: min(per_class, n) for c, n in enumerate(histogram) if n}
    taken = dict.fromkeys(wanted, 0)
    left = sum(wanted.values())
    for _, img, label in iter_split(shard_dir, split):
        if left == 0:
            return
        if taken[label] < wanted[label]:
            taken[label] += 1
            left -= 1
            yield to_uint8_tensor(_eval(img, res)), label


def _eval(img: Image.Image, res: int) -> Image.Image:
    return img if img.size == (res, res) else eval_view(img, res)


def first_per_class(labels, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` items of each class, in order: the val images `class_balanced_images`
    would pick, taken from features already extracted in shard order."""
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(np.asarray(labels).tolist()):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def split_labels(pairs: Iterable[tuple[torch.Tensor, int]], labels: list[int]) -> Iterator[torch.Tensor]:
    """Images of (image, label) pairs, appending each label to `labels` as the image is consumed."""
    for img, label in pairs:
        labels.append(label)
        yield img
