"""Stage `sample`: determinism (rerun, 1 vs 2 processes), the ADM npz layout, the summary, artifact checks.

Run: .venv/bin/python -m pytest tests/stage/test_stage_sample.py -q
The generator.pt / tokenizer.pt artifacts are tiny randomly initialised smoke-profile models saved with
save_artifact (no dependency on the training stages). The generator's zero-initialised output head is re-drawn so
that the logits, and with them CFG and top-p, are not uniform.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from restok import images
from restok.artifacts import save_artifact
from restok.config.generator import generator_config
from restok.config.load import load_params
from restok.config.tokenizer import tokenizer_config
from restok.models.generator import HARGenerator
from restok.models.tokenizer import ResTok
from restok.provenance import read_results
from restok.stages import sample

REPO = Path(__file__).resolve().parents[2]


def make_artifacts(
    params_path: Path, out: Path, codebook_size: int | None = None, teacher_weights: str = "none"
) -> tuple[Path, Path]:
    """Random smoke-size tokenizer.pt and generator.pt in `out`; `codebook_size` overrides the tokenizer's."""
    p = load_params(params_path)
    torch.manual_seed(0)
    tok_cfg = tokenizer_config(p.tokenizer, p.data.resolution, vf_dim=16)
    gen_cfg = generator_config(p.generator, tok_cfg.codebook_size, tok_cfg.num_tokens, p.data.num_classes)
    if codebook_size is not None:
        tok_cfg = dataclasses.replace(tok_cfg, codebook_size=codebook_size)
    tokenizer, generator = ResTok(tok_cfg), HARGenerator(gen_cfg)
    torch.nn.init.normal_(generator.head.weight, std=0.5)
    out.mkdir(parents=True, exist_ok=True)
    teacher = {"model": "vit_small_patch16_dinov3.lvd1689m", "weights": teacher_weights}
    provenance = {"step": 0, "weights": "random-init test fixture", "teacher": teacher}
    save_artifact(out / "tokenizer.pt", tokenizer.state_dict(), dataclasses.asdict(tok_cfg), provenance)
    save_artifact(out / "generator.pt", generator.state_dict(), dataclasses.asdict(gen_cfg), provenance)
    return out / "generator.pt", out / "tokenizer.pt"


@pytest.fixture(scope="module")
def artifacts(module_tmp, smoke_params):
    return make_artifacts(smoke_params, module_tmp("artifacts"))


def run_sample(params: Path, gen: Path, tok: Path, root: Path) -> tuple[dict, dict]:
    sample.main(
        [
            "--params",
            str(params),
            "--generator",
            str(gen),
            "--tokenizer",
            str(tok),
            "--out",
            str(root / "data/sample"),
            "--results",
            str(root / "results/sample"),
        ]
    )
    return load_outputs(root)


def load_outputs(root: Path) -> tuple[dict, dict]:
    with np.load(root / "data/sample/samples.npz") as npz:
        arrays = dict(npz)
    return arrays, read_results(root / "results/sample/summary.json")


@pytest.fixture(scope="module")
def first_run(module_tmp, smoke_params, artifacts):
    return run_sample(smoke_params, *artifacts, module_tmp("run1"))


def test_layout_grid_and_summary(first_run, smoke_params, tmp_path_factory):
    arrays, summary = first_run
    p = load_params(smoke_params)
    n_classes, per_class, res = p.data.num_classes, p.sample.per_class, p.data.resolution
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (n_classes * per_class, res, res, 3)
    np.testing.assert_array_equal(arrays["arr_1"], np.repeat(np.arange(n_classes), per_class))
    assert len({img.tobytes() for img in arrays["arr_0"]}) == len(arrays["arr_0"])  # every seed its own image
    # smoke: 16 tokens, 4 AR tokens -> blocks 1,1,1,1,4,8 -> 6 passes (9 for 128 tokens)
    assert summary["sampling_steps"] == 6 and summary["block_sizes"] == [1, 1, 1, 1, 4, 8]
    assert summary["num_images"] == n_classes * per_class and summary["profile"] == "smoke"
    assert summary["generate_images_per_s"] > 0 and summary["decode_images_per_s"] > 0
    assert summary["cfg"]["cfg_scale"] == p.sample.sampling.cfg_scale
    assert summary["generator"]["weights"] == "random-init test fixture"
    root = next(Path(tmp_path_factory.getbasetemp()).glob("run1*"))
    grid = Image.open(root / "results/sample/grid.png")
    per_row = min(p.sample.grid_per_class, per_class)
    assert grid.size == (per_row * (res + 1) + 1, n_classes * (res + 1) + 1)  # one row per class, 1 px padding
    assert not list((root / "data/sample").glob("*.tmp*"))


def test_untrained_baseline_is_a_fresh_generator_sampled_the_same_way(
    first_run, smoke_params, artifacts, tmp_path_factory
):
    p = load_params(smoke_params)
    root = next(Path(tmp_path_factory.getbasetemp()).glob("run1*"))
    with np.load(root / "data/sample" / sample.UNTRAINED) as npz:
        untrained = dict(npz)
    np.testing.assert_array_equal(untrained["arr_1"], first_run[0]["arr_1"])
    generator, tokenizer, _ = sample.load_models(*artifacts, torch.device("cpu"))
    torch.manual_seed(p.sample.seed)
    fresh = HARGenerator(generator.cfg).eval()
    n = len(untrained["arr_0"])
    expected, _ = sample.sample_images(
        fresh,
        tokenizer,
        p.sample.sampling,
        range(n),
        p.sample.per_class,
        p.sample.seed,
        p.sample.batch_size,
        torch.device("cpu"),
    )
    np.testing.assert_array_equal(untrained["arr_0"], expected)
    assert not np.array_equal(untrained["arr_0"], first_run[0]["arr_0"])
    assert first_run[1]["untrained_baseline"] == f"untrained.npz: random-init(seed={p.sample.seed})"


def test_rerun_gives_identical_images(first_run, smoke_params, artifacts, tmp_path):
    again, _ = run_sample(smoke_params, *artifacts, tmp_path)
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(again[key], first_run[0][key])


def test_two_processes_give_the_same_images(first_run, smoke_params, artifacts, tmp_path):
    gen, tok = artifacts
    env = {**os.environ, "RESTOK_NPROC_PER_NODE": "2", "PYTHONPATH": str(REPO / "src")}
    cmd = [
        sys.executable,
        "-m",
        "restok.stages.sample",
        "--params",
        str(smoke_params),
        "--generator",
        str(gen),
        "--tokenizer",
        str(tok),
        "--out",
        str(tmp_path / "data/sample"),
        "--results",
        str(tmp_path / "results/sample"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torch.distributed.run" in proc.stdout  # it really ran under torchrun
    arrays, summary = load_outputs(tmp_path)
    assert summary["world_size"] == 2
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(arrays[key], first_run[0][key])


def test_compiled_sampling_gives_the_same_images(first_run, smoke_params, artifacts, tmp_path):
    """`sample.compile` (CPU: inductor, fp32): the stage's images equal the eager run's, byte for byte."""
    tree = yaml.safe_load(smoke_params.read_text())
    tree["sample"]["compile"] = True
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    arrays, summary = run_sample(params, *artifacts, tmp_path)
    assert summary["compile"] is True and summary["precision"] == "fp32" and first_run[1]["compile"] is False
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(arrays[key], first_run[0][key])


def test_bf16_sampling_runs_the_passes_and_the_cache_in_bf16(smoke_params, artifacts, monkeypatch):
    """`sample.precision: bf16` on CPU (auto picks it on CUDA only): the KV cache and the passes are bf16, one cache
    per batch size is reused by every batch of that size, and decoding stays fp32."""
    p = load_params(smoke_params)
    generator, tokenizer, _ = sample.load_models(*artifacts, torch.device("cpu"))
    caches, pass_dtypes = [], []
    allocate = images.allocate_kv_cache
    monkeypatch.setattr(images, "allocate_kv_cache", lambda *a: caches.append(allocate(*a)) or caches[-1])
    forward_cached = generator.forward_cached
    monkeypatch.setattr(
        generator,
        "forward_cached",
        lambda *a: (
            pass_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            or forward_cached(*a)
        ),
    )
    n = p.data.num_classes * p.sample.per_class  # 8 images in batches of 3: sizes 3, 3, 2
    out, _ = images.sample_images(
        generator,
        tokenizer,
        p.sample.sampling,
        range(n),
        p.sample.per_class,
        p.sample.seed,
        3,
        torch.device("cpu"),
        bf16=True,
    )
    assert out.shape == (n, p.data.resolution, p.data.resolution, 3) and out.dtype == np.uint8
    assert [cache[0][0].shape[0] for cache in caches] == [6, 4]  # CFG rows of batch sizes 3 and 2, once each
    assert all(t.dtype == torch.bfloat16 for cache in caches for pair in cache for t in pair)
    assert set(pass_dtypes) == {torch.bfloat16}
    assert images.sampling_bf16("auto", torch.device("cpu")) is False
    assert images.sampling_bf16("auto", torch.device("cuda")) is True
    assert images.sampling_bf16("fp32", torch.device("cuda")) is False


def test_rank_shares_cover_whole_batches():
    three = [list(images.rank_share(10, 4, r, 3)) for r in range(3)]
    assert three == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    four = [list(images.rank_share(10, 4, r, 4)) for r in range(4)]  # more ranks than batches: one idles
    assert four == [[], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(images.rank_share(10, 4, 0, 1)) == list(range(10))


def test_mismatched_artifacts_are_refused(smoke_params, artifacts, tmp_path):
    gen, _ = artifacts
    _, other_tok = make_artifacts(smoke_params, tmp_path / "other", codebook_size=64)
    with pytest.raises(ValueError, match=r"vocab_size vs codebook_size.* has 32 but .* has 64"):
        run_sample(smoke_params, gen, other_tok, tmp_path)
    assert not (tmp_path / "data/sample").exists()  # refused before any work


def test_truncation_to_uint8():
    x = torch.tensor([-0.1, 0.0, 0.5, 0.999, 1.0, 1.2]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    got = images.to_uint8(x)[0, 0, :, 0]
    assert got.tolist() == [0, 0, 127, 254, 255, 255]  # 127.5 -> 127, 254.7 -> 254: truncation, not rounding
